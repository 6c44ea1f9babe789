"""Rule spatialdata: corrected.zarr of one sample, from corrected.h5ad and its super-resolved maps if any."""

from step_logging import logged_to

snakemake = globals()["snakemake"]  # injected by snakemake's script directive

with logged_to(snakemake.log[0]) as log:
    import re

    from undiffuse.io.h5ad import read_h5ad
    from undiffuse.io.spatialdata import write_spatialdata

    corrected = read_h5ad(snakemake.input.corrected, "corrected sample")
    superres = {
        int(re.search(r"superres_(\d+)x\.h5ad$", path).group(1)): read_h5ad(path, "super-resolved maps")
        for path in snakemake.input.superres
    }
    write_spatialdata(corrected, snakemake.output.store, superres=superres, source=snakemake.input.corrected)
    log.info(
        "%d spots x %d genes, super-resolved maps at %s",
        *corrected.shape,
        ", ".join(f"{factor}x" for factor in sorted(superres)) or "no factor",
    )
