"""Rule simulate: write a ground-truth sample in the Space Ranger outs/ layout."""

from step_logging import logged_to

snakemake = globals()["snakemake"]  # injected by snakemake's script directive

with logged_to(snakemake.log[0]) as log:
    from undiffuse.simulate import simulate_sample

    options = dict(snakemake.params.options)
    log.info("simulating %s with %s", snakemake.wildcards.sample, options)
    simulate_sample(snakemake.params.outdir, **options)
