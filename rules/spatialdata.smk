"""Each sample's result as a SpatialData zarr store (undiffuse.io.spatialdata), on when spatialdata.enabled is
true: spatialdata-plot and napari-spatialdata open it as it is."""

#: Targets of rule spatialdata for every sample, when it is enabled (an input of rule all).
SPATIALDATA_TARGETS = (
    expand(f"{RESULTS}/{{sample}}/corrected.zarr", sample=SAMPLES)
    if config["spatialdata"]["enabled"]
    else []
)


rule spatialdata:
    """corrected.zarr: the corrected table (raw counts in X, corrected values in layer corrected), the spots, the H&E images and, when
    rule superres is on, the super-resolved maps as images."""
    input:
        corrected=f"{RESULTS}/{{sample}}/corrected.h5ad",
        superres=lambda wildcards: (
            expand(
                f"{RESULTS}/{wildcards.sample}/superres/superres_{{factor}}x.h5ad",
                factor=SUPERRES["factors"],
            )
            if SUPERRES["enabled"]
            else []
        ),
    output:
        store=directory(f"{RESULTS}/{{sample}}/corrected.zarr"),
    log:
        "logs/{sample}/spatialdata.log",
    benchmark:
        "logs/benchmarks/{sample}/spatialdata.tsv"
    conda:
        "../envs/merge.yaml"
    threads: rule_threads("spatialdata")
    resources:
        mem_mb=scaled_mem_mb("spatialdata"),
        runtime=scaled_runtime("spatialdata"),
    script:
        "../workflow_scripts/spatialdata.py"
