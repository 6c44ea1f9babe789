"""Writers of 10x Genomics files: the HDF5 feature-barcode matrix and the Space Ranger ``spatial/`` folder.

The simulator writes its samples with these, and reader tests use them to build small Space Ranger outputs
of any layout. Every file is written through :func:`~undiffuse.atomic.atomic_path` and carries no timestamp,
so that equal inputs give byte-identical files.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Literal

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from PIL import Image

from ..atomic import atomic_path

#: Columns of a Space Ranger tissue positions table, in file order.
POSITION_COLUMNS = (
    "barcode",
    "in_tissue",
    "array_row",
    "array_col",
    "pxl_row_in_fullres",
    "pxl_col_in_fullres",
)

#: Keys of ``scalefactors_json.json`` that a Visium (not HD) sample must have.
SCALEFACTOR_KEYS = (
    "spot_diameter_fullres",
    "tissue_hires_scalef",
    "tissue_lowres_scalef",
    "fiducial_diameter_fullres",
)

#: ``spaceranger2``: ``tissue_positions.csv`` with a header; ``spaceranger1``: ``tissue_positions_list.csv``
#: without one; ``parquet``: ``tissue_positions.parquet`` as Visium HD writes it.
PositionsLayout = Literal["spaceranger2", "spaceranger1", "parquet"]

_POSITIONS_FILE = {
    "spaceranger2": "tissue_positions.csv",
    "spaceranger1": "tissue_positions_list.csv",
    "parquet": "tissue_positions.parquet",
}

_GZIP_LEVEL = 4


def _fixed_bytes(values: Sequence[str] | np.ndarray) -> np.ndarray:
    """Fixed-length ASCII byte strings, as Cell Ranger stores its string datasets.

    A NumPy bytes array (``S`` dtype) passes through unchanged, so that the millions of barcodes of a
    Visium HD 2 um matrix need not become Python strings.
    """
    if isinstance(values, np.ndarray) and values.dtype.kind == "S":
        return values
    encoded = [str(v).encode("ascii") for v in values]
    width = max((len(v) for v in encoded), default=1)
    return np.array(encoded, dtype=f"S{max(width, 1)}")


def write_10x_h5(
    path: str | PathLike[str],
    counts: sp.spmatrix | sp.sparray,
    barcodes: Sequence[str],
    gene_ids: Sequence[str],
    gene_names: Sequence[str],
    *,
    feature_type: str = "Gene Expression",
    genome: str = "sim",
    library_id: str = "simulated",
    chemistry: str = "Spatial 3' v1",
) -> Path:
    """Write a feature-barcode matrix in the 10x HDF5 layout of Cell/Space Ranger 3 and later.

    The file holds group ``matrix`` with ``barcodes``, ``data``, ``indices``, ``indptr``, ``shape`` =
    ``(n_genes, n_barcodes)`` and ``features/{_all_tag_keys, feature_type, genome, id, name}``: the matrix is
    stored genes x barcodes in compressed sparse columns, one column per barcode, which is the compressed
    sparse rows of the ``spots x genes`` matrix given here.

    Parameters
    ----------
    path
        Output ``.h5`` file.
    counts
        ``(n_barcodes, n_genes)`` non-negative integer UMI counts (any SciPy sparse format).
    barcodes, gene_ids, gene_names
        Row and column labels of ``counts``.
    feature_type, genome, library_id, chemistry
        Written to ``features/feature_type``, ``features/genome`` and the file attributes.

    Returns
    -------
    ``path``.
    """
    csr = sp.csr_matrix(counts, copy=True)
    csr.sum_duplicates()
    csr.sort_indices()
    n_barcodes, n_genes = csr.shape
    if len(barcodes) != n_barcodes or len(gene_ids) != n_genes or len(gene_names) != n_genes:
        raise ValueError(
            f"labels do not fit the {n_barcodes} x {n_genes} matrix: {len(barcodes)} barcodes, "
            f"{len(gene_ids)} gene ids, {len(gene_names)} gene names"
        )
    data = csr.data
    if data.size and (not np.all(np.isfinite(data)) or data.min() < 0 or np.any(data != np.round(data))):
        raise ValueError("counts must be finite non-negative integers")
    compressed = dict(compression="gzip", compression_opts=_GZIP_LEVEL, shuffle=True)
    path = Path(path)
    with atomic_path(path) as tmp, h5py.File(tmp, "w", track_order=False) as handle:
        handle.attrs["filetype"] = "matrix"
        handle.attrs["version"] = np.int64(2)
        handle.attrs["library_ids"] = _fixed_bytes([library_id])
        handle.attrs["original_gem_groups"] = np.array([1], dtype=np.int64)
        handle.attrs["chemistry_description"] = chemistry
        group = handle.create_group("matrix")
        group.create_dataset("barcodes", data=_fixed_bytes(barcodes))
        group.create_dataset("data", data=data.astype(np.int32), **compressed)
        group.create_dataset("indices", data=csr.indices.astype(np.int64), **compressed)
        group.create_dataset("indptr", data=csr.indptr.astype(np.int64), **compressed)
        group.create_dataset("shape", data=np.array([n_genes, n_barcodes], dtype=np.int32))
        features = group.create_group("features")
        features.create_dataset("_all_tag_keys", data=_fixed_bytes(["genome"]))
        features.create_dataset("feature_type", data=_fixed_bytes([feature_type] * n_genes))
        features.create_dataset("genome", data=_fixed_bytes([genome] * n_genes))
        features.create_dataset("id", data=_fixed_bytes(gene_ids))
        features.create_dataset("name", data=_fixed_bytes(gene_names))
    return path


def _as_rgb8(image: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` uint8 from uint8 or from floats in ``[0, 1]``."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {image.shape}")
    if image.dtype == np.uint8:
        return image
    if not np.all(np.isfinite(image)):
        raise ValueError("image holds NaN or Inf")
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def write_png(path: str | PathLike[str], image: np.ndarray) -> Path:
    """Write an RGB image as PNG (no timestamp or other varying metadata)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(_as_rgb8(image), mode="RGB").save(tmp, format="PNG", compress_level=6)
    return path


