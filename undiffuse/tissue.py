"""The tissue mask the correction uses: Space Ranger's ``in_tissue``, optionally refined from the H&E image.

The image mask is an Otsu threshold on the smoothed saturation of the H&E image (stained tissue is
coloured; glass, and the dark but grey fiducial frame, are not), cleaned up morphologically (closing with a
disk of one spot radius, small holes filled, small islands removed, both below four spot areas). A spot is
tissue when at least half of its disk lies on the image mask.

Visium HD bins (2-16 um) are far smaller than the structures that tell tissue from glass, so their clean-up
scale is at least :data:`HD_CLEANUP_RADIUS_UM` (a couple of cells, which closes the gaps between cells)
instead of one bin, and a bin is tissue when at least half of its square lies on the image mask. Sampling is
one correlation of the mask with the spot's footprint, read at the spot centres, so memory grows with the
image and the number of spots, never with their product.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from anndata import AnnData
from scipy import ndimage
from skimage import filters, morphology, transform

from .errors import InputError
from .qc import is_visium_hd, spot_pitch_um
from .spatial import SPATIAL_KEY

#: Refinement is rejected (with a warning) when the image marks fewer or more than this share of spots.
DEGENERATE_SHARE = (0.01, 0.99)

#: Smallest island of tissue, or hole in it, kept by the clean-up, in spot areas.
MIN_REGION_SPOTS = 4.0

#: Smallest clean-up radius of the image mask on Visium HD, in microns.
HD_CLEANUP_RADIUS_UM = 16.0


@dataclass(frozen=True)
class TissueMask:
    """Tissue mask of the spots and, when an image was available, its agreement with ``in_tissue``.

    Attributes
    ----------
    tissue
        ``(N,)`` bool: the mask the correction uses.
    source
        ``in_tissue`` or ``image``.
    in_tissue
        ``(N,)`` bool: Space Ranger's call.
    image_spots
        ``(N,)`` bool mask from the image, or None without an image.
    pixel_mask
        Cleaned-up image mask, or None; its pixels are those of ``image_key`` block-averaged so that a
        spot radius spans a few pixels.
    pixel_scale
        Factor from full-resolution pixels to ``pixel_mask`` pixels (0 without an image).
    image_key
        ``hires`` or ``lowres``, the image used, or None.
    """

    tissue: np.ndarray
    source: str
    in_tissue: np.ndarray
    image_spots: np.ndarray | None = None
    pixel_mask: np.ndarray | None = None
    pixel_scale: float = 0.0
    image_key: str | None = None

    def agreement(self) -> dict[str, float]:
        """Jaccard index of the image mask and ``in_tissue``, and the spots on which they differ.

        Empty without an image mask.
        """
        if self.image_spots is None:
            return {}
        union = np.logical_or(self.image_spots, self.in_tissue).sum()
        intersection = np.logical_and(self.image_spots, self.in_tissue).sum()
        differ = int(np.sum(self.image_spots != self.in_tissue))
        return {
            "mask_jaccard": float(intersection / union) if union else 1.0,
            "mask_spots_differing": differ,
            "mask_share_differing": differ / len(self.in_tissue),
            "mask_image_only_spots": int(np.sum(self.image_spots & ~self.in_tissue)),
            "mask_in_tissue_only_spots": int(np.sum(~self.image_spots & self.in_tissue)),
        }


def pick_image(adata: AnnData, *, prefer: str = "hires") -> tuple[str, np.ndarray, float] | None:
    """An image of the sample with its key and scale factor, ``prefer`` first, or None without images."""
    library = adata.uns[SPATIAL_KEY][adata.uns["undiffuse"]["sample_id"]]
    keys = ("hires", "lowres") if prefer == "hires" else ("lowres", "hires")
    for key in keys:
        if key in library.get("images", {}):
            return (
                key,
                np.asarray(library["images"][key]),
                float(library["scalefactors"][f"tissue_{key}_scalef"]),
            )
    return None


#: The image is block-averaged until a spot radius spans about this many pixels: enough to resolve the
#: tissue edge at spot resolution, and it keeps the morphology fast on 2000-pixel hires images.
WORKING_SPOT_RADIUS_PX = 3.0


def saturation(image: np.ndarray) -> np.ndarray:
    """HSV saturation ``(max - min) / max`` of an RGB image in ``[0, 1]``."""
    rgb = np.clip(image[..., :3], 0.0, 1.0)
    high, low = rgb.max(axis=2), rgb.min(axis=2)
    return np.divide(high - low, high, out=np.zeros_like(high), where=high > 0)


def image_tissue_pixels(image: np.ndarray, *, spot_radius_px: float) -> np.ndarray:
    """Binary tissue mask of an H&E image (see the module docstring), in the image's own pixels.

    Parameters
    ----------
    image
        ``(H, W, 3)`` RGB in ``[0, 1]``.
    spot_radius_px
        Spot radius in the image's pixels; sets the smoothing and the clean-up sizes.
    """
    smooth = ndimage.gaussian_filter(saturation(image), sigma=max(spot_radius_px / 2.0, 0.5))
    if np.ptp(smooth) <= 1e-6:
        return np.zeros(smooth.shape, dtype=bool)
    mask = smooth > filters.threshold_otsu(smooth)
    disk = morphology.disk(max(int(round(spot_radius_px)), 1))
    # Pad before closing so that tissue touching the image border is not eroded from outside.
    pad = disk.shape[0]
    mask = ndimage.binary_closing(np.pad(mask, pad, mode="edge"), structure=disk)[pad:-pad, pad:-pad]
    min_area = int(MIN_REGION_SPOTS * np.pi * spot_radius_px**2)
    mask = morphology.remove_small_holes(mask, max_size=min_area)
    return morphology.remove_small_objects(mask, max_size=min_area)


def sample_mask_at_spots(
    pixel_mask: np.ndarray, coords_px: np.ndarray, *, spot_radius_px: float, square: bool = False
) -> np.ndarray:
    """Spots whose footprint lies at least half on ``pixel_mask``; ``coords_px`` are ``(x, y)`` mask pixels.

    The footprint is a disk of ``spot_radius_px`` (Visium spots) or, with ``square``, the square of side
    ``2 * spot_radius_px`` rounded to an odd number of pixels (Visium HD bins). Pixels outside the mask's
    extent count as background, and so do spots centred outside it.
    """
    if square:
        side = max(1, 2 * int(round((2.0 * spot_radius_px - 1.0) / 2.0)) + 1)
        footprint = np.ones((side, side), dtype=np.float64)
    else:
        footprint = morphology.disk(max(int(round(spot_radius_px)), 0)).astype(np.float64)
    coverage = ndimage.correlate(
        pixel_mask.astype(np.float64), footprint / footprint.sum(), mode="constant", cval=0.0
    )
    rows = np.round(coords_px[:, 1]).astype(np.int64)
    cols = np.round(coords_px[:, 0]).astype(np.int64)
    height, width = pixel_mask.shape
    inside = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)
    covered = np.zeros(rows.shape[0], dtype=bool)
    # The tolerance keeps a spot exactly half on the mask, as the pixel count it stands for does.
    covered[inside] = coverage[rows[inside], cols[inside]] >= 0.5 - 1e-9
    return covered


def tissue_mask(adata: AnnData, *, refine: bool = False) -> TissueMask:
    """Tissue mask of a canonical AnnData.

    Parameters
    ----------
    adata
        Canonical AnnData.
    refine
        Use the H&E image's mask instead of ``in_tissue``. Without refinement the image mask, when an image
        exists, is still computed so that the agreement can be reported.

    Raises
    ------
    InputError
        When ``refine`` is asked for but the sample has no image.
    """
    in_tissue = adata.obs["in_tissue"].to_numpy(dtype=bool)
    picked = pick_image(adata)
    if picked is None:
        if refine:
            raise InputError(
                adata.uns["undiffuse"].get("source"),
                "refining the tissue mask needs an H&E image, and this sample has none; pass the "
                "full-resolution image (--image) or drop --refine-mask",
            )
        return TissueMask(tissue=in_tissue, source="in_tissue", in_tissue=in_tissue)
    key, image, scale = picked
    library = adata.uns[SPATIAL_KEY][adata.uns["undiffuse"]["sample_id"]]
    spot_radius_px = 0.5 * float(library["scalefactors"]["spot_diameter_fullres"]) * scale
    hd = is_visium_hd(adata)
    cleanup_radius_px = spot_radius_px
    if hd:
        um_per_px = spot_pitch_um(adata) / (float(adata.uns["undiffuse"]["spot_pitch_px"]) * scale)
        cleanup_radius_px = max(spot_radius_px, HD_CLEANUP_RADIUS_UM / um_per_px)
    block = max(int(cleanup_radius_px // WORKING_SPOT_RADIUS_PX), 1)
    if block > 1:
        image = transform.downscale_local_mean(image[..., :3], (block, block, 1))
        scale, spot_radius_px, cleanup_radius_px = (
            scale / block,
            spot_radius_px / block,
            cleanup_radius_px / block,
        )
    pixel_mask = image_tissue_pixels(image, spot_radius_px=cleanup_radius_px)
    coords_px = np.asarray(adata.obsm[SPATIAL_KEY], dtype=np.float64) * scale
    image_spots = sample_mask_at_spots(pixel_mask, coords_px, spot_radius_px=spot_radius_px, square=hd)
    tissue, source = in_tissue, "in_tissue"
    if refine:
        share = image_spots.mean()
        if DEGENERATE_SHARE[0] <= share <= DEGENERATE_SHARE[1]:
            tissue, source = image_spots, "image"
        else:
            warnings.warn(
                f"the H&E image marks {share:.1%} of spots as tissue, too few or too many to trust; "
                "keeping Space Ranger's in_tissue",
                stacklevel=2,
            )
    return TissueMask(
        tissue=tissue,
        source=source,
        in_tissue=in_tissue,
        image_spots=image_spots,
        pixel_mask=pixel_mask,
        pixel_scale=scale,
        image_key=key,
    )
