"""Space Ranger outputs (Visium ``outs/`` and Visium HD square bins) -> canonical AnnData."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from anndata import AnnData

from ..errors import InputError
from ..validate import check_registration
from .canonical import build_canonical, default_scalefactors, measure_pitch
from .images import SCALEFACTORS_FILE, check_image_fits, read_image, read_scalefactors
from .layout import SampleFiles
from .matrix import read_matrix
from .positions import read_positions
from .visium_hd import check_hd_bins


def read_spaceranger(
    files: SampleFiles, *, sample_id: str | None = None, source: str | Path | None = None
) -> AnnData:
    """Read the matrix, positions, scale factors and images of a located sample.

    ``source`` (default: the matrix) is recorded as ``uns['undiffuse']['source']``.

    Spots are the barcodes of the matrix, in its order; positions of barcodes absent from the matrix (a
    filtered matrix) are dropped.

    Raises
    ------
    InputError
        For any unreadable file, matrix barcodes without a position, positions without tissue spots, or
        images, scale factors and positions that disagree (:func:`undiffuse.validate.check_registration`).
    """
    positions = read_positions(files.positions)
    if not positions["in_tissue"].any():
        raise InputError(
            files.positions,
            "no spot is marked in tissue (in_tissue is 0 everywhere): Space Ranger detected no tissue, or "
            "the positions belong to another slide; without tissue spots there is nothing to correct",
        )
    matrix = read_matrix(files.matrix)
    if files.platform == "visium_hd":
        check_hd_bins(files.matrix.parent, files.matrix, files.positions, matrix.barcodes, positions.index)
    absent = ~matrix.barcodes.isin(positions.index)
    if absent.any():
        raise InputError(
            files.matrix,
            f"{int(absent.sum())} of its {len(matrix.barcodes)} barcodes are absent from {files.positions} "
            f"(e.g. {matrix.barcodes[np.flatnonzero(absent)[0]]}); the matrix and the positions belong to "
            "different samples or slides",
        )
    spots = positions.loc[matrix.barcodes]
    coords_xy = spots[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(dtype=np.float64)

    platform = files.platform
    if files.scalefactors is not None:
        scalefactors = read_scalefactors(files.scalefactors)
        if "bin_size_um" in scalefactors:
            platform = "visium_hd"
    else:
        if files.images:
            raise InputError(
                files.positions.parent,
                f"has images but no {SCALEFACTORS_FILE}, so they cannot be placed on the spots",
            )
        pitch = measure_pitch(
            coords_xy,
            files.positions,
            array_row=spots["array_row"].to_numpy(),
            array_col=spots["array_col"].to_numpy(),
            platform=platform,
        )
        scalefactors = default_scalefactors(pitch, platform)

    images = {}
    for key, image_path in files.images.items():
        scale_key = f"tissue_{key}_scalef"
        if scale_key not in scalefactors:
            raise InputError(files.scalefactors, f"lacks {scale_key}, needed to place {image_path.name}")
        image = read_image(image_path)
        check_image_fits(
            coords_xy,
            scalefactors[scale_key],
            image.shape,
            image_path=image_path,
            scale_source=f"{SCALEFACTORS_FILE}: {scale_key}",
        )
        images[key] = image

    adata = build_canonical(
        counts=matrix.counts,
        barcodes=matrix.barcodes,
        gene_ids=matrix.features["gene_ids"].to_numpy(),
        gene_names=matrix.features["gene_names"].to_numpy(),
        feature_types=matrix.features["feature_types"].to_numpy(),
        in_tissue=spots["in_tissue"].to_numpy(),
        array_row=spots["array_row"].to_numpy(),
        array_col=spots["array_col"].to_numpy(),
        coords_xy=coords_xy,
        images=images,
        scalefactors=scalefactors,
        metadata=matrix.metadata,
        sample_id=sample_id or files.sample_id,
        platform=platform,
        source=source if source is not None else files.matrix,
        extra={"matrix": files.matrix_kind, "positions": str(files.positions)},
    )
    check_registration(
        adata,
        positions_file=files.positions,
        scalefactors_file=files.scalefactors,
        image_files=files.images,
    )
    return adata
