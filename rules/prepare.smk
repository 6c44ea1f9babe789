rule prepare:
    """Read the input, refine the tissue mask, measure QC and background decay, select the genes to correct."""
    input:
        unpack(prepare_inputs),
    output:
        prepared=f"{RESULTS}/{{sample}}/prepared.h5ad",
        qc_table=f"{RESULTS}/{{sample}}/qc/qc.tsv",
        qc_json=f"{RESULTS}/{{sample}}/qc/qc.json",
    log:
        "logs/{sample}/prepare.log",
    benchmark:
        "logs/benchmarks/{sample}/prepare.tsv"
    conda:
        "../envs/prepare.yaml"
    threads: rule_threads("prepare")
    resources:
        mem_mb=scaled_mem_mb("prepare"),
        runtime=scaled_runtime("prepare"),
    params:
        source=lambda wildcards: input_location(wildcards.sample),
        outdir=lambda wildcards: f"{RESULTS}/{wildcards.sample}",
        options=canonical(config["prepare"]),
    script:
        "../workflow_scripts/prepare.py"
