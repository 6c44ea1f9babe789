rule simulate:
    """Generate a ground-truth sample in the Space Ranger outs/ layout, its truth and a matching single-cell
    reference (sheet rows whose input is "simulate")."""
    output:
        matrix=f"{RESULTS}/{{sample}}/simulated/outs/raw_feature_bc_matrix.h5",
        positions=f"{RESULTS}/{{sample}}/simulated/outs/spatial/tissue_positions.csv",
        scalefactors=f"{RESULTS}/{{sample}}/simulated/outs/spatial/scalefactors_json.json",
        hires=f"{RESULTS}/{{sample}}/simulated/outs/spatial/tissue_hires_image.png",
        lowres=f"{RESULTS}/{{sample}}/simulated/outs/spatial/tissue_lowres_image.png",
        truth=f"{RESULTS}/{{sample}}/simulated/truth.h5ad",
        reference=f"{RESULTS}/{{sample}}/simulated/reference.h5ad",
    log:
        "logs/{sample}/simulate.log",
    benchmark:
        "logs/benchmarks/{sample}/simulate.tsv"
    wildcard_constraints:
        sample=sample_pattern(
            [s for s in SAMPLES if is_simulated(s) and not is_simulated_hd(s)]
        ),
    conda:
        "../envs/simulate.yaml"
    threads: rule_threads("simulate")
    resources:
        mem_mb=simulation_mem_mb,
        runtime=scaled_runtime("simulate"),
    params:
        outdir=lambda wildcards: simulated_dir(wildcards.sample),
        options=simulation_params,
    script:
        "../workflow_scripts/simulate.py"


#: Bin folders a simulated Visium HD sample holds (undiffuse.simulate_hd.BIN_SIZES_UM).
HD_SQUARES = [f"square_{size:03d}um" for size in (2, 8, 16)]


rule simulate_hd:
    """Generate a Visium HD ground-truth sample: Space Ranger binned_outputs/ at 2, 8 and 16 um, the truth of
    each bin size, the marker table of its cell types and a single-cell reference of them (sheet rows whose
    input is "simulate_hd").
    """
    output:
        matrices=expand(
            f"{RESULTS}/{{{{sample}}}}/simulated/outs/binned_outputs/{{square}}/raw_feature_bc_matrix.h5",
            square=HD_SQUARES,
        ),
        truth=expand(
            f"{RESULTS}/{{{{sample}}}}/simulated/truth/{{square}}.h5ad",
            square=HD_SQUARES,
        ),
        markers=f"{RESULTS}/{{sample}}/simulated/markers.tsv",
        reference=f"{RESULTS}/{{sample}}/simulated/reference.h5ad",
    log:
        "logs/{sample}/simulate_hd.log",
    benchmark:
        "logs/benchmarks/{sample}/simulate_hd.tsv"
    wildcard_constraints:
        sample=sample_pattern([s for s in SAMPLES if is_simulated_hd(s)]),
    conda:
        "../envs/simulate.yaml"
    threads: rule_threads("simulate")
    resources:
        mem_mb=simulation_mem_mb,
        runtime=scaled_runtime("simulate"),
    params:
        outdir=lambda wildcards: simulated_dir(wildcards.sample),
        options=simulation_params,
    script:
        "../workflow_scripts/simulate_hd.py"
