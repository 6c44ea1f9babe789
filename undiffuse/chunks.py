"""Deterministic gene chunks: how the selected genes of a sample are spread over correction jobs.

The genes keep the order of ``quantiles.tsv`` (the order of ``var`` in ``prepared.h5ad``) and are cut into
``ceil(G / chunk_size)`` contiguous chunks whose sizes differ by at most one, so that no job is left with a
handful of genes. Chunk ``k`` is therefore a pure function of the gene list, the chunk size and ``k``: the
workflow needs only the number of genes to know how many jobs to run, and each job recomputes its own genes.

This module uses the standard library only, so that the Snakefile can import it without the scientific stack.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from os import PathLike

from .errors import InputError


def n_chunks(n_genes: int, chunk_size: int) -> int:
    """Number of chunks of at most ``chunk_size`` genes that hold ``n_genes`` genes (0 for no gene)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    if n_genes < 0:
        raise ValueError(f"n_genes must not be negative, got {n_genes}")
    return math.ceil(n_genes / chunk_size)


def chunk_bounds(n_genes: int, chunk_size: int, index: int) -> tuple[int, int]:
    """``(start, stop)`` positions of chunk ``index`` in the gene list.

    The first ``n_genes % n`` chunks hold one gene more than the others, for ``n = n_chunks(...)``.
    """
    count = n_chunks(n_genes, chunk_size)
    if not 0 <= index < count:
        raise IndexError(
            f"chunk {index} does not exist: {n_genes} genes in chunks of {chunk_size} make {count}"
        )
    base, extra = divmod(n_genes, count)
    start = index * base + min(index, extra)
    return start, start + base + (index < extra)


def split_genes(genes: Sequence[str], chunk_size: int) -> list[list[str]]:
    """All chunks of ``genes``, in order; their concatenation is ``genes``."""
    genes = list(genes)
    if len(set(genes)) != len(genes):
        raise ValueError("gene names must be unique to be split into chunks")
    return [chunk_genes(genes, chunk_size, k) for k in range(n_chunks(len(genes), chunk_size))]


def chunk_genes(genes: Sequence[str], chunk_size: int, index: int) -> list[str]:
    """The genes of chunk ``index``."""
    start, stop = chunk_bounds(len(genes), chunk_size, index)
    return list(genes[start:stop])


def read_quantile_genes(quantiles_tsv: str | PathLike[str]) -> list[str]:
    """The ``gene`` column of a ``quantiles.tsv`` table, in file order."""
    with open(quantiles_tsv, newline="") as handle:
        reader = csv.DictReader(handle, delimiter="\t")
        if reader.fieldnames is None or "gene" not in reader.fieldnames:
            raise InputError(quantiles_tsv, "no 'gene' column in the header")
        return [row["gene"] for row in reader]


def run_chunk(
    prepared: str | PathLike[str],
    quantiles: str | PathLike[str],
    output: str | PathLike[str],
    *,
    index: int,
    chunk_size: int,
    options: dict | None = None,
) -> list[str]:
    """Correct chunk ``index`` of a sample and write its AnnData (the ``correct_chunk`` step).

    Parameters
    ----------
    prepared
        ``prepared.h5ad`` of the sample.
    quantiles
        ``quantiles.tsv``: the genes to correct, in chunk order, and their initial quantiles.
    output
        Chunk ``.h5ad`` to write (atomically): ``CorrectionResult.to_anndata`` without ``uns['spatial']``
        (the merge takes it from ``prepared.h5ad``), plus ``uns['chunk']`` (index and chunk size).
    index, chunk_size
        Which chunk, of chunks of at most ``chunk_size`` genes.
    options
        Keyword arguments of ``CorrectionConfig`` (``undiffuse.config.correction_options``).

    Returns
    -------
    The genes of the chunk.
    """
    from .atomic import atomic_path
    from .correct import CorrectionConfig, correct
    from .io.h5ad import read_prepared
    from .moran import read_quantile_table

    table = read_quantile_table(quantiles)
    genes = chunk_genes(list(table.index), chunk_size, index)
    # prepare has judged the tissue (and its override); the counts are checked again by correct().
    adata = read_prepared(prepared, allow_degenerate_tissue=True)
    result = correct(
        adata,
        genes=genes,
        q_init=table.loc[genes, "q_init"],
        config=CorrectionConfig(**(options or {})),
        allow_degenerate_tissue=True,
    )
    chunk = result.to_anndata(adata)
    # The merge takes the images from prepared.h5ad; a copy in every chunk would only cost disk and I/O.
    chunk.uns.pop("spatial", None)
    chunk.uns["chunk"] = {"index": int(index), "chunk_size": int(chunk_size)}
    with atomic_path(output) as tmp:
        chunk.write_h5ad(tmp, compression="gzip")
    return genes
