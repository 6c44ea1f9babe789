"""Sums of a Visium HD sample's corrected bins into coarser bins (aggregate.bin_sizes) and into the cells of
the sample sheet's segmentation (column cells), as users do next with 2 um bins (undiffuse.aggregate).
"""

#: An input of rule all.
AGGREGATE_TARGETS = aggregate_targets(config["aggregate"]["bin_sizes"])


rule aggregate_bins:
    """Corrected (and raw) counts of one HD sample summed into bins of one coarser size."""
    input:
        corrected=f"{RESULTS}/{{sample}}/corrected.h5ad",
    output:
        f"{RESULTS}/{{sample}}/aggregated/square_{{size}}um.h5ad",
    log:
        "logs/{sample}/aggregate_bins_{size}um.log",
    benchmark:
        "logs/benchmarks/{sample}/aggregate_bins_{size}um.tsv"
    wildcard_constraints:
        size=r"\d{3}",
    conda:
        "../envs/merge.yaml"
    threads: rule_threads("aggregate")
    resources:
        mem_mb=scaled_mem_mb("aggregate"),
        runtime=scaled_runtime("aggregate"),
    script:
        "../workflow_scripts/aggregate.py"


rule aggregate_cells:
    """Corrected (and raw) counts of one HD sample summed into the cells of its segmentation."""
    input:
        corrected=f"{RESULTS}/{{sample}}/corrected.h5ad",
        cells=lambda wildcards: optional_sheet_path(wildcards.sample, "cells"),
    output:
        f"{RESULTS}/{{sample}}/aggregated/cells.h5ad",
    log:
        "logs/{sample}/aggregate_cells.log",
    benchmark:
        "logs/benchmarks/{sample}/aggregate_cells.tsv"
    conda:
        "../envs/merge.yaml"
    threads: rule_threads("aggregate")
    resources:
        mem_mb=scaled_mem_mb("aggregate"),
        runtime=scaled_runtime("aggregate"),
    script:
        "../workflow_scripts/aggregate.py"
