r"""A reference of cell types for the correction: its one reader, its profiles, and their table's reader and writer.

A reference is an ``.h5ad`` of single cells (or of a less-diffused spatial sample) whose ``obs`` column names
each cell's type (or each spot's domain). Its **profiles** are the mean expression of every gene in each type,

.. math::

    H^\text{ref}_{tg} = \frac{1}{|C_t|} \sum_{c \in C_t} x_{cg},

the programmes that the low-rank model of the correction (:func:`undiffuse.ot.programmes.deconvolve_programmes`)
keeps the shape of: a spot's true expression is then a non-negative mixture of the reference's cell types,
each gene scaled by its own factor (capture differs between platforms). The profiles are computed once
(:func:`reference_profiles`) and kept as a table of genes by types (``reference_profiles.tsv``,
:func:`write_profiles` / :func:`read_profiles`).
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from .atomic import atomic_path
from .errors import InputError

#: Default ``obs`` column of a reference's cell types.
DEFAULT_KEY = "cell_type"
#: Fewest cells of a type for its profile to be kept: a mean over fewer is mostly counting noise.
MIN_CELLS = 5
#: Index name of the profile table.
GENE_COLUMN = "gene"


def read_reference(path: str | PathLike[str], key: str = DEFAULT_KEY) -> pd.DataFrame:
    """Read a reference ``.h5ad`` and return its profiles (:func:`reference_profiles`).

    Raises
    ------
    InputError
        Naming ``path``: the file is missing or unreadable, has no column ``key``, holds negative or non-finite
        values, or fewer than two cell types with :data:`MIN_CELLS` cells.
    """
    from .io.h5ad import read_h5ad

    path = Path(path)
    adata = read_h5ad(
        path, "reference", fix="give an .h5ad of single cells with a cell-type column (reference: in config)"
    )
    return reference_profiles(adata, key, source=path)


def reference_profiles(
    adata: AnnData, key: str = DEFAULT_KEY, *, source: str | Path | None = None
) -> pd.DataFrame:
    """``(genes, types)`` mean expression of each gene in each cell type of a reference.

    Parameters
    ----------
    adata
        ``(cells, genes)`` reference: counts (or normalised values, not logarithms) in ``layers['counts']``
        when present, else ``X``; cell types in ``obs[key]``.
    key
        The ``obs`` column of the cell types. Cells without a type are left out, and so are types with fewer
        than :data:`MIN_CELLS` cells.
    source
        The file the reference came from, named in errors.

    Raises
    ------
    InputError
        As :func:`read_reference`.
    """
    if key not in adata.obs:
        columns = ", ".join(map(str, adata.obs.columns[:8])) or "none"
        raise InputError(
            source,
            f"the reference has no obs column {key!r} (its columns: {columns}); name the cell-type column "
            "with reference_key (--reference-key)",
        )
    values = adata.layers["counts"] if "counts" in adata.layers else adata.X
    values = sp.csr_matrix(values, dtype=np.float64)
    if not np.isfinite(values.data).all() or (values.data < 0).any():
        raise InputError(
            source,
            "the reference holds negative, NaN or infinite values; give counts or normalised expression",
        )
    labels = adata.obs[key]
    known = labels.notna().to_numpy()
    types = pd.Index(pd.unique(labels[known].astype(str)))
    codes = types.get_indexer(labels[known].astype(str))
    sizes = np.bincount(codes, minlength=len(types))
    kept = sizes >= MIN_CELLS
    if kept.sum() < 2:
        raise InputError(
            source,
            f"the reference needs at least two cell types in obs[{key!r}] with {MIN_CELLS} or more cells each "
            f"(it has {int(kept.sum())}); check the column or give a larger reference",
        )
    membership = sp.csr_matrix(
        (np.ones(len(codes)), (codes, np.arange(len(codes)))), shape=(len(types), len(codes))
    )
    sums = np.asarray((membership @ values[np.flatnonzero(known)]).todense())
    means = sums[kept] / sizes[kept, None]
    table = pd.DataFrame(
        means.T, index=pd.Index(adata.var_names.astype(str), name=GENE_COLUMN), columns=types[kept]
    )
    return table[~table.index.duplicated()]


def profiles_for(profiles: pd.DataFrame, genes: pd.Index, gene_ids: pd.Index | None = None) -> np.ndarray:
    """``(types, G)`` profiles of ``genes`` (matched by name, else by id), NaN for a gene the reference lacks."""
    position = profiles.index.get_indexer(genes)
    if gene_ids is not None:
        by_id = profiles.index.get_indexer(gene_ids)
        position = np.where(position >= 0, position, by_id)
    matrix = np.full((profiles.shape[1], len(genes)), np.nan)
    found = position >= 0
    matrix[:, found] = profiles.to_numpy(dtype=np.float64).T[:, position[found]]
    return matrix


def write_profiles(profiles: pd.DataFrame, path: str | PathLike[str]) -> None:
    """Write profiles as a tab-separated table (a gene per row, a type per column), atomically."""
    with atomic_path(path) as tmp:
        profiles.rename_axis(GENE_COLUMN).to_csv(tmp, sep="\t", float_format="%.8g")


def read_profiles(path: str | PathLike[str]) -> pd.DataFrame:
    """Read a table of :func:`write_profiles`; gene names such as ``NA`` stay text.

    Raises
    ------
    InputError
        The file is missing or is not such a table.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "reference profiles not found; rerun the workflow's reference_profiles step")
    try:
        table = pd.read_csv(
            path, sep="\t", index_col=0, dtype={0: str}, keep_default_na=False, na_values=[""]
        )
        table = table.astype(np.float64)
    except (ValueError, pd.errors.ParserError) as err:
        raise InputError(path, f"is not a table of reference profiles: {err}") from err
    if table.shape[1] < 2 or table.index.name != GENE_COLUMN:
        raise InputError(
            path, f"is not a table of reference profiles (a {GENE_COLUMN!r} column and two types)"
        )
    return table
