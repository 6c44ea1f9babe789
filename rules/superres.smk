"""Histology-guided super-resolution of the corrected maps (issue 14), on when superres.enabled is true."""

SUPERRES = config["superres"]

#: Marker table of the per-pixel cell types: report.markers when set; the simulated domains' markers for a
#: simulated sample; none (no cell-type figure) for a real one.
SUPERRES_MARKERS = {
    sample: (
        str(resolve_path(config["report"]["markers"]))
        if config["report"].get("markers")
        else (SIMULATED_MARKERS if is_simulated(sample) else [])
    )
    for sample in SAMPLES
}


#: Targets of rule superres for every sample, when it is enabled (an input of rule all).
SUPERRES_TARGETS = (
    expand(
        f"{RESULTS}/{{sample}}/superres/superres_{{factor}}x.h5ad",
        sample=SAMPLES,
        factor=SUPERRES["factors"],
    )
    if SUPERRES["enabled"]
    else []
)


rule superres:
    """Super-resolved maps of one sample at one factor, with figures: the most changed genes over the H&E and
    the cell type of every pixel (seed section 4)."""
    input:
        corrected=f"{RESULTS}/{{sample}}/corrected.h5ad",
        markers=lambda wildcards: SUPERRES_MARKERS[wildcards.sample],
    output:
        adata=f"{RESULTS}/{{sample}}/superres/superres_{{factor}}x.h5ad",
        maps=report(
            f"{RESULTS}/{{sample}}/superres/maps_{{factor}}x.png",
            category="Super-resolution",
            subcategory="{sample}",
            labels={"sample": "{sample}", "figure": "maps {factor}x"},
        ),
        cell_types=report(
            f"{RESULTS}/{{sample}}/superres/cell_types_{{factor}}x.png",
            category="Super-resolution",
            subcategory="{sample}",
            labels={"sample": "{sample}", "figure": "cell types {factor}x"},
        ),
        table=f"{RESULTS}/{{sample}}/superres/cell_types_{{factor}}x.tsv",
    log:
        "logs/{sample}/superres_{factor}x.log",
    benchmark:
        "logs/benchmarks/{sample}/superres_{factor}x.tsv"
    wildcard_constraints:
        factor=r"\d+",
    conda:
        "../envs/merge.yaml"
    threads: rule_threads("superres")
    resources:
        mem_mb=scaled_mem_mb("superres"),
        runtime=scaled_runtime("superres"),
    params:
        model=SUPERRES["model"],
        epochs=SUPERRES["epochs"],
        top_genes=SUPERRES["top_genes"],
    script:
        "../workflow_scripts/superres.py"
