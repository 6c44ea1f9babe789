"""Deterministic gene chunks: how the selected genes of a sample are spread over correction jobs.

The genes keep the order of ``quantiles.tsv`` (the order of ``var`` in ``prepared.h5ad``) and are cut into
``ceil(G / chunk_size)`` contiguous chunks whose sizes differ by at most one, so that no job is left with a
handful of genes. Chunk ``k`` is therefore a pure function of the gene list, the chunk size and ``k``: the
workflow needs only the number of genes to know how many jobs to run, and each job recomputes its own genes.

This module uses the standard library only, so that the Snakefile can import it without the scientific stack.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from os import PathLike
from typing import TYPE_CHECKING

from .errors import InputError

if TYPE_CHECKING:
    from anndata import AnnData


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


def run_chunk(
    prepared: str | PathLike[str],
    quantiles: str | PathLike[str],
    output: str | PathLike[str],
    *,
    index: int,
    chunk_size: int,
    options: dict | None = None,
    reference: str | PathLike[str] | None = None,
) -> list[str]:
    """Correct chunk ``index`` of a sample and write its chunk file (the ``correct_chunk`` step).

    Parameters
    ----------
    prepared
        ``prepared.h5ad`` of the sample.
    quantiles
        ``quantiles.tsv``: the genes to correct, in chunk order, and their initial quantiles.
    output
        Chunk ``.h5ad`` to write (:func:`write_chunk`).
    index, chunk_size
        Which chunk, of chunks of at most ``chunk_size`` genes.
    options
        Keyword arguments of ``CorrectionConfig`` (``undiffuse.config.correction_options``).
    reference
        ``reference_profiles.tsv`` of the sample's reference (:func:`undiffuse.reference.write_profiles`), or
        ``None``.

    Returns
    -------
    The genes of the chunk.
    """
    from .correct import CorrectionConfig, correct
    from .io.h5ad import read_prepared
    from .quantiles import read_quantile_table

    table = read_quantile_table(quantiles)
    genes = chunk_genes(list(table.index), chunk_size, index)
    # prepare has judged the tissue (and its override); the counts are checked again by correct().
    adata = read_prepared(prepared, allow_degenerate_tissue=True)
    # Every gene stays in: the bilateral prior weighs neighbours by the profiles of all selected genes, so that
    # a gene's result does not depend on its chunk. Only the chunk's columns are written.
    correct(
        adata,
        genes=genes,
        q_init=table.loc[genes, "q_init"],
        reference=reference,
        config=CorrectionConfig(**(options or {})),
        allow_degenerate_tissue=True,
    )
    write_chunk(adata[:, genes], output, index=index, chunk_size=chunk_size)
    return genes


def write_chunk(corrected: AnnData, output: str | PathLike[str], *, index: int, chunk_size: int) -> None:
    """Write the part of a corrected chunk that the merge assigns: nothing it already has.

    Parameters
    ----------
    corrected
        ``(N, g)`` the chunk's genes after :func:`undiffuse.correct`.
    output
        Chunk ``.h5ad`` to write (atomically): ``X`` the ``(N, g)`` corrected values (CSR float32: zero off
        tissue), the spot names, the ``undiffuse_*`` columns of ``var`` and ``varm``,
        ``uns['undiffuse']['correction']`` and ``uns['undiffuse']['chunk']`` (index and chunk size). No raw
        counts, annotations or images: the merge takes those from ``prepared.h5ad``.
    index, chunk_size
        Which chunk, of chunks of at most ``chunk_size`` genes.
    """
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    from .atomic import atomic_path
    from .correct import KEY

    provenance = corrected.uns[KEY]["correction"]
    chunk = ad.AnnData(
        X=sp.csr_matrix(corrected.layers[provenance["layer"]], dtype="float32"),
        obs=pd.DataFrame(index=corrected.obs_names),
        var=corrected.var[[c for c in corrected.var.columns if c.startswith(f"{KEY}_")]].copy(),
        varm={key: value for key, value in corrected.varm.items() if key.startswith(f"{KEY}_")},
        uns={KEY: {"correction": provenance, "chunk": {"index": int(index), "chunk_size": int(chunk_size)}}},
    )
    with atomic_path(output) as tmp:
        chunk.write_h5ad(tmp, compression="gzip")


def read_chunk(path: str | PathLike[str]) -> AnnData:
    """Read a chunk file written by :func:`write_chunk`.

    Raises
    ------
    InputError
        The file is missing, is not h5ad, or lacks part of the chunk layout.
    """
    from .correct import CORRECTED_COLUMN, KEY, PHI_KEY
    from .io.h5ad import read_h5ad

    chunk = read_h5ad(path, "chunk", fix="rerun its correct_chunk job")
    if (
        CORRECTED_COLUMN not in chunk.var
        or PHI_KEY not in chunk.varm
        or "chunk" not in chunk.uns.get(KEY, {})
    ):
        raise InputError(path, "not a chunk file (no undiffuse_* var columns, varm or uns); rerun its job")
    return chunk
