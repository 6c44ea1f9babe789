"""Rule summary: one table and figures across all samples, as an executed notebook and HTML."""

from pathlib import Path

from step_logging import logged_to

snakemake = globals()["snakemake"]  # injected by snakemake's script directive

with logged_to(snakemake.log[0]) as log:
    from undiffuse.report import build_summary

    samples = list(snakemake.params.samples)
    metrics_dirs = {
        sample: Path(path).parent for sample, path in zip(samples, snakemake.input.metrics, strict=True)
    }
    reports = dict(zip(samples, snakemake.input.reports, strict=True))
    html = build_summary(
        metrics_dirs, snakemake.output.html, notebook=snakemake.output.notebook, reports=reports
    )
    log.info("wrote %s for %d samples", html, len(samples))
