"""Rule report: metrics, executed notebook, HTML report and key figures of one sample."""

from pathlib import Path

from step_logging import logged_to

snakemake = globals()["snakemake"]  # injected by snakemake's script directive

with logged_to(snakemake.log[0]) as log:
    from undiffuse.report import build_report

    outputs = build_report(
        snakemake.input.corrected,
        snakemake.params.outdir,
        qc_dir=Path(snakemake.input.qc).parent,
        truth=snakemake.input.get("truth") or None,
        markers=snakemake.input.get("markers") or None,
        sample=snakemake.wildcards.sample,
    )
    log.info("wrote %s, %s and %s", outputs.metrics_dir, outputs.notebook, outputs.html)
