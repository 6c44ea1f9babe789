"""SpatialData in and out: Space Ranger outputs read through ``spatialdata-io``, and a sample's result written as
a SpatialData zarr store that ``spatialdata-plot`` and ``napari-spatialdata`` open as it is.

Names follow ``spatialdata-io``'s Visium readers, so that a store written here looks like one read from Space
Ranger by ``spatialdata-io``:

- coordinate systems ``{sample_id}`` (full-resolution pixels, the frame of ``obsm['spatial']``),
  ``{sample_id}_downscaled_hires`` and ``{sample_id}_downscaled_lowres`` (the pixels of those images);
- shapes ``{sample_id}``: the spots (circles of the spot diameter; squares for Visium HD bins);
- images ``{sample_id}_hires_image`` and ``{sample_id}_lowres_image``, and ``{sample_id}_superres_{k}x``: the
  super-resolved maps at factor ``k``, one channel per gene;
- table ``table``: the corrected AnnData, annotating the spots (``obs['region']``, ``obs['spot_id']``).

Both packages are optional (the ``spatialdata`` extra): they are imported when a function here is called.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from ..atomic import atomic_path
from ..errors import InputError, require_extra
from ..spatial import SPATIAL_KEY
from ..validate import check_registration
from .canonical import build_canonical
from .images import read_scalefactors
from .layout import SampleFiles, locate_sample
from .visium_hd import HD_FEATURE_SLICE, folder_bin_size

if TYPE_CHECKING:
    from spatialdata import SpatialData

#: Name of the table in the stores written here (spatialdata-io's name for its Visium table).
TABLE = "table"
#: ``obs`` columns that link the table to the spots' shapes.
REGION_KEY = "region"
INSTANCE_KEY = "spot_id"
#: Image element names of spatialdata-io: ``{sample_id}_hires_image``, ``{sample_id}_lowres_image``.
_IMAGE_ELEMENT = re.compile(r"_(hires|lowres)_image$")


# --------------------------------------------------------------------------------------------------- reading


def read_spatialdata_io(path: str | Path, *, sample_id: str | None = None) -> AnnData:
    """Read a Space Ranger sample through ``spatialdata-io`` into the canonical AnnData of undiffuse.

    The alternative to :func:`undiffuse.io.read_sample` for Space Ranger outputs: ``spatialdata_io.visium``
    reads a Visium ``outs/`` folder, ``spatialdata_io.visium_hd`` one bin size of a Visium HD ``outs/``. The
    result has the same layout as :func:`~undiffuse.io.read_sample`'s, with ``uns['undiffuse']['reader']``
    set to ``spatialdata-io``, and passes the same registration checks.

    Parameters
    ----------
    path
        What :func:`~undiffuse.io.read_sample` accepts for Space Ranger: a sample folder or its ``outs/``, a
        matrix file with ``spatial/`` beside it, or a Visium HD ``binned_outputs/square_XXXum/`` folder (its
        ``outs/`` must hold ``feature_slice.h5``, as Space Ranger writes it).
    sample_id
        Key of ``uns['spatial']`` and name of the SpatialData elements; by default the name of the sample
        folder.

    Returns
    -------
    The canonical AnnData (see :func:`undiffuse.io.read_sample`).

    Raises
    ------
    InputError
        For a path that is not a Space Ranger output, a file spatialdata-io cannot read (a Matrix Market
        matrix, Parquet positions of Visium), or a missing package.
    """
    require_extra("spatialdata-io", "spatialdata")
    files = locate_sample(path)
    sample_id = sample_id or files.sample_id
    if files.scalefactors is None:
        raise InputError(
            files.positions.parent,
            "has no scalefactors_json.json, which spatialdata-io needs to place the spots; read the sample "
            "with undiffuse's own reader (undiffuse.io.read_sample), which derives them from the spot pitch",
        )
    if files.matrix.is_dir():
        raise InputError(
            files.matrix,
            "is a Matrix Market folder, which spatialdata-io's Visium readers do not read; give the 10x HDF5 "
            "matrix, or read the sample with undiffuse's own reader (undiffuse.io.read_sample)",
        )
    scalefactors = read_scalefactors(files.scalefactors)
    try:
        if files.platform == "visium_hd":
            sdata, table_name = _read_visium_hd(files, sample_id), files.matrix.parent.name
        else:
            sdata, table_name = _read_visium(files, sample_id), TABLE
    except InputError:
        raise
    except (ValueError, KeyError, AssertionError, OSError) as err:
        reason = " ".join(str(err).split()) or type(err).__name__
        raise InputError(
            path,
            f"spatialdata-io cannot read it ({reason}); read the sample with undiffuse's own reader "
            "(undiffuse.io.read_sample)",
        ) from err
    adata = _canonical(
        sdata,
        table=table_name,
        sample_id=sample_id,
        scalefactors=scalefactors,
        platform=files.platform if "bin_size_um" not in scalefactors else "visium_hd",
        source=path,
        extra={"matrix": files.matrix_kind, "positions": str(files.positions), "reader": "spatialdata-io"},
    )
    check_registration(
        adata, positions_file=files.positions, scalefactors_file=files.scalefactors, image_files=files.images
    )
    return adata


def _read_visium(files: SampleFiles, sample_id: str) -> SpatialData:
    from spatialdata_io import visium

    if files.positions.suffix != ".csv":
        raise InputError(
            files.positions,
            "spatialdata-io's Visium reader reads tissue_positions.csv or tissue_positions_list.csv only; "
            "read the sample with undiffuse's own reader (undiffuse.io.read_sample)",
        )
    folder = files.matrix.parent
    return visium(
        folder,
        dataset_id=sample_id,
        counts_file=files.matrix.name,
        tissue_positions_file=files.positions.relative_to(folder),
        scalefactors_file=files.scalefactors.relative_to(folder),
    )


def _read_visium_hd(files: SampleFiles, sample_id: str) -> SpatialData:
    from spatialdata_io import visium_hd

    square = files.matrix.parent
    outs = square.parent.parent
    if square.parent.name != "binned_outputs" or not (outs / HD_FEATURE_SLICE).is_file():
        raise InputError(
            outs / HD_FEATURE_SLICE,
            "file does not exist: spatialdata-io reads a Visium HD sample from Space Ranger's whole outs/ "
            "folder, including feature_slice.h5; give the complete outs/, or read the bin folder with "
            "undiffuse's own reader (undiffuse.io.read_sample)",
        )
    with warnings.catch_warnings():
        # undiffuse works on the hires and lowres images; the microscope image is not needed.
        warnings.filterwarnings("ignore", message="No full resolution image found")
        return visium_hd(
            outs,
            dataset_id=sample_id,
            filtered_counts_file=files.matrix.name.startswith("filtered_"),
            load_segmentations_only=False,
            bin_size=folder_bin_size(square),
            bins_as_squares=True,
        )


def _canonical(
    sdata: SpatialData,
    *,
    table: str,
    sample_id: str,
    scalefactors: Mapping[str, float],
    platform: str,
    source: str | Path,
    extra: Mapping[str, object] | None = None,
) -> AnnData:
    """The canonical AnnData of one table of a SpatialData object in spatialdata-io's Visium layout.

    Counts, barcodes, genes, tissue calls and array indices come from the table, full-resolution
    coordinates from its ``obsm['spatial']``, and the hires and lowres images from the image elements
    ``{sample_id}_hires_image`` and ``{sample_id}_lowres_image``. The scale factors are the sample's
    ``scalefactors_json.json`` as given: spatialdata-io keeps only some of them, folded into transformations.
    """
    adata = sdata.tables[table]
    images = {}
    for name, element in sdata.images.items():
        match = _IMAGE_ELEMENT.search(name)
        if match and name == f"{sample_id}_{match.group(1)}_image":
            images[match.group(1)] = _rgb_float(np.asarray(element.transpose("y", "x", "c").data))
    metadata = adata.uns.get(SPATIAL_KEY, {}).get(sample_id, {}).get("metadata", {})
    return build_canonical(
        counts=adata.X,
        barcodes=adata.obs_names,
        gene_ids=adata.var["gene_ids"].to_numpy(),
        gene_names=adata.var_names.to_numpy(),
        feature_types=adata.var["feature_types"].to_numpy(),
        in_tissue=adata.obs["in_tissue"].to_numpy(),
        array_row=adata.obs["array_row"].to_numpy(),
        array_col=adata.obs["array_col"].to_numpy(),
        coords_xy=np.asarray(adata.obsm[SPATIAL_KEY], dtype=np.float64),
        images=images,
        scalefactors=scalefactors,
        metadata={key: str(value) for key, value in metadata.items()},
        sample_id=sample_id,
        platform=platform,
        source=source,
        extra=extra,
    )


def _rgb_float(image: np.ndarray) -> np.ndarray:
    """``(H, W, C)`` integer image -> float32 RGB in ``[0, 1]``, as undiffuse's image reader returns."""
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    image = image[..., :3]  # an alpha channel carries no colour
    scale = np.iinfo(image.dtype).max if np.issubdtype(image.dtype, np.integer) else 1.0
    return (image.astype(np.float32) / np.float32(scale)).clip(0.0, 1.0)


