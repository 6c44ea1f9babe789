r"""Marker-based cell-type localisation, as the C3-Diff supplementary (section 4) defines it.

For cell type :math:`t` with marker genes :math:`I_t`, each marker's map :math:`X_k` is min-max scaled to
:math:`[0, 1]`,

.. math::

    \hat X_k = \frac{X_k - \min X_k}{\max X_k - \min X_k},

the type's score at spot :math:`i` is the mean over its markers, :math:`s_t^i = |I_t|^{-1} \sum_{k \in I_t}
\hat X_k^i`, and the spot's type is :math:`t^i_{\max} = \operatorname{argmax}_t s_t^i`, kept with its score
:math:`s^i_{\max} = \max_t s_t^i`. Applied before and after correction, it shows whether the correction
sharpens the anatomy.

Marker lists ship in ``undiffuse/markers/*.tsv``: a tab-separated table with the header ``cell_type	gene``,
one marker per row.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from anndata import AnnData

from .arrays import as_dense
from .errors import InputError
from .spatial import tissue_spots

#: Columns of a marker table.
MARKER_COLUMNS = ("cell_type", "gene")


def read_markers(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a marker table: TSV with the header ``cell_type<TAB>gene``, one marker per row.

    Returns
    -------
    DataFrame with columns ``cell_type`` and ``gene`` (strings, duplicates dropped, file order kept).

    Raises
    ------
    InputError
        The file is missing, lacks the two columns, or lists no marker.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "marker table not found")
    try:
        table = pd.read_csv(path, sep="\t", dtype=str, comment="#", keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise InputError(path, f"cannot parse the marker table as TSV: {err}") from err
    missing = [column for column in MARKER_COLUMNS if column not in table.columns]
    if missing:
        raise InputError(path, f"the marker table needs the header 'cell_type<TAB>gene'; missing {missing}")
    table = table[list(MARKER_COLUMNS)].apply(lambda column: column.str.strip())
    table = table[(table["cell_type"] != "") & (table["gene"] != "")].drop_duplicates(ignore_index=True)
    if table.empty:
        raise InputError(path, "the marker table lists no marker")
    return table


def marker_sets(markers: pd.DataFrame, genes: Sequence[str] | pd.Index) -> dict[str, list[str]]:
    """Markers of each cell type that are among ``genes``; types without any are dropped.

    Parameters
    ----------
    markers
        Table with columns ``cell_type`` and ``gene`` (:func:`read_markers`).
    genes
        Genes measured in the sample.

    Returns
    -------
    ``{cell_type: [genes]}`` in the order types first appear in ``markers``.
    """
    available = set(genes)
    sets: dict[str, list[str]] = {}
    for cell_type, gene in markers[list(MARKER_COLUMNS)].itertuples(index=False):
        if gene in available and gene not in sets.get(cell_type, []):
            sets.setdefault(cell_type, []).append(gene)
    return sets


def minmax_scale(values: np.ndarray) -> np.ndarray:
    r"""Scale each column to :math:`[0, 1]` by its minimum and maximum; a constant column becomes 0."""
    values = np.asarray(values, dtype=np.float64)
    low = values.min(axis=0, initial=np.inf) if values.size else np.zeros(values.shape[1:])
    span = (values.max(axis=0, initial=-np.inf) - low) if values.size else np.zeros(values.shape[1:])
    shifted = values - low
    return np.divide(shifted, span, out=np.zeros_like(shifted), where=span > 0)


def type_scores(
    values: np.ndarray, genes: Sequence[str] | pd.Index, sets: Mapping[str, Sequence[str]]
) -> pd.DataFrame:
    """Score of every cell type at every spot: the mean of its markers' min-max scaled maps.

    Parameters
    ----------
    values
        ``(N, G)`` expression maps of ``genes`` on the spots to type.
    genes
        Names of the columns of ``values``.
    sets
        ``{cell_type: markers}``, every marker among ``genes`` (:func:`marker_sets`).

    Returns
    -------
    ``(N, T)`` DataFrame of scores in ``[0, 1]``, one column per cell type.
    """
    column_of = {gene: k for k, gene in enumerate(genes)}
    if not sets:
        raise ValueError("no cell type has a marker among the genes")
    scaled = minmax_scale(values)
    scores = {
        cell_type: scaled[:, [column_of[g] for g in markers]].mean(axis=1)
        for cell_type, markers in sets.items()
    }
    return pd.DataFrame(scores)


def assign_types(scores: pd.DataFrame) -> pd.DataFrame:
    """The type of maximal score at each spot, with that score (ties go to the type listed first).

    Returns
    -------
    DataFrame with columns ``cell_type`` and ``score``, indexed like ``scores``.
    """
    best = np.argmax(scores.to_numpy(), axis=1)
    return pd.DataFrame(
        {
            "cell_type": scores.columns.to_numpy()[best].astype(str),
            "score": scores.to_numpy()[np.arange(len(best)), best],
        },
        index=scores.index,
    )


def localise_cell_types(
    adata: AnnData,
    markers: pd.DataFrame,
    *,
    layer: str | None = None,
    spots: np.ndarray | None = None,
) -> pd.DataFrame:
    """Cell type and score of each spot from marker genes (C3-Diff supplementary, section 4).

    Parameters
    ----------
    adata
        Spots x genes.
    markers
        Table with columns ``cell_type`` and ``gene``; markers absent from ``adata`` are ignored.
    layer
        Layer holding the expression (default ``X``).
    spots
        Boolean ``(N,)`` mask of the spots to type (default: all); the min-max scaling uses these spots only,
        so that background spots do not set the scale.

    Returns
    -------
    DataFrame indexed by the typed spots' names: ``cell_type``, ``score`` and one ``score_{type}`` column per
    cell type.
    """
    sets = marker_sets(markers, adata.var_names)
    if not sets:
        raise ValueError("none of the marker genes is measured in this sample")
    genes = sorted({gene for markers_of_type in sets.values() for gene in markers_of_type})
    view = adata[:, genes] if spots is None else adata[np.asarray(spots, dtype=bool), genes]
    matrix = view.X if layer is None else view.layers[layer]
    values = as_dense(matrix)
    scores = type_scores(values, genes, sets)
    scores.index = view.obs_names
    assigned = assign_types(scores)
    return assigned.join(scores.add_prefix("score_"))


def compare_cell_types(corrected: AnnData, markers: pd.DataFrame) -> pd.DataFrame:
    """Cell types of the tissue spots before and after correction (``X`` and ``layers['corrected']``).

    Returns
    -------
    DataFrame indexed by barcode (tissue spots): ``cell_type_raw``, ``score_raw``, ``cell_type_corrected``,
    ``score_corrected``.
    """
    tissue = tissue_spots(corrected)
    columns = {}
    for stage, layer in (("raw", None), ("corrected", "corrected")):
        typed = localise_cell_types(corrected, markers, layer=layer, spots=tissue)
        columns[f"cell_type_{stage}"] = typed["cell_type"]
        columns[f"score_{stage}"] = typed["score"]
    table = pd.DataFrame(columns)
    table.index.name = "barcode"
    return table
