"""Rule merge: corrected.h5ad and parameters.tsv of one sample from its chunks."""

from step_logging import logged_to

snakemake = globals()["snakemake"]  # injected by snakemake's script directive

with logged_to(snakemake.log[0]) as log:
    from undiffuse.merge import merge_sample, read_wall_times

    benchmarks = {
        name.removeprefix("benchmark_"): path
        for name, path in snakemake.input.items()
        if name.startswith("benchmark_")
    }
    wall_times = read_wall_times(benchmarks)
    merged = merge_sample(
        snakemake.input.prepared,
        list(snakemake.input.chunks),
        snakemake.input.quantiles,
        snakemake.output.corrected,
        snakemake.output.parameters,
        config=snakemake.config,
        wall_times=wall_times,
    )
    log.info("merged %d chunks: %d spots x %d genes", len(snakemake.input.chunks), *merged.shape)