# --------------------------------------------------------------------------------------------------- writing


def to_spatialdata(
    adata: AnnData,
    *,
    layer: str = "corrected",
    superres: Mapping[int, AnnData] | None = None,
    source: str | Path | None = None,
) -> SpatialData:
    """A sample's result as a SpatialData object (element names in the module docstring).

    Parameters
    ----------
    adata
        A corrected AnnData in the canonical layout (``corrected.h5ad``): ``obsm['spatial']``,
        ``uns['spatial'][sample_id]`` with the scale factors and images, the raw counts in ``X`` and the
        corrected values in ``layers[layer]`` (as :func:`undiffuse.correct` leaves them). It becomes the table
        as it is, except that its images move to image elements (``uns['spatial']`` keeps the scale factors
        and metadata).
    layer
        Layer of the corrected values, which the table must carry.
    superres
        Super-resolved AnnData (``superres_{factor}x.h5ad``) by factor; each becomes an image element with one
        channel per gene, zero outside tissue.
    source
        File ``adata`` was read from, named in errors (default: ``uns['undiffuse']['source']``).

    Raises
    ------
    InputError
        When ``adata`` lacks the corrected layer, coordinates or scale factors, or a super-resolved AnnData lacks
        its grid.
    """
    require_extra("spatialdata", "spatialdata")
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity, Scale

    source = source if source is not None else adata.uns.get("undiffuse", {}).get("source")
    sample_id, library = _library(adata, source)
    if layer not in adata.layers:
        raise InputError(
            source,
            f"has no layer '{layer}' with the corrected values (layers: {', '.join(adata.layers) or 'none'}); "
            "give the corrected.h5ad that undiffuse merge wrote",
        )
    if SPATIAL_KEY not in adata.obsm:
        raise InputError(source, "has no spot coordinates (obsm['spatial']); read the sample with undiffuse")
    scalefactors = library.get("scalefactors", {})
    if "spot_diameter_fullres" not in scalefactors:
        raise InputError(source, f"uns['spatial']['{sample_id}'] has no spot_diameter_fullres scale factor")

    downscaled = {
        key: Scale([scalefactors[f"tissue_{key}_scalef"]] * 2, axes=("x", "y"))
        for key in ("hires", "lowres")
        if f"tissue_{key}_scalef" in scalefactors
    }
    frames = {sample_id: Identity(), **{f"{sample_id}_downscaled_{key}": t for key, t in downscaled.items()}}

    coords = np.asarray(adata.obsm[SPATIAL_KEY], dtype=np.float64)
    radius = float(scalefactors["spot_diameter_fullres"]) / 2.0
    spots = ShapesModel.parse(coords, geometry=0, radius=np.full(len(coords), radius), transformations=frames)
    if adata.uns.get("undiffuse", {}).get("platform") == "visium_hd":
        import geopandas as gpd

        # Bins tile the slide: squares, as spatialdata-io draws them, leave no gaps between them.
        squares = gpd.GeoDataFrame(geometry=spots.geometry.buffer(radius, cap_style="square"))
        spots = ShapesModel.parse(squares, transformations=frames)

    table = adata.copy()
    table.uns[SPATIAL_KEY] = {sample_id: {key: value for key, value in library.items() if key != "images"}}
    table.obs[REGION_KEY] = pd.Categorical([sample_id] * table.n_obs)
    table.obs[INSTANCE_KEY] = spots.index.to_numpy()
    table = TableModel.parse(table, region=sample_id, region_key=REGION_KEY, instance_key=INSTANCE_KEY)

    images = {}
    for key, image in library.get("images", {}).items():
        if key not in downscaled:
            continue
        pixels = np.round(np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0) * 255).astype(np.uint8)
        images[f"{sample_id}_{key}_image"] = Image2DModel.parse(
            pixels[..., :3].transpose(2, 0, 1),
            dims=("c", "y", "x"),
            c_coords=["r", "g", "b"],
            transformations={
                f"{sample_id}_downscaled_{key}": Identity(),
                sample_id: downscaled[key].inverse(),
            },
        )
    for factor, maps in sorted((superres or {}).items()):
        images[f"{sample_id}_superres_{factor}x"] = _superres_image(maps, sample_id, factor, source)
    return SpatialData(images=images, shapes={sample_id: spots}, tables={TABLE: table})


