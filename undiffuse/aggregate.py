r"""Aggregate Visium HD bins: fine bins into coarser square bins, or into cells of a segmentation.

What users do after correcting 2 um bins (as bin2cell does with raw ones): sum them into 8 or 16 um bins, or
into cells. Both are sums, so every gene's total over the assigned bins is kept, in ``X`` and in every
layer (raw counts and corrected values alike).

- **Bins.** A bin at lattice index :math:`(r, c)` of size :math:`s` falls in the bin
  :math:`(\lfloor r / k \rfloor, \lfloor c / k \rfloor)` of size :math:`k s`: Space Ranger's own binning
  (its 8 and 16 um bins are sums of 2 um bins in exactly this way). A coarse bin is in tissue when any of its
  bins is, so no corrected mass is left outside tissue.
- **Cells.** Each bin takes the label of the segmentation at its centre (a bin-to-cell table, or a label
  image in full-resolution pixels, 0 for no cell); a cell is the sum of its bins, placed at their mean
  position. The share of each layer's mass on bins in no cell is recorded.

Shapes: ``N`` bins, ``B`` coarse bins or cells, ``G`` genes.
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from .arrays import group_indicator
from .errors import InputError
from .io.visium_hd import hd_barcodes
from .qc import is_visium_hd, spot_pitch_um
from .spatial import SPATIAL_KEY

#: Boolean obs columns carried to aggregates: true when any of their bins is.
MASK_COLUMNS = ("in_tissue", "tissue")
#: Label-image formats read by :func:`read_cell_labels`; other suffixes are read as tables.
IMAGE_SUFFIXES = (".npy", ".tif", ".tiff", ".png")


def _source(adata: AnnData) -> str | None:
    return adata.uns.get("undiffuse", {}).get("source")


def _sum_groups(adata: AnnData, labels: np.ndarray, n_groups: int, obs: pd.DataFrame) -> AnnData:
    """``(B, G)`` sums of ``X`` and every layer over the bins of each group (``labels`` -1: none)."""
    indicator = group_indicator(labels, n_groups)

    # Sums in float64: a cell or 16 um bin sums up to 64 bins of corrected float32 values.
    def total(matrix) -> sp.csr_matrix | np.ndarray:
        summed = indicator @ (matrix.astype(np.float64) if sp.issparse(matrix) else np.asarray(matrix, float))
        return sp.csr_matrix(summed, dtype=np.float32) if sp.issparse(matrix) else summed.astype(np.float32)

    counts = np.asarray(indicator.sum(axis=1)).ravel()
    coords = np.asarray(adata.obsm[SPATIAL_KEY], dtype=np.float64)
    out = AnnData(
        X=total(adata.X),
        obs=obs,
        var=adata.var.copy(),
        layers={name: total(layer) for name, layer in adata.layers.items()},
        varm={name: np.asarray(value).copy() for name, value in adata.varm.items()},
        uns=dict(adata.uns),
    )
    out.obsm[SPATIAL_KEY] = (indicator @ coords) / np.maximum(counts, 1)[:, None]
    out.obs["n_bins"] = counts.astype(np.int64)
    for column in MASK_COLUMNS:
        if column in adata.obs.columns:
            flags = adata.obs[column].to_numpy(dtype=bool).astype(np.float64)
            out.obs[column] = (indicator @ flags) > 0
    return out


def _with_provenance(out: AnnData, adata: AnnData, record: dict) -> AnnData:
    info = dict(adata.uns.get("undiffuse", {}))
    info["aggregation"] = record
    out.uns["undiffuse"] = info
    return out


def aggregate_bins(adata: AnnData, bin_size_um: int) -> AnnData:
    """Sum square bins into bins ``bin_size_um`` a side (a multiple of the sample's bin size).

    Parameters
    ----------
    adata
        A Visium HD sample (canonical layout: ``obs['array_row']``, ``obs['array_col']``,
        ``obsm['spatial']``), raw, prepared or corrected.
    bin_size_um
        Size of the coarse bins in microns, e.g. 8 or 16 from 2 um bins.

    Returns
    -------
    AnnData
        ``(B, G)`` coarse bins in Space Ranger's barcode format (``s_008um_00012_00034-1``), row-major, with
        ``X`` and every layer summed, ``obs`` ``array_row``, ``array_col``, ``n_bins`` and the tissue flags,
        ``obsm['spatial']`` the mean position of their bins, the scale factors of the new size, and
        ``uns['undiffuse']['aggregation']``.

    Raises
    ------
    InputError
        When the sample is not Visium HD, or ``bin_size_um`` is not a larger multiple of its bin size.
    """
    source = _source(adata)
    if not is_visium_hd(adata):
        raise InputError(source, "is not a Visium HD sample; only square HD bins can be aggregated")
    fine_um = spot_pitch_um(adata)
    factor = int(round(bin_size_um / fine_um))
    if factor < 2 or abs(factor * fine_um - bin_size_um) > 1e-6:
        raise InputError(
            source,
            f"holds {fine_um:g} um bins, which cannot be summed into {bin_size_um} um bins; give a bin size "
            f"that is a multiple of {fine_um:g} um and larger",
        )
    rows = adata.obs["array_row"].to_numpy(dtype=np.int64) // factor
    cols = adata.obs["array_col"].to_numpy(dtype=np.int64) // factor
    width = int(cols.max()) + 1
    unique_keys, labels = np.unique(rows * width + cols, return_inverse=True)
    coarse_rows, coarse_cols = np.divmod(unique_keys, width)
    obs = pd.DataFrame(
        {"array_row": coarse_rows, "array_col": coarse_cols},
        index=pd.Index(hd_barcodes(int(bin_size_um), coarse_rows, coarse_cols).astype(str)),
    )
    out = _sum_groups(adata, labels.reshape(-1), unique_keys.size, obs)
    info = adata.uns.get("undiffuse", {})
    sample_id = info.get("sample_id")
    if sample_id is not None and sample_id in adata.uns.get(SPATIAL_KEY, {}):
        library = dict(adata.uns[SPATIAL_KEY][sample_id])
        scalefactors = dict(library.get("scalefactors", {}))
        scalefactors["bin_size_um"] = float(bin_size_um)
        if "spot_diameter_fullres" in scalefactors:
            scalefactors["spot_diameter_fullres"] = float(scalefactors["spot_diameter_fullres"]) * factor
        out.uns[SPATIAL_KEY] = {
            **adata.uns[SPATIAL_KEY],
            sample_id: {**library, "scalefactors": scalefactors},
        }
    out = _with_provenance(out, adata, {"kind": "bins", "from_um": fine_um, "to_um": float(bin_size_um)})
    if "spot_pitch_px" in info:
        out.uns["undiffuse"]["spot_pitch_px"] = float(info["spot_pitch_px"]) * factor
    return out


def aggregate_cells(adata: AnnData, cell_of_bin: pd.Series) -> AnnData:
    """Sum bins into cells.

    Parameters
    ----------
    adata
        A Visium HD sample, raw, prepared or corrected (usually 2 um bins).
    cell_of_bin
        The cell of each bin, indexed by barcode (e.g. from :func:`read_cell_labels`); bins that are absent,
        missing or labelled ``""`` belong to no cell.

    Returns
    -------
    AnnData
        ``(cells, G)``: ``X`` and every layer summed over each cell's bins, ``obs['n_bins']`` and the tissue
        flags, ``obsm['spatial']`` the mean position of its bins, and in
        ``uns['undiffuse']['aggregation']`` the share of each matrix's total on bins in no cell.
    """
    labels_text = cell_of_bin.reindex(adata.obs_names)
    missing = labels_text.isna() | labels_text.astype(str).eq("")
    names, codes = np.unique(labels_text[~missing].astype(str).to_numpy(), return_inverse=True)
    if names.size == 0:
        raise InputError(
            _source(adata),
            "no bin belongs to a cell of the segmentation; check that it labels this sample's barcodes or "
            "full-resolution image",
        )
    labels = np.full(adata.n_obs, -1, dtype=np.int64)
    labels[np.flatnonzero(~missing.to_numpy())] = codes.reshape(-1)
    out = _sum_groups(adata, labels, names.size, pd.DataFrame(index=pd.Index(names, name=None)))
    unassigned = {}
    for name, matrix in [("X", adata.X), *adata.layers.items()]:
        per_bin = np.asarray(matrix.sum(axis=1)).ravel()
        grand = float(per_bin.sum())
        unassigned[name] = float(per_bin[labels < 0].sum() / grand) if grand > 0 else 0.0
    record = {"kind": "cells", "n_cells": int(names.size), "unassigned_share": unassigned}
    return _with_provenance(out, adata, record)


def read_cell_labels(path: str | PathLike[str], adata: AnnData) -> pd.Series:
    """The cell of each bin of ``adata`` from a user's segmentation.

    Two forms are read:

    - a table (``.csv``, ``.tsv``, ``.parquet``) with columns ``barcode`` and ``cell_id``, one bin a row;
    - a label image (``.npy``, ``.tif``, ``.png``) in the sample's full-resolution pixels (the frame of
      ``obsm['spatial']``), 0 where there is no cell; a bin takes the label under its centre.

    Returns
    -------
    Series
        The cell id (a string) of every bin of ``adata`` with one, indexed by barcode.

    Raises
    ------
    InputError
        Naming the file: unreadable, missing columns, or labelling none of the sample's bins.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "segmentation not found; give a bin-to-cell table or a label image")
    if path.suffix.lower() in IMAGE_SUFFIXES:
        labels = _labels_from_image(path, adata)
    else:
        labels = _labels_from_table(path)
    labels = labels[labels.index.isin(adata.obs_names)]
    if labels.empty:
        raise InputError(
            path,
            "labels none of the sample's bins; a table must name its barcodes (e.g. s_002um_00012_00034-1) "
            "and an image must be in its full-resolution pixels",
        )
    return labels


