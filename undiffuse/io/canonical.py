"""Assembly of the canonical AnnData that every reader returns (docs/architecture.md)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from ..errors import InputError
from ..spatial import SPATIAL_KEY, spot_pitch
from ..validate import unique_gene_names

#: Spot diameter over spot pitch: 55 um spots on a 100 um lattice (Visium); bins tile the plane (HD).
SPOT_DIAMETER_PER_PITCH = {"visium": 0.55, "visium_hd": 1.0}

#: Fiducial over spot diameter in Space Ranger's scale factors; only used to fill a missing value.
FIDUCIAL_PER_SPOT_DIAMETER = 1.6154

PLATFORMS = ("visium", "visium_hd")


def default_scalefactors(pitch_px: float, platform: str) -> dict[str, float]:
    """Scale factors for a sample without ``scalefactors_json.json``, derived from the spot pitch.

    The image scale factors are 1 because there is no image to place.
    """
    diameter = SPOT_DIAMETER_PER_PITCH[platform] * pitch_px
    return {
        "spot_diameter_fullres": diameter,
        "fiducial_diameter_fullres": FIDUCIAL_PER_SPOT_DIAMETER * diameter,
        "tissue_hires_scalef": 1.0,
        "tissue_lowres_scalef": 1.0,
    }


#: Array-column steps between adjacent spots: Visium's hexagonal lattice skips every other column.
ARRAY_COLUMNS_PER_PITCH = {"visium": 2, "visium_hd": 1}


def lattice_pitch(
    array_row: np.ndarray, array_col: np.ndarray, coords_xy: np.ndarray, platform: str
) -> float | None:
    """Spot pitch from the affine map between array indices and pixels, or None when it cannot be fitted.

    Unlike the nearest-neighbour distance, this is right for any subset of the lattice (a filtered matrix
    of scattered bins, a cropped fixture).
    """
    design = np.column_stack([array_row, array_col, np.ones(len(array_row))]).astype(np.float64)
    if design.shape[0] < 4 or np.linalg.matrix_rank(design) < 3:
        return None
    affine, *_ = np.linalg.lstsq(design, coords_xy, rcond=None)
    pitch = ARRAY_COLUMNS_PER_PITCH[platform] * float(np.linalg.norm(affine[1]))
    residual = np.sqrt(np.mean(np.sum((design @ affine - coords_xy) ** 2, axis=1)))
    if not np.isfinite(pitch) or pitch <= 0 or residual > 0.25 * pitch:
        return None
    return pitch


def measure_pitch(
    coords_xy: np.ndarray,
    source: str | Path,
    *,
    array_row: np.ndarray | None = None,
    array_col: np.ndarray | None = None,
    platform: str = "visium",
) -> float:
    """Spot pitch in full-resolution pixels.

    The nearest-neighbour distance (:func:`undiffuse.spatial.spot_pitch`) overestimates the pitch when only
    a scattered subset of spots is present; the array indices then give the lattice's own pitch. The
    smaller of the two is used, which is the pitch in both cases.

    Raises
    ------
    InputError
        Naming ``source`` when the coordinates are degenerate.
    """
    try:
        pitch = spot_pitch(coords_xy)
    except ValueError as err:
        raise InputError(source, f"spot coordinates are unusable: {err}") from err
    if array_row is not None and array_col is not None:
        from_lattice = lattice_pitch(array_row, array_col, coords_xy, platform)
        if from_lattice is not None:
            pitch = min(pitch, from_lattice)
    return pitch


def build_canonical(
    *,
    counts: sp.spmatrix,
    barcodes: pd.Index,
    gene_ids: np.ndarray,
    gene_names: np.ndarray,
    feature_types: np.ndarray,
    in_tissue: np.ndarray,
    array_row: np.ndarray,
    array_col: np.ndarray,
    coords_xy: np.ndarray,
    images: Mapping[str, np.ndarray],
    scalefactors: Mapping[str, float],
    metadata: Mapping[str, str],
    sample_id: str,
    platform: str,
    source: str | Path,
    extra: Mapping[str, object] | None = None,
) -> AnnData:
    """Put the parts of a sample together in the canonical layout.

    ``coords_xy`` are full-resolution pixels ``(pxl_col, pxl_row)``. ``extra`` adds keys to
    ``uns['undiffuse']``.
    """
    if platform not in PLATFORMS:
        raise ValueError(f"unknown platform {platform!r}")
    coords_xy = np.asarray(coords_xy, dtype=np.float64)
    obs = pd.DataFrame(
        {
            "in_tissue": np.asarray(in_tissue, dtype=bool),
            "array_row": np.asarray(array_row, dtype=np.int64),
            "array_col": np.asarray(array_col, dtype=np.int64),
        },
        index=pd.Index(np.asarray(barcodes, dtype=str), name=None),
    )
    var = pd.DataFrame(
        {
            "gene_ids": np.asarray(gene_ids, dtype=str),
            "feature_types": np.asarray(feature_types, dtype=str),
        },
        index=unique_gene_names(np.asarray(gene_names, dtype=str), source),
    )
    matrix = sp.csr_matrix(counts, dtype=np.float32)
    matrix.sort_indices()
    adata = AnnData(X=matrix, obs=obs, var=var)
    adata.obsm[SPATIAL_KEY] = coords_xy
    adata.uns[SPATIAL_KEY] = {
        sample_id: {
            "images": {key: np.asarray(value, dtype=np.float32) for key, value in images.items()},
            "scalefactors": {key: float(value) for key, value in scalefactors.items()},
            "metadata": {key: str(value) for key, value in metadata.items()},
        }
    }
    adata.uns["undiffuse"] = {
        "sample_id": sample_id,
        "platform": platform,
        "spot_pitch_px": measure_pitch(
            coords_xy,
            source,
            array_row=obs["array_row"].to_numpy(),
            array_col=obs["array_col"].to_numpy(),
            platform=platform,
        ),
        "source": str(source),
        **(dict(extra) if extra else {}),
    }
    return adata


def library(adata: AnnData) -> dict:
    """``adata.uns['spatial'][sample_id]`` of a canonical AnnData."""
    return adata.uns[SPATIAL_KEY][adata.uns["undiffuse"]["sample_id"]]