def _library(adata: AnnData, source: Any) -> tuple[str, Mapping[str, Any]]:
    """``(sample_id, uns['spatial'][sample_id])`` of a canonical AnnData."""
    spatial = adata.uns.get(SPATIAL_KEY, {})
    sample_id = adata.uns.get("undiffuse", {}).get("sample_id") or next(iter(spatial), None)
    if sample_id is None or sample_id not in spatial:
        raise InputError(
            source, "has no uns['spatial'] library (scale factors and images); read it with undiffuse"
        )
    return str(sample_id), spatial[sample_id]


def _superres_image(maps: AnnData, sample_id: str, factor: int, source: str | Path | None):
    """Image element of one super-resolution result: ``(genes, rows, cols)`` float32, built gene by gene."""
    import dask
    import dask.array as da
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Scale, Sequence, Translation

    grid = maps.uns.get("superres", {})
    missing = [key for key in ("origin_px", "pixel_px", "n_rows", "n_cols") if key not in grid]
    if missing or "array_row" not in maps.obs or "array_col" not in maps.obs:
        raise InputError(
            source,
            f"the {factor}x super-resolution lacks its pixel grid (uns['superres'] {', '.join(missing) or 'ok'}, "
            "obs array_row and array_col); give the superres_{factor}x.h5ad that rule superres wrote",
        )
    shape = (int(grid["n_rows"]), int(grid["n_cols"]))
    flat = maps.obs["array_row"].to_numpy(np.int64) * shape[1] + maps.obs["array_col"].to_numpy(np.int64)
    values = maps.X.tocsc() if sp.issparse(maps.X) else np.asarray(maps.X)

    def plane(column: int) -> np.ndarray:
        image = np.zeros(shape[0] * shape[1], dtype=np.float32)
        gene = values[:, column]
        image[flat] = gene.toarray().ravel() if sp.issparse(gene) else gene
        return image.reshape(shape)

    # One gene's plane at a time: a full slide at 10x holds hundreds of megapixels across its genes.
    planes = [
        da.from_delayed(dask.delayed(plane)(column), shape=shape, dtype=np.float32)
        for column in range(maps.n_vars)
    ]
    origin_x, origin_y = (float(v) for v in grid["origin_px"])
    pixel = float(grid["pixel_px"])
    return Image2DModel.parse(
        da.stack(planes).rechunk((1, *(min(1024, n) for n in shape))),
        dims=("c", "y", "x"),
        c_coords=[str(name) for name in maps.var_names],
        transformations={
            sample_id: Sequence(
                [Scale([pixel, pixel], axes=("x", "y")), Translation([origin_x, origin_y], axes=("x", "y"))]
            )
        },
    )


def write_spatialdata(
    adata: AnnData,
    path: str | Path,
    *,
    layer: str = "corrected",
    superres: Mapping[int, AnnData] | None = None,
    source: str | Path | None = None,
) -> Path:
    """Write a sample's result as a SpatialData zarr store (:func:`to_spatialdata`), atomically.

    Returns
    -------
    The store's path.

    Examples
    --------
    >>> import anndata, spatialdata  # doctest: +SKIP
    >>> write_spatialdata(anndata.read_h5ad("results/s1/corrected.h5ad"), "results/s1/corrected.zarr")  # doctest: +SKIP
    >>> spatialdata.read_zarr("results/s1/corrected.zarr")  # doctest: +SKIP
    """
    sdata = to_spatialdata(adata, layer=layer, superres=superres, source=source)
    path = Path(path)
    with atomic_path(path, directory=True) as tmp:
        # spatialdata writes a new store only: it refuses to write into the (empty) temporary folder.
        tmp.rmdir()
        sdata.write(tmp)
    return path
