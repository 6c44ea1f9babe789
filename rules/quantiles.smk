checkpoint init_quantiles:
    """Initial quantile of every selected gene: the hard threshold that maximises Moran's I.

    A checkpoint: the number of genes it lists fixes the number of correct_chunk jobs of the sample.
    """
    input:
        prepared=f"{RESULTS}/{{sample}}/prepared.h5ad",
    output:
        quantiles=f"{RESULTS}/{{sample}}/quantiles.tsv",
    log:
        "logs/{sample}/init_quantiles.log",
    benchmark:
        "logs/benchmarks/{sample}/init_quantiles.tsv"
    conda:
        "../envs/init_quantiles.yaml"
    threads: rule_threads("init_quantiles")
    resources:
        mem_mb=scaled_mem_mb("init_quantiles"),
        runtime=scaled_runtime("init_quantiles"),
    params:
        grid=canonical(config["init_quantiles"]["grid"]),
    script:
        "../workflow_scripts/init_quantiles.py"
