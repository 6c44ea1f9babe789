"""Which genes the correction works on; the others pass through unchanged.

Three rules, applied in this order: a user gene list replaces the automatic choice; otherwise genes need a
minimum total count over all spots, and among those the top ``n_top_genes`` highly variable genes of the
tissue spots are kept (scanpy's ``seurat_v3`` flavour, on raw counts).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import InputError

if TYPE_CHECKING:
    from anndata import AnnData

# pandas and scanpy are imported where used, so that the CLI can read the defaults below without them.

DEFAULT_MIN_COUNTS = 100
DEFAULT_N_TOP_GENES = 2000

#: Unknown genes named in an error message, at most.
_LISTED = 10


def read_gene_list(path: str | Path) -> list[str]:
    """Genes of a text file, one per line; blank lines and ``#`` comments are ignored.

    Raises
    ------
    InputError
        When the file is missing, unreadable or names no gene.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file does not exist")
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(path, f"cannot be read as text: {err}") from err
    genes = [line.split("#", 1)[0].strip() for line in lines]
    genes = list(dict.fromkeys(gene for gene in genes if gene))
    if not genes:
        raise InputError(path, "names no gene (expected one gene per line)")
    return genes


def _match_genes(adata: AnnData, genes: list[str], source: str | Path | None) -> np.ndarray:
    """Boolean mask of ``var`` for ``genes``, matched on gene names or, failing that, on gene ids."""
    import pandas as pd

    names = pd.Index(adata.var_names)
    ids = pd.Index(adata.var["gene_ids"]) if "gene_ids" in adata.var else pd.Index([])
    selected = names.isin(genes) | ids.isin(genes)
    unknown = [gene for gene in genes if gene not in names and gene not in ids]
    if unknown:
        shown = ", ".join(unknown[:_LISTED]) + (
            f" and {len(unknown) - _LISTED} more" if len(unknown) > _LISTED else ""
        )
        raise InputError(source, f"{len(unknown)} gene(s) are not in the matrix: {shown}")
    return selected


def highly_variable(counts: AnnData, n_top_genes: int) -> np.ndarray:
    """Top ``n_top_genes`` highly variable genes of raw counts (``seurat_v3``); all genes when there are
    no more than that. Falls back to the variance-to-mean ratio, with a warning, when the loess fit of
    ``seurat_v3`` fails (too few genes or spots) or scikit-misc, which it needs, is not installed."""
    import scanpy as sc

    if counts.n_vars <= n_top_genes:
        return np.ones(counts.n_vars, dtype=bool)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            table = sc.pp.highly_variable_genes(
                counts, flavor="seurat_v3", n_top_genes=n_top_genes, inplace=False
            )
        return table["highly_variable"].to_numpy(dtype=bool)
    except (ImportError, ValueError, ZeroDivisionError, np.linalg.LinAlgError) as err:
        # ImportError: seurat_v3 needs scikit-misc (skmisc) for its loess fit.
        warnings.warn(
            f"seurat_v3 failed ({err}); ranking genes by variance-to-mean ratio instead", stacklevel=2
        )
    x = counts.X
    mean = np.asarray(x.mean(axis=0)).ravel()
    mean_sq = np.asarray(x.multiply(x).mean(axis=0)).ravel() if hasattr(x, "multiply") else (x**2).mean(0)
    fano = np.divide(mean_sq - mean**2, mean, out=np.zeros_like(mean), where=mean > 0)
    chosen = np.zeros(counts.n_vars, dtype=bool)
    chosen[np.argsort(-fano, kind="stable")[:n_top_genes]] = True
    return chosen


def select_genes(
    adata: AnnData,
    *,
    tissue: np.ndarray,
    genes: list[str] | str | Path | None = None,
    min_counts: int = DEFAULT_MIN_COUNTS,
    n_top_genes: int = DEFAULT_N_TOP_GENES,
) -> np.ndarray:
    """Mark the genes to correct, in place: ``var['selected']`` and ``var['total_counts']``.

    Parameters
    ----------
    adata
        Canonical AnnData (raw counts).
    tissue
        ``(N,)`` tissue mask; highly variable genes are ranked on tissue spots only, where the biology is.
    genes
        A gene list (names or ids), or the path of a file with one gene per line. Overrides the rules below.
    min_counts
        Smallest total count of a gene over all spots.
    n_top_genes
        Number of highly variable genes kept among those with enough counts.

    Returns
    -------
    The boolean ``var['selected']``.

    Raises
    ------
    InputError
        When the gene list names genes that are not in the matrix, or no gene passes the rules.
    """
    totals = np.asarray(adata.X.sum(axis=0), dtype=np.float64).ravel()
    adata.var["total_counts"] = totals
    if genes is not None:
        source = genes if isinstance(genes, str | Path) else None
        names = read_gene_list(genes) if isinstance(genes, str | Path) else list(genes)
        selected = _match_genes(adata, names, source)
    else:
        if min_counts < 0 or n_top_genes < 1:
            raise ValueError("min_counts must be >= 0 and n_top_genes >= 1")
        passing = totals >= min_counts
        if not passing.any():
            raise InputError(
                adata.uns.get("undiffuse", {}).get("source"),
                f"no gene has at least {min_counts} counts; lower min_counts",
            )
        selected = np.zeros(adata.n_vars, dtype=bool)
        candidates = np.flatnonzero(passing)
        tissue_counts = adata[np.asarray(tissue, dtype=bool), candidates].copy()
        selected[candidates[highly_variable(tissue_counts, n_top_genes)]] = True
    adata.var["selected"] = selected
    return selected
