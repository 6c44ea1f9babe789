rule merge:
    """Merge a sample's chunks into corrected.h5ad (all genes, provenance) and parameters.tsv."""
    input:
        unpack(step_benchmarks),
        prepared=f"{RESULTS}/{{sample}}/prepared.h5ad",
        quantiles=f"{RESULTS}/{{sample}}/quantiles.tsv",
        chunks=chunk_outputs,
    output:
        corrected=f"{RESULTS}/{{sample}}/corrected.h5ad",
        parameters=f"{RESULTS}/{{sample}}/parameters.tsv",
    log:
        "logs/{sample}/merge.log",
    benchmark:
        "logs/benchmarks/{sample}/merge.tsv"
    conda:
        "../envs/merge.yaml"
    threads: rule_threads("merge")
    resources:
        mem_mb=scaled_mem_mb("merge"),
        runtime=scaled_runtime("merge"),
    script:
        "../workflow_scripts/merge.py"
