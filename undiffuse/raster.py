"""Rasterise spot values onto an image grid: each spot is drawn as a disc at the image's scale.

The rasteriser is a fixed sparse ``(pixels, spots)`` matrix built once per sample, so that drawing ``G``
genes is a single sparse-dense product and is differentiable in the spot values.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.spatial import cKDTree


@dataclass(frozen=True)
class Raster:
    """A sparse spot-to-pixel drawing operator.

    Attributes
    ----------
    matrix
        ``(H * W, N)`` torch sparse COO matrix with ones where a pixel lies inside a spot's disc.
    shape
        ``(H, W)`` of the grid.
    """

    matrix: torch.Tensor
    shape: tuple[int, int]

    def draw(self, values: torch.Tensor) -> torch.Tensor:
        """``(N, G)`` spot values -> ``(G, 1, H, W)`` images (zero between spots)."""
        pixels = torch.sparse.mm(self.matrix, values)
        return pixels.T.reshape(values.shape[1], 1, *self.shape)


def build_raster(
    coords_px: np.ndarray,
    spot_diameter_px: float,
    shape: tuple[int, int],
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Raster:
    """Draw spots of diameter ``spot_diameter_px`` centred at ``coords_px`` (x, y) on a ``shape`` grid.

    Parameters
    ----------
    coords_px
        ``(N, 2)`` spot centres in the grid's pixels, ``(x, y)``.
    spot_diameter_px
        Disc diameter in the grid's pixels; at least one pixel is drawn per spot.
    shape
        ``(H, W)`` of the grid.
    """
    height, width = shape
    yy, xx = np.mgrid[0:height, 0:width]
    pixel_centres = np.column_stack([xx.ravel() + 0.5, yy.ravel() + 0.5])
    radius = max(spot_diameter_px / 2.0, np.sqrt(0.5))
    tree = cKDTree(coords_px)
    distance, spot = tree.query(pixel_centres, k=1, distance_upper_bound=radius)
    inside = np.isfinite(distance)
    rows = np.flatnonzero(inside)
    cols = spot[inside]
    indices = torch.sparse_coo_tensor(
        torch.as_tensor(np.vstack([rows, cols]), dtype=torch.int64),
        torch.ones(rows.shape[0], dtype=dtype),
        size=(height * width, coords_px.shape[0]),
        check_invariants=False,
    )
    return Raster(indices.coalesce().to(device), (height, width))


def image_intensity(image: np.ndarray) -> np.ndarray:
    """``(H, W[, 3])`` RGB or grey image -> ``(H, W)`` stain intensity in [0, 1] (dark = 1).

    H&E stains absorb light: the darker a pixel, the more tissue and nuclei it holds.
    """
    image = np.asarray(image, dtype=np.float64)
    if image.max() > 1.0:
        image = image / 255.0
    grey = image if image.ndim == 2 else image[..., :3] @ np.array([0.299, 0.587, 0.114])
    return np.clip(1.0 - grey, 0.0, 1.0)


def working_grid(image: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """Downsample an image so that its longer side is at most ``max_side``; returns it and the zoom factor."""
    from skimage.transform import resize

    height, width = image.shape[:2]
    zoom = min(1.0, max_side / max(height, width))
    if zoom == 1.0:
        return image, 1.0
    new_shape = (max(1, round(height * zoom)), max(1, round(width * zoom)))
    return resize(image, new_shape, anti_aliasing=True, preserve_range=True), zoom
