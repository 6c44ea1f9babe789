rule reference_profiles:
    """Mean expression of every gene in each cell type of the sample's reference (config correct.reference)."""
    input:
        reference=lambda wildcards: reference_file(wildcards.sample),
    output:
        profiles=f"{RESULTS}/{{sample}}/reference_profiles.tsv",
    log:
        "logs/{sample}/reference_profiles.log",
    benchmark:
        "logs/benchmarks/{sample}/reference_profiles.tsv"
    conda:
        "../envs/correct.yaml"
    threads: 1
    resources:
        mem_mb=scaled_mem_mb("reference_profiles"),
        runtime=scaled_runtime("reference_profiles"),
    params:
        key=config["correct"]["reference_key"],
    script:
        "../workflow_scripts/reference_profiles.py"


rule correct_chunk:
    """Correct one chunk of a sample's selected genes (chunk k of undiffuse.chunks.split_genes)."""
    input:
        prepared=f"{RESULTS}/{{sample}}/prepared.h5ad",
        quantiles=f"{RESULTS}/{{sample}}/quantiles.tsv",
        reference=reference_profiles_input,
    output:
        chunk=f"{RESULTS}/{{sample}}/chunks/chunk_{{chunk}}.h5ad",
    log:
        "logs/{sample}/correct_chunk/{chunk}.log",
    benchmark:
        "logs/benchmarks/{sample}/correct_chunk/{chunk}.tsv"
    conda:
        "../envs/correct.yaml"
    threads: rule_threads("correct_chunk")
    resources:
        mem_mb=correct_chunk_mem_mb,
        runtime=correct_chunk_runtime,
        gpu=1 if config["correct"]["gpu"] else 0,
    params:
        chunk_size=config["correct"]["chunk_size"],
        options=canonical(correction_options(config)),
    script:
        "../workflow_scripts/correct_chunk.py"
