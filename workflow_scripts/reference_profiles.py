"""Rule reference_profiles: the mean expression of every gene in each cell type of a sample's reference."""

from step_logging import logged_to

snakemake = globals()["snakemake"]  # injected by snakemake's script directive

with logged_to(snakemake.log[0]) as log:
    from undiffuse.reference import read_reference, write_profiles

    profiles = read_reference(snakemake.input.reference, snakemake.params.key)
    write_profiles(profiles, snakemake.output.profiles)
    log.info(
        "%d cell types x %d genes: %s", profiles.shape[1], profiles.shape[0], ", ".join(profiles.columns)
    )
