"""Rule correct_chunk: correct one chunk of a sample's selected genes."""

from step_logging import logged_to

snakemake = globals()["snakemake"]  # injected by snakemake's script directive

with logged_to(snakemake.log[0]) as log:
    import torch

    from undiffuse.chunks import run_chunk

    torch.set_num_threads(snakemake.threads)
    index = int(snakemake.wildcards.chunk)
    genes = run_chunk(
        snakemake.input.prepared,
        snakemake.input.quantiles,
        snakemake.output.chunk,
        index=index,
        chunk_size=snakemake.params.chunk_size,
        options=dict(snakemake.params.options),
        reference=snakemake.input.get("reference") or None,
    )
    log.info("corrected chunk %d: %d genes", index, len(genes))
