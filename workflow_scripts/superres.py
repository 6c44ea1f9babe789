"""Rule superres: super-resolved maps of one sample at one factor, with its report figures."""

from step_logging import logged_to

snakemake = globals()["snakemake"]  # injected by snakemake's script directive

with logged_to(snakemake.log[0]) as log:
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from undiffuse.atomic import atomic_path
    from undiffuse.celltypes import read_markers
    from undiffuse.io.h5ad import read_h5ad
    from undiffuse.superres import (
        most_changed_genes,
        pixel_cell_types,
        plot_cell_types,
        plot_maps,
        superresolve,
        write_result,
    )

    corrected = read_h5ad(snakemake.input.corrected, "corrected sample", record_source=True)
    factor = int(snakemake.wildcards.factor)
    result = superresolve(
        corrected,
        factor=factor,
        model=snakemake.params.model,
        epochs=snakemake.params.epochs,
        threads=snakemake.threads,
    )
    write_result(result, corrected, snakemake.output.adata)
    log.info(
        "%d tissue pixels x %d genes at %dx in %.0f s on %s",
        result.pixels.size,
        len(result.genes),
        factor,
        result.seconds,
        result.device,
    )
    shown = most_changed_genes(corrected, result.genes, snakemake.params.top_genes)
    plot_maps(result, corrected, shown, snakemake.output.maps)
    markers = snakemake.input.markers
    if markers:
        typed = pixel_cell_types(result.maps, result.genes, read_markers(markers))
        typed.index = result.to_anndata().obs_names
        with atomic_path(snakemake.output.table) as tmp:
            typed.to_csv(tmp, sep="\t", index_label="pixel")
        plot_cell_types(result, corrected, typed, snakemake.output.cell_types)
    else:
        log.info("no marker table for this sample: no cell types")
        with atomic_path(snakemake.output.table) as tmp:
            Path(tmp).write_text("pixel\tcell_type\tscore\n")
        fig = plt.figure(figsize=(4, 1))
        fig.text(0.05, 0.5, "no marker table (report.markers) for this sample")
        with atomic_path(snakemake.output.cell_types) as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)
