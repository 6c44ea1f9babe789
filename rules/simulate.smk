rule simulate:
    """Generate a ground-truth sample in the Space Ranger outs/ layout (sheet rows whose input is "simulate")."""
    output:
        matrix=f"{RESULTS}/{{sample}}/simulated/outs/raw_feature_bc_matrix.h5",
        positions=f"{RESULTS}/{{sample}}/simulated/outs/spatial/tissue_positions.csv",
        scalefactors=f"{RESULTS}/{{sample}}/simulated/outs/spatial/scalefactors_json.json",
        hires=f"{RESULTS}/{{sample}}/simulated/outs/spatial/tissue_hires_image.png",
        lowres=f"{RESULTS}/{{sample}}/simulated/outs/spatial/tissue_lowres_image.png",
        truth=f"{RESULTS}/{{sample}}/simulated/truth.h5ad",
    log:
        "logs/{sample}/simulate.log",
    benchmark:
        "logs/benchmarks/{sample}/simulate.tsv"
    conda:
        "../envs/simulate.yaml"
    threads: rule_threads("simulate")
    resources:
        mem_mb=scaled_mem_mb("simulate"),
        runtime=scaled_runtime("simulate"),
    params:
        outdir=lambda wildcards: simulated_dir(wildcards.sample),
        options=simulation_params,
    script:
        "../workflow_scripts/simulate.py"