def _labels_from_table(path: Path) -> pd.Series:
    try:
        if path.suffix.lower() == ".parquet":
            table = pd.read_parquet(path)
        else:
            sep = "\t" if path.suffix.lower() in (".tsv", ".txt") else ","
            table = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    except Exception as err:  # pandas and pyarrow raise many kinds on a damaged file
        raise InputError(path, f"cannot read it as a bin-to-cell table: {err}") from err
    absent = [column for column in ("barcode", "cell_id") if column not in table.columns]
    if absent:
        raise InputError(
            path,
            f"lacks the column(s) {', '.join(absent)} (it has {', '.join(map(str, table.columns))}); a "
            "bin-to-cell table has one bin a row with columns barcode and cell_id",
        )
    if table["barcode"].duplicated().any():
        duplicate = table["barcode"][table["barcode"].duplicated()].iloc[0]
        raise InputError(path, f"lists the bin {duplicate} more than once; give each bin one cell")
    return pd.Series(table["cell_id"].astype(str).to_numpy(), index=table["barcode"].astype(str).to_numpy())


def _labels_from_image(path: Path, adata: AnnData) -> pd.Series:
    try:
        if path.suffix.lower() == ".npy":
            image = np.load(path, allow_pickle=False)
        else:
            from PIL import Image

            with Image.open(path) as opened:
                image = np.asarray(opened)
    except Exception as err:  # NumPy and PIL raise many kinds on a damaged file
        raise InputError(path, f"cannot read it as a label image: {err}") from err
    if image.ndim != 2 or not np.issubdtype(image.dtype, np.integer):
        raise InputError(
            path, f"is a {image.dtype} image of shape {image.shape}; a label image has one integer channel"
        )
    centres = np.rint(np.asarray(adata.obsm[SPATIAL_KEY], dtype=np.float64)).astype(np.int64)
    col, row = centres[:, 0], centres[:, 1]
    inside = (row >= 0) & (row < image.shape[0]) & (col >= 0) & (col < image.shape[1])
    labels = np.zeros(adata.n_obs, dtype=np.int64)
    labels[inside] = image[row[inside], col[inside]]
    keep = labels > 0
    return pd.Series(labels[keep].astype(str), index=adata.obs_names[keep])
