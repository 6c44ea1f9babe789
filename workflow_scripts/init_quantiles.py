"""Rule init_quantiles: the Moran's I quantile scan of one sample's selected genes."""

from step_logging import logged_to

snakemake = globals()["snakemake"]  # injected by snakemake's script directive

with logged_to(snakemake.log[0]) as log:
    from undiffuse.cli.quantiles import init_quantiles
    from undiffuse.moran import quantile_grid

    grid = quantile_grid(**snakemake.params.grid)
    table = init_quantiles(snakemake.input.prepared, snakemake.output.quantiles, grid=grid)
    log.info("scanned %d genes over %d quantiles", len(table), len(grid))
