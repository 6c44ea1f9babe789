"""Rule prepare: canonical AnnData, tissue mask, QC and gene selection of one sample."""

from step_logging import logged_to

snakemake = globals()["snakemake"]  # injected by snakemake's script directive

with logged_to(snakemake.log[0]) as log:
    from undiffuse.prepare import prepare_sample

    options = dict(snakemake.params.options)
    log.info("preparing %s from %s with %s", snakemake.wildcards.sample, snakemake.params.source, options)
    prepare_sample(
        snakemake.params.source,
        snakemake.params.outdir,
        image=snakemake.input.get("image"),
        genes=snakemake.input.get("genes"),
        sample_id=snakemake.wildcards.sample,
        **options,
    )