def _write_parquet(path: Path, table: pd.DataFrame) -> None:
    """Positions as Parquet with a string barcode column, whether the barcodes are ``str`` or ``bytes``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    barcodes = table["barcode"].to_numpy()
    if barcodes.dtype == object and len(barcodes) and isinstance(barcodes[0], bytes):
        barcodes = barcodes.astype(bytes)
    # Arrow casts bytes to strings in one pass (millions of HD bins), instead of decoding one by one.
    columns = {"barcode": pa.array(barcodes)}
    if pa.types.is_binary(columns["barcode"].type):
        columns["barcode"] = columns["barcode"].cast(pa.string())
    columns.update({name: pa.array(table[name].to_numpy()) for name in table.columns if name != "barcode"})
    pq.write_table(pa.table(columns), path)


def write_spatial(
    spatial_dir: str | PathLike[str],
    positions: pd.DataFrame,
    scalefactors: Mapping[str, float],
    *,
    hires_image: np.ndarray | None = None,
    lowres_image: np.ndarray | None = None,
    layout: PositionsLayout = "spaceranger2",
) -> Path:
    """Write a Space Ranger ``spatial/`` folder: spot positions, scale factors and tissue images.

    Parameters
    ----------
    spatial_dir
        The ``spatial`` folder (created if needed; existing files of the same names are replaced).
    positions
        One row per barcode with the columns of :data:`POSITION_COLUMNS` (``barcode`` may instead be the
        index). Written in the given row order.
    scalefactors
        Written as ``scalefactors_json.json``, keys sorted.
    hires_image, lowres_image
        ``(H, W, 3)`` RGB, uint8 or floats in ``[0, 1]``; written as ``tissue_hires_image.png`` and
        ``tissue_lowres_image.png`` when given.
    layout
        Format of the positions file, see :data:`PositionsLayout`.

    Returns
    -------
    ``spatial_dir``.
    """
    if layout not in _POSITIONS_FILE:
        raise ValueError(f"unknown positions layout {layout!r}; expected one of {sorted(_POSITIONS_FILE)}")
    table = positions if "barcode" in positions.columns else positions.rename_axis("barcode").reset_index()
    missing = [column for column in POSITION_COLUMNS if column not in table.columns]
    if missing:
        raise ValueError(f"positions lack the columns {missing}")
    table = table.loc[:, list(POSITION_COLUMNS)].copy()
    table["in_tissue"] = table["in_tissue"].astype(np.int64)
    spatial_dir = Path(spatial_dir)
    spatial_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(spatial_dir / _POSITIONS_FILE[layout]) as tmp:
        if layout == "parquet":
            _write_parquet(tmp, table)
        else:
            table.to_csv(tmp, index=False, header=layout == "spaceranger2", lineterminator="\n")
    with atomic_path(spatial_dir / "scalefactors_json.json") as tmp:
        tmp.write_text(json.dumps({key: float(value) for key, value in scalefactors.items()}, sort_keys=True))
    if hires_image is not None:
        write_png(spatial_dir / "tissue_hires_image.png", hires_image)
    if lowres_image is not None:
        write_png(spatial_dir / "tissue_lowres_image.png", lowres_image)
    return spatial_dir


def write_spaceranger_outs(
    outs_dir: str | PathLike[str],
    counts: sp.spmatrix | sp.sparray,
    barcodes: Sequence[str],
    gene_ids: Sequence[str],
    gene_names: Sequence[str],
    positions: pd.DataFrame,
    scalefactors: Mapping[str, float],
    *,
    hires_image: np.ndarray | None = None,
    lowres_image: np.ndarray | None = None,
    layout: PositionsLayout = "spaceranger2",
    library_id: str = "simulated",
) -> Path:
    """Write a whole Space Ranger ``outs/`` folder at once: ``raw_feature_bc_matrix.h5`` and ``spatial/``.

    The folder appears only when complete and replaces an older one. Arguments as in :func:`write_10x_h5`
    and :func:`write_spatial`.
    """
    outs_dir = Path(outs_dir)
    with atomic_path(outs_dir, directory=True) as tmp:
        write_10x_h5(
            tmp / "raw_feature_bc_matrix.h5", counts, barcodes, gene_ids, gene_names, library_id=library_id
        )
        write_spatial(
            tmp / "spatial",
            positions,
            scalefactors,
            hires_image=hires_image,
            lowres_image=lowres_image,
            layout=layout,
        )
    return outs_dir


#: Chemistry written into the matrices of a Visium HD sample.
HD_CHEMISTRY = "Visium HD v1"
#: File format of the HD layout that Space Ranger 3 declares in ``feature_slice.h5``.
HD_LAYOUT_FORMAT = "1.0"


def write_hd_feature_slice(path: str | PathLike[str]) -> Path:
    """Write ``outs/feature_slice.h5`` with its ``metadata_json`` attribute only.

    Space Ranger also stores the 2 um matrix there in slices; the simulator writes just the metadata that
    names the layout's file format, which is what readers of the bin folders (spatialdata-io) check.
    """
    path = Path(path)
    metadata = {"hd_layout_json": json.dumps({"file_format": HD_LAYOUT_FORMAT})}
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as handle:
        handle.attrs["metadata_json"] = json.dumps(metadata)
    return path


def write_hd_bin_folder(
    bin_dir: str | PathLike[str],
    counts: sp.spmatrix | sp.sparray,
    barcodes: Sequence[str] | np.ndarray,
    gene_ids: Sequence[str],
    gene_names: Sequence[str],
    positions: pd.DataFrame,
    scalefactors: Mapping[str, float],
    *,
    hires_image: np.ndarray | None = None,
    lowres_image: np.ndarray | None = None,
    library_id: str = "simulated",
) -> Path:
    """Write one Visium HD ``binned_outputs/square_XXXum/`` folder as Space Ranger lays it out.

    The folder holds ``raw_feature_bc_matrix.h5`` (every bin of the capture area),
    ``filtered_feature_bc_matrix.h5`` (the bins with ``in_tissue``) and ``spatial/`` with
    ``tissue_positions.parquet``, ``scalefactors_json.json`` and the images. The caller makes the whole
    ``binned_outputs`` folder atomic; each file here is written through ``atomic_path`` as well.

    Parameters
    ----------
    bin_dir
        The ``square_XXXum`` folder.
    counts
        ``(n_bins, n_genes)`` non-negative integer UMI counts of all bins, in ``barcodes`` order.
    barcodes
        Bin barcodes (``s_008um_00012_00034-1``), as strings or a NumPy bytes array.
    gene_ids, gene_names
        Feature labels.
    positions
        One row per bin, in ``barcodes`` order, with the columns of :data:`POSITION_COLUMNS`.
    scalefactors
        HD scale factors (``bin_size_um``, ``microns_per_pixel``, ``spot_diameter_fullres``, ...).
    hires_image, lowres_image, library_id
        As in :func:`write_spaceranger_outs`.

    Returns
    -------
    ``bin_dir``.
    """
    bin_dir = Path(bin_dir)
    csr = sp.csr_matrix(counts)
    if len(positions) != csr.shape[0]:
        raise ValueError(f"{len(positions)} positions for {csr.shape[0]} bins")
    options = dict(library_id=library_id, chemistry=HD_CHEMISTRY)
    write_10x_h5(bin_dir / "raw_feature_bc_matrix.h5", csr, barcodes, gene_ids, gene_names, **options)
    in_tissue = np.flatnonzero(positions["in_tissue"].to_numpy().astype(bool))
    barcodes = barcodes if isinstance(barcodes, np.ndarray) else np.asarray(barcodes, dtype=object)
    write_10x_h5(
        bin_dir / "filtered_feature_bc_matrix.h5",
        csr[in_tissue],
        barcodes[in_tissue],
        gene_ids,
        gene_names,
        **options,
    )
    write_spatial(
        bin_dir / "spatial",
        positions,
        scalefactors,
        hires_image=hires_image,
        lowres_image=lowres_image,
        layout="parquet",
    )
    return bin_dir
