"""``read_sample``: any accepted input -> the canonical AnnData."""

from __future__ import annotations

from pathlib import Path

from anndata import AnnData

from ..errors import InputError
from ..spatial import SPATIAL_KEY
from .canonical import library
from .h5ad import read_scanpy_h5ad
from .images import HIRES_LONG_SIDE, check_image_fits, image_size, read_image
from .layout import locate_sample
from .spaceranger import read_spaceranger


def attach_fullres_image(adata: AnnData, image: str | Path) -> None:
    """Use a full-resolution H&E image (the one given to Space Ranger) as the sample's hires image.

    The image's pixels are the frame of ``obsm['spatial']``; it is downscaled to Space Ranger's hires size
    (long side :data:`~undiffuse.io.images.HIRES_LONG_SIDE` pixels) and replaces any hires image, with
    ``tissue_hires_scalef`` set to the downscaling factor.

    Raises
    ------
    InputError
        When the image is missing or corrupt, or the spot coordinates fall outside it (not the
        full-resolution image of this sample).
    """
    image = Path(image)
    width, height = image_size(image)
    check_image_fits(
        adata.obsm[SPATIAL_KEY],
        1.0,
        (height, width),
        image_path=image,
        scale_source="full resolution, as an image given with --image must be",
    )
    hires = read_image(image, max_long_side=HIRES_LONG_SIDE)
    content = library(adata)
    content["images"]["hires"] = hires
    content["scalefactors"]["tissue_hires_scalef"] = hires.shape[1] / width
    adata.uns["undiffuse"]["image"] = str(image)


def read_sample(
    path: str | Path, *, image: str | Path | None = None, sample_id: str | None = None
) -> AnnData:
    """Read one spatial transcriptomics sample into the canonical AnnData of undiffuse.

    Parameters
    ----------
    path
        Any of: a Space Ranger sample folder or its ``outs/`` folder, with ``raw_feature_bc_matrix.h5`` or a
        ``raw_feature_bc_matrix/`` Matrix Market folder (gzipped or not) and ``spatial/`` holding
        ``tissue_positions_list.csv``, ``tissue_positions.csv`` or ``tissue_positions.parquet``, scale
        factors and any of the hires and lowres images; a matrix file or folder with ``spatial/`` beside
        it; a Visium HD ``binned_outputs/square_XXXum/`` folder (read as square bins); an ``.h5ad`` in
        scanpy's Visium layout.
    image
        Optional full-resolution H&E image of the slide (the image Space Ranger was run with); it becomes
        the hires image.
    sample_id
        Key of ``uns['spatial']``; by default the name of the sample folder (or the library of an h5ad).

    Returns
    -------
    AnnData with ``X`` (CSR float32 raw counts of all spots, tissue and background), ``obs`` ``in_tissue``,
    ``array_row``, ``array_col``, ``obsm['spatial']`` (full-resolution ``(x, y)`` pixels),
    ``uns['spatial'][sample_id]`` (scanpy's layout, so ``sc.pl.spatial`` works), ``var`` ``gene_ids``,
    ``feature_types`` with unique gene names, and ``uns['undiffuse']`` (``sample_id``, ``platform``,
    ``spot_pitch_px``, ``source``, ``matrix``: ``raw``, ``filtered`` or ``unknown``, and for Space Ranger
    inputs ``positions``: the positions file, named in errors about the tissue calls).

    Raises
    ------
    InputError
        Naming the file and the problem, for any input that cannot be used.

    Examples
    --------
    >>> import undiffuse  # doctest: +SKIP
    >>> adata = undiffuse.read_sample("V1_Adult_Mouse_Brain/outs")  # doctest: +SKIP
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "does not exist")
    if path.suffix == ".h5ad":
        adata = read_scanpy_h5ad(path, sample_id=sample_id)
    else:
        adata = read_spaceranger(locate_sample(path), sample_id=sample_id, source=path)
    if image is not None:
        attach_fullres_image(adata, image)
    return adata
