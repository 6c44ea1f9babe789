"""AnnData files in scanpy's Visium layout (``sc.read_visium`` output or a ``prepared.h5ad``) -> canonical."""

from __future__ import annotations

from os import PathLike
from pathlib import Path

import anndata
import numpy as np
import scipy.sparse as sp
from anndata import AnnData

from ..errors import InputError
from ..spatial import SPATIAL_KEY
from ..validate import (
    check_counts,
    check_not_empty,
    check_prepared,
    check_registration,
    check_unique_barcodes,
)
from .canonical import PLATFORMS, build_canonical, default_scalefactors, measure_pitch
from .images import check_image_fits


def _raw_counts(adata: AnnData, path: Path) -> sp.csr_matrix:
    """``layers['counts']`` when present, else ``X``; must be finite, non-negative integers."""
    source = "layers['counts']" if "counts" in adata.layers else "X"
    counts = adata.layers["counts"] if source != "X" else adata.X
    if counts is None:
        raise InputError(
            path, "holds no count matrix (X is empty); give raw UMI counts in X or layers['counts']"
        )
    counts = sp.csr_matrix(counts)
    check_counts(
        counts,
        path,
        what=source,
        barcodes=adata.obs_names,
        genes=adata.var_names,
    )
    check_not_empty(counts, path, what=source, require_counts=False)
    return counts


def read_h5ad(
    path: str | PathLike[str], what: str, *, fix: str | None = None, record_source: bool = False
) -> AnnData:
    """Read an ``.h5ad`` file, naming it, what it should hold and (``fix``) how to get it when that fails.

    The one reader of the package's AnnData files (prepared samples, chunks, corrected samples, truths).
    ``record_source`` sets ``uns['undiffuse']['source']`` to ``path``, so that later errors about the data
    name this file.

    Raises
    ------
    InputError
        The file is missing, is not a file, or cannot be read as an AnnData.
    """
    path = Path(path)
    if not path.is_file():
        problem = f"{what} not found" if not path.exists() else f"is not a file (the {what} was expected)"
        raise InputError(path, f"{problem}; {fix}" if fix else problem)
    try:
        adata = anndata.read_h5ad(path)
    except Exception as err:  # h5py and anndata raise many types for truncated or foreign files
        raise InputError(path, f"cannot read the {what} as h5ad (truncated or corrupt?): {err}") from err
    if record_source:
        adata.uns["undiffuse"] = {**dict(adata.uns.get("undiffuse", {})), "source": str(path)}
    return adata


def read_prepared(path: str | Path, *, allow_degenerate_tissue: bool = False) -> AnnData:
    """Read and check a ``prepared.h5ad`` (the output of ``undiffuse prepare``).

    A prepared file is checked like any input (:func:`undiffuse.validate.check_prepared`): raw counts that
    are finite, non-negative integers, unique names, coordinates, tissue.

    Raises
    ------
    InputError
        Naming ``path`` and the problem.
    """
    path = Path(path)
    adata = read_h5ad(path, "prepared sample", fix="run `undiffuse prepare` first")
    check_prepared(adata, path, allow_degenerate_tissue=allow_degenerate_tissue)
    return adata


def is_prepared(path: str | Path) -> bool:
    """Whether ``path`` is an h5ad that ``undiffuse prepare`` wrote (it carries ``uns['undiffuse']['qc']``)."""
    import h5py

    path = Path(path)
    if path.suffix != ".h5ad" or not path.is_file():
        return False
    try:
        with h5py.File(path, "r") as handle:
            return "uns/undiffuse/qc" in handle
    except OSError:
        return False


def _choose_library(adata: AnnData, path: Path, sample_id: str | None) -> tuple[str, dict]:
    libraries = adata.uns.get(SPATIAL_KEY, {})
    if not libraries:
        return sample_id or path.stem, {}
    if sample_id is not None and sample_id in libraries:
        return sample_id, libraries[sample_id]
    if len(libraries) == 1:
        ((name, content),) = libraries.items()
        return sample_id or name, content
    raise InputError(
        path,
        f"holds several libraries in uns['spatial'] ({', '.join(libraries)}); choose one with sample_id",
    )


