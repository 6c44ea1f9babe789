"""Reports: per-sample metrics, executed notebook and HTML (rule report); one summary across samples."""

#: Notebook templates of the installed package (the ones the reports run); inputs of the rules, so that
#: editing a template reruns the reports.
REPORT_TEMPLATE = str(undiffuse.package_data.REPORT_NOTEBOOK)
SUMMARY_TEMPLATE = str(undiffuse.package_data.SUMMARY_NOTEBOOK)


#: Marker table of each sample's cell-type maps (report_markers in rules/common.smk).
REPORT_MARKERS = {sample: report_markers(sample) for sample in SAMPLES}

#: Key figures of each report (undiffuse.report.KEY_FIGURES), shown by `snakemake --report`.
REPORT_FIGURES = {
    name: report(
        f"{RESULTS}/{{sample}}/figures/{name}.png",
        category="Figures",
        subcategory="{sample}",
        labels={"sample": "{sample}", "figure": name},
    )
    for name in ("before_after", "cell_types", "kernel", "loss")
}


rule report:
    """Metrics (with the ground truth of simulated samples), the executed report notebook, its HTML and the
    key figures of one sample."""
    input:
        corrected=f"{RESULTS}/{{sample}}/corrected.h5ad",
        qc=f"{RESULTS}/{{sample}}/qc/qc.json",
        truth=truth_file,
        markers=lambda wildcards: REPORT_MARKERS[wildcards.sample],
        template=REPORT_TEMPLATE,
    output:
        **REPORT_FIGURES,
        summary=report(
            f"{RESULTS}/{{sample}}/metrics/summary.tsv",
            category="Metrics",
            labels={"sample": "{sample}", "table": "summary"},
        ),
        genes=f"{RESULTS}/{{sample}}/metrics/genes.tsv",
        metrics=f"{RESULTS}/{{sample}}/metrics/metrics.json",
        notebook=f"{RESULTS}/{{sample}}/report.ipynb",
        html=report(
            f"{RESULTS}/{{sample}}/report.html",
            category="Reports",
            labels={"sample": "{sample}", "report": "sample"},
        ),
    log:
        "logs/{sample}/report.log",
    benchmark:
        "logs/benchmarks/{sample}/report.tsv"
    conda:
        "../envs/report.yaml"
    threads: rule_threads("report")
    resources:
        mem_mb=report_mem_mb,
        runtime=scaled_runtime("report"),
    params:
        outdir=lambda wildcards: f"{RESULTS}/{wildcards.sample}",
        qc_dir=lambda wildcards: f"{RESULTS}/{wildcards.sample}/qc",
    script:
        "../workflow_scripts/report.py"


rule summary:
    """One table and figures across all samples of the sheet, linking each sample's report."""
    input:
        metrics=expand(f"{RESULTS}/{{sample}}/metrics/summary.tsv", sample=SAMPLES),
        reports=expand(f"{RESULTS}/{{sample}}/report.html", sample=SAMPLES),
        template=SUMMARY_TEMPLATE,
    output:
        notebook=f"{RESULTS}/summary.ipynb",
        html=report(
            f"{RESULTS}/summary.html",
            category="Reports",
            labels={"sample": "all samples", "report": "summary"},
        ),
    log:
        "logs/summary.log",
    benchmark:
        "logs/benchmarks/summary.tsv"
    conda:
        "../envs/summary.yaml"
    threads: rule_threads("summary")
    resources:
        mem_mb=scaled_mem_mb("summary"),
        runtime=scaled_runtime("summary"),
    params:
        samples=SAMPLES,
    script:
        "../workflow_scripts/summary.py"
