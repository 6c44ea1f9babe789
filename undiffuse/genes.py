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

from .errors import ConfigError, InputError

if TYPE_CHECKING:
    from anndata import AnnData

# pandas and scanpy are imported where used, so that the CLI can read the defaults below without them.

DEFAULT_MIN_COUNTS = 100
DEFAULT_N_TOP_GENES = 2000

#: Unknown genes named in an error message, at most.
_LISTED = 10


def read_gene_list(path: str | Path) -> list[str]:
    """Genes of a text file, one per line (names or ids); blank lines and ``#`` comments are ignored.

    The one parser of gene lists: ``undiffuse prepare --genes``, ``undiffuse correct --genes-file`` and the
    sample sheet's ``genes`` column all read their file with it.

    Raises
    ------
    InputError
        When the file is missing, not UTF-8 text, names no gene, or names a gene twice.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(
            path, "file does not exist" if not path.exists() else "is a folder, not a gene list file"
        )
    try:
        lines = path.read_bytes().decode("utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise InputError(
            path,
            f"is not UTF-8 text (byte {err.start}): a gene list is a text file with one gene name or id per "
            "line; save it as plain UTF-8 text",
        ) from err
    except OSError as err:
        raise InputError(path, f"cannot be read: {err.strerror or err}") from err
    genes = [line.split("#", 1)[0].strip().lstrip("\ufeff") for line in lines]
    genes = [gene for gene in genes if gene]
    if not genes:
        raise InputError(path, "names no gene (expected one gene name or id per line; '#' starts a comment)")
    repeated = sorted({gene for gene in genes if genes.count(gene) > 1})
    if repeated:
        shown = ", ".join(repeated[:_LISTED]) + (" ..." if len(repeated) > _LISTED else "")
        raise InputError(path, f"names {shown} more than once; list each gene once")
    return genes


def selected_genes(adata: AnnData) -> list[str]:
    """The genes to correct by default: those of ``var['selected']`` (:func:`select_genes`) when the sample
    has the column, else all genes."""
    if "selected" in adata.var:
        return adata.var_names[adata.var["selected"].to_numpy(dtype=bool)].tolist()
    return adata.var_names.tolist()


def resolve_genes(adata: AnnData, genes: list[str] | str | Path, *, option: str = "genes") -> list[str]:
    """Gene names of ``adata`` for a gene list: a file (:func:`read_gene_list`) or a list of names or ids.

    Errors name the file, or ``option`` for a list given directly (e.g. ``--genes``).
    """
    from .validate import check_genes

    if isinstance(genes, str | Path):
        return check_genes(read_gene_list(genes), adata, genes, what="the gene list")
    return check_genes(list(genes), adata, None, what=option)


def check_selection_options(min_counts: int, n_top_genes: int) -> None:
    """``min_counts`` >= 0 and ``n_top_genes`` >= 1, both integers; :class:`ConfigError` otherwise."""
    problems = []
    for name, value, minimum in (
        ("min_counts (--min-counts)", min_counts, 0),
        ("n_top_genes (--n-top-genes)", n_top_genes, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            problems.append(f"{name} must be an integer, got {value!r}")
        elif value < minimum:
            problems.append(f"{name} must be at least {minimum}, got {value}")
    if problems:
        raise ConfigError("; ".join(problems))


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
        selected = np.asarray(adata.var_names.isin(resolve_genes(adata, genes)))
    else:
        check_selection_options(min_counts, n_top_genes)
        passing = totals >= min_counts
        if not passing.any():
            raise InputError(
                adata.uns.get("undiffuse", {}).get("source"),
                f"no gene has at least {min_counts} counts (min_counts); the most expressed gene has "
                f"{totals.max():.0f}: lower --min-counts (min_counts) to at most that, or give a gene list",
            )
        selected = np.zeros(adata.n_vars, dtype=bool)
        candidates = np.flatnonzero(passing)
        tissue_counts = adata[np.asarray(tissue, dtype=bool), candidates].copy()
        selected[candidates[highly_variable(tissue_counts, n_top_genes)]] = True
    adata.var["selected"] = selected
    return selected