def _as_rgb_float(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if np.issubdtype(image.dtype, np.integer):
        image = image.astype(np.float32) / np.float32(np.iinfo(image.dtype).max)
    image = image.astype(np.float32)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return np.clip(image[..., :3], 0.0, 1.0)


def read_scanpy_h5ad(path: str | Path, *, sample_id: str | None = None) -> AnnData:
    """Read an ``.h5ad`` with ``obsm['spatial']`` and (optionally) ``uns['spatial']`` in scanpy's layout.

    Only the canonical fields are kept; other annotations are dropped so that ``prepare`` starts clean.

    Raises
    ------
    InputError
        When the file cannot be read, lacks spatial coordinates or ``in_tissue``, holds no raw counts, or
        its images do not fit the coordinates.
    """
    path = Path(path)
    adata = read_h5ad(path, "AnnData file")
    check_unique_barcodes(adata.obs_names, path)
    if SPATIAL_KEY not in adata.obsm:
        raise InputError(path, "has no obsm['spatial'] with spot coordinates")
    coords_xy = np.asarray(adata.obsm[SPATIAL_KEY], dtype=np.float64)
    if coords_xy.ndim != 2 or coords_xy.shape[1] != 2 or not np.all(np.isfinite(coords_xy)):
        raise InputError(path, "obsm['spatial'] must be finite (x, y) pixel coordinates")
    missing = [column for column in ("in_tissue", "array_row", "array_col") if column not in adata.obs]
    if missing:
        raise InputError(path, f"obs lacks {', '.join(missing)} (as Space Ranger's positions give them)")
    in_tissue = adata.obs["in_tissue"].to_numpy()
    if not np.isin(in_tissue.astype(np.int64), (0, 1)).all():
        raise InputError(path, "obs['in_tissue'] must be 0/1 or boolean")
    if not in_tissue.astype(bool).any():
        raise InputError(path, "no spot is marked in tissue (obs['in_tissue'] is false everywhere)")

    name, content = _choose_library(adata, path, sample_id)
    previous = adata.uns.get("undiffuse", {})
    platform = previous.get("platform", "visium")
    if platform not in PLATFORMS:
        raise InputError(path, f"uns['undiffuse']['platform'] is {platform!r}; expected one of {PLATFORMS}")
    scalefactors = dict(content.get("scalefactors", {}))
    if not scalefactors:
        pitch = measure_pitch(
            coords_xy,
            path,
            array_row=adata.obs["array_row"].to_numpy(),
            array_col=adata.obs["array_col"].to_numpy(),
            platform=platform,
        )
        scalefactors = default_scalefactors(pitch, platform)
    images = {key: _as_rgb_float(value) for key, value in content.get("images", {}).items()}
    for key, image in images.items():
        scale_key = f"tissue_{key}_scalef"
        if scale_key not in scalefactors:
            raise InputError(path, f"uns['spatial'] has a {key} image but no scale factor {scale_key}")
        check_image_fits(
            coords_xy, scalefactors[scale_key], image.shape, image_path=path, scale_source=scale_key
        )
    var = adata.var
    canonical = build_canonical(
        counts=_raw_counts(adata, path),
        barcodes=adata.obs_names,
        gene_ids=var["gene_ids"].to_numpy() if "gene_ids" in var else var.index.to_numpy(),
        gene_names=var.index.to_numpy(),
        feature_types=(
            var["feature_types"].to_numpy()
            if "feature_types" in var
            else np.full(adata.n_vars, "Gene Expression")
        ),
        in_tissue=in_tissue.astype(bool),
        array_row=adata.obs["array_row"].to_numpy(),
        array_col=adata.obs["array_col"].to_numpy(),
        coords_xy=coords_xy,
        images=images,
        scalefactors=scalefactors,
        metadata=content.get("metadata", {}),
        sample_id=name,
        platform=platform,
        source=path,
        extra={"matrix": previous.get("matrix", "unknown")},
    )
    check_registration(canonical, image_files=dict.fromkeys(images, path))
    return canonical
