"""Rule simulate_hd: write a Visium HD ground-truth sample (binned_outputs/, truth/) and its marker table."""

from step_logging import logged_to

snakemake = globals()["snakemake"]  # injected by snakemake's script directive

with logged_to(snakemake.log[0]) as log:
    from undiffuse.atomic import atomic_path
    from undiffuse.simulate_hd import HDSimulationParams, marker_table_hd, simulate_hd_sample

    options = dict(snakemake.params.options)
    preset = options.pop("preset")
    params = HDSimulationParams.from_dict(options, preset=preset)
    log.info("simulating Visium HD sample %s with %s", snakemake.wildcards.sample, params.to_dict())
    simulate_hd_sample(snakemake.params.outdir, params)
    with atomic_path(snakemake.output.markers) as tmp:
        marker_table_hd(params).to_csv(tmp, sep="\t", index=False)
