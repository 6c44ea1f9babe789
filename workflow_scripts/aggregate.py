"""Rules aggregate_bins and aggregate_cells: a corrected HD sample summed into coarser bins or into cells."""

from step_logging import logged_to

snakemake = globals()["snakemake"]  # injected by snakemake's script directive

with logged_to(snakemake.log[0]) as log:
    from undiffuse.aggregate import aggregate_bins, aggregate_cells, read_cell_labels
    from undiffuse.atomic import atomic_path
    from undiffuse.io.h5ad import read_h5ad

    corrected = read_h5ad(snakemake.input.corrected, "corrected sample", record_source=True)
    if "size" in snakemake.wildcards.keys():
        result = aggregate_bins(corrected, int(snakemake.wildcards.size))
    else:
        result = aggregate_cells(corrected, read_cell_labels(snakemake.input.cells, corrected))
    with atomic_path(snakemake.output[0]) as tmp:
        result.write_h5ad(tmp, compression="gzip")
    log.info(f"{corrected.n_obs} bins -> {result.n_obs} ({result.uns['undiffuse']['aggregation']})")
