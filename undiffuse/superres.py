r"""Histology-guided super-resolution of corrected spot maps (issue 14; C3-Diff supplementary, iStar).

From the corrected spot values :math:`y_{sg}` of a sample and its H&E image, :func:`superresolve` restores each
gene's map on a square pixel grid ``factor`` times finer than the spot pitch (5x and 10x: 20 um and 10 um
pixels on Visium's 100 um lattice). Values are expected molecules per pixel, the unit of the spots.

**Aggregation operator.** Spot :math:`s` (centre :math:`c_s`, footprint radius :math:`\rho`, half the spot
diameter) sees the pixels under its disc. With each pixel :math:`p` sampled at ``k x k`` evenly spaced points
:math:`u_{p,1..k^2}` (``supersample``, default 5),

.. math::

    A_{sp} = \frac{1}{k^2} \sum_{j=1}^{k^2} \mathbf 1\left[\lVert u_{pj} - c_s \rVert \le \rho\right]
    \, \mathbf 1[p \in \mathcal T],
    \qquad (A x_g)_s = \sum_p A_{sp}\, x_{pg},

the share of the pixel's area inside the spot, over tissue pixels :math:`\mathcal T` only. Every output
satisfies :math:`A x_g = y_g` on every spot whose footprint holds a tissue pixel (exactly, up to float32
rounding), and :math:`x_{pg} = 0` for :math:`p \notin \mathcal T`.

**Tissue pixels** :math:`\mathcal T`: pixels whose nearest spot is a tissue spot within one pitch (the spots'
Voronoi cells), intersected with the H&E tissue mask (:func:`undiffuse.tissue.image_tissue_pixels`) when the
image has one, plus the whole footprint of every tissue spot (its corrected value counts the molecules under
all of it).

**Models** (justified in ``docs/superres.md``), learned per sample from the H&E image and the corrected spots:

- ``cells`` (default). Nuclei are segmented from the image's haematoxylin density (:func:`segment_nuclei`);
  each image pixel belongs to its nearest nucleus within ``cell_reach_um``, which makes the cells. The spots are
  factorised into a few expression programmes per unit area, :math:`y_s \approx n_s M` (Poisson NMF,
  :func:`poisson_nmf`); a small network types every cell from its image descriptors, tempered by the programme
  mix of the spots around it (:func:`surrounding_programmes`, its own spot left out),
  :math:`w_c = \mathrm{softmax}(f_\theta(\phi_c))` over the programmes and "nothing", and is trained so that the
  cells under each footprint reproduce the spot, first in programme abundances and then, with :math:`M` refined
  alongside, in every gene under the Poisson deviance. A pixel holds its cells' areas times their programmes,
  :math:`\hat x_p = \sum_c S_{pc} w_c M` (:func:`cell_shares`), so the maps are sharp where the image shows
  cells and carry the programmes' shared structure to low-count genes.
- ``network``: a per-pixel network :math:`f_\theta` on a scale-space bank of stain features
  (:func:`image_features`) with an embedding :math:`h_p` and log-linear gene heads,
  :math:`\hat x_{pg} = \exp(w_g^\top h_p + b_g)`, trained with

  .. math::

      \mathcal L = \lambda_{\text{agg}} \operatorname{mean}_{s,g}
      \left(\log\left(1 + \tfrac{(A\hat x_g)_s}{m_g}\right) - \log\left(1 + \tfrac{y_{sg}}{m_g}\right)\right)^2
      + \lambda_{\text{modal}} \mathcal L_{\text{modal}},

  :math:`m_g` the gene's mean over tissue spots, and :math:`\mathcal L_{\text{modal}}` C3-Diff's cross-modal
  contrastive term: symmetric InfoNCE (temperature :math:`\tau`) between the image embedding of a spot's patch,
  :math:`u_s = \mathrm{norm}(P \sum_p A_{sp} h_p / \sum_p A_{sp})`, and its expression embedding
  :math:`v_s = \mathrm{norm}(E(\log(1 + y_s / m)))`; the two embeddings of the same spot are the positive pair,
  the other spots the negatives. Default weights are the seed's (:math:`\lambda_{\text{mse}} = 2`,
  :math:`\lambda_{\text{modal}} = 1`). Its maps are multiplied by a smooth gain field, the Gaussian-weighted
  (:math:`\sigma` = half a pitch) interpolation of the log ratios
  :math:`\log((y_{sg} + \epsilon_g) / ((A\hat x_g)_s + \epsilon_g))`, so that the gaps between footprints follow
  their neighbours.

**Projection onto the data.** A final multiplicative projection (:func:`project`: iterative proportional
fitting, one step when footprints do not overlap, as on Visium) makes :math:`A x_g = y_g` exact. A footprint
whose prediction is zero receives :math:`y_{sg}` spread evenly over its area.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData
from scipy import ndimage
from scipy.spatial import cKDTree

from .arrays import as_dense
from .errors import InputError

#: Super-resolution factors the workflow and the benchmark report by default (pixels per spot pitch).
DEFAULT_FACTORS = (5, 10)
#: Scales (spot pitches) of the Gaussian context filters of :func:`image_features`.
CONTEXT_PITCHES = (0.1, 0.25, 0.5)
#: Super-resolution models (:class:`SuperResConfig`).
MODELS = ("cells", "network")
#: How far a cell reaches beyond its nucleus (microns): image pixels farther from every nucleus hold no cell.
CELL_REACH_UM = 4.0
#: Scales (microns) of the stain context measured around each nucleus.
CELL_CONTEXT_UM = (10.0, 25.0, 50.0)
#: Smoothing (microns) of the haematoxylin density before nuclei are thresholded.
NUCLEUS_SMOOTHING_UM = 0.8
#: Touching nuclei are split where their centres lie at least this far apart (microns).
NUCLEUS_SEPARATION_UM = 3.0
#: Spacing (microns) of the points at which a pixel is sampled to find the cells it holds.
CELL_SAMPLING_UM = 2.0
#: Floor added to the surrounding spots' programme shares (:func:`surrounding_programmes`) before their log, so
#: that a programme absent around a cell lowers its odds without ruling it out.
SURROUNDING_FLOOR = 0.02


# --------------------------------------------------------------------------------------------- grid


@dataclass(frozen=True)
class PixelGrid:
    """A square pixel grid in the full-resolution image frame.

    Attributes
    ----------
    origin_px
        ``(x, y)`` of the grid's top-left corner (full-resolution pixels).
    pixel_px
        Side of a grid pixel in full-resolution pixels.
    n_rows, n_cols
        Pixels down and across.
    """

    origin_px: tuple[float, float]
    pixel_px: float
    n_rows: int
    n_cols: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.n_rows, self.n_cols

    @property
    def n_pixels(self) -> int:
        return self.n_rows * self.n_cols

    def indices(self, pixels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``row``, ``col`` of the given flat pixel indices (default: all, row-major)."""
        flat = np.arange(self.n_pixels) if pixels is None else np.asarray(pixels)
        return np.divmod(flat.astype(np.int64), self.n_cols)

    def centres_px(self, pixels: np.ndarray | None = None) -> np.ndarray:
        """``(P, 2)`` pixel centres ``(x, y)`` in full-resolution pixels."""
        rows, cols = self.indices(pixels)
        return np.column_stack(
            [
                self.origin_px[0] + (cols + 0.5) * self.pixel_px,
                self.origin_px[1] + (rows + 0.5) * self.pixel_px,
            ]
        )


def pixel_grid(
    coords_px: np.ndarray, pitch_px: float, factor: int, *, origin_px: tuple[float, float] | None = None
) -> PixelGrid:
    """The grid of pixels ``pitch_px / factor`` wide that covers every spot with a margin of one pitch.

    ``origin_px`` anchors the grid (a pixel corner lies on it, e.g. to match a truth grid); the grid then
    extends by whole pixels to cover the spots.
    """
    if factor < 1:
        raise ValueError(f"the super-resolution factor must be at least 1, got {factor}")
    size = pitch_px / factor
    low = coords_px.min(axis=0) - pitch_px
    high = coords_px.max(axis=0) + pitch_px
    if origin_px is None:
        start = low
    else:
        anchor = np.asarray(origin_px, dtype=np.float64)
        start = anchor + np.floor((low - anchor) / size) * size
    n_cols, n_rows = (int(math.ceil((high[k] - start[k]) / size)) for k in range(2))
    return PixelGrid((float(start[0]), float(start[1])), float(size), n_rows, n_cols)


def aggregation_matrix(
    grid: PixelGrid,
    coords_px: np.ndarray,
    radius_px: float,
    pixels: np.ndarray,
    *,
    supersample: int = 5,
) -> sp.csr_matrix:
    r"""``(S, P)`` aggregation operator :math:`A`: share of pixel ``pixels[p]``'s area inside spot ``s``.

    Each pixel is sampled at ``supersample x supersample`` evenly spaced points; :math:`A_{sp}` is the share of
    them within ``radius_px`` of the spot centre (module docstring). Columns follow ``pixels`` (flat grid
    indices of the tissue pixels), so :math:`A` sums tissue pixels only.
    """
    pixels = np.asarray(pixels, dtype=np.int64)
    column_of = np.full(grid.n_pixels, -1, dtype=np.int64)
    column_of[pixels] = np.arange(pixels.size)
    offsets = (np.arange(supersample) + 0.5) / supersample
    rows_list, cols_list, vals_list = [], [], []
    reach = int(math.ceil(radius_px / grid.pixel_px)) + 1
    dr, dc = (d.ravel() for d in np.mgrid[-reach : reach + 1, -reach : reach + 1])
    ox, oy = np.meshgrid(offsets, offsets)
    ox, oy = ox.ravel(), oy.ravel()
    for start in range(0, coords_px.shape[0], 4096):
        centres = coords_px[start : start + 4096]
        row0 = np.floor((centres[:, 1] - grid.origin_px[1]) / grid.pixel_px).astype(np.int64)
        col0 = np.floor((centres[:, 0] - grid.origin_px[0]) / grid.pixel_px).astype(np.int64)
        rows, cols = row0[:, None] + dr[None, :], col0[:, None] + dc[None, :]
        # (spots, pixels, points) distances from the spot centre
        x = grid.origin_px[0] + (cols[..., None] + ox) * grid.pixel_px - centres[:, None, None, 0]
        y = grid.origin_px[1] + (rows[..., None] + oy) * grid.pixel_px - centres[:, None, None, 1]
        share = np.mean(x * x + y * y <= radius_px * radius_px, axis=2)
        valid = (share > 0) & (rows >= 0) & (rows < grid.n_rows) & (cols >= 0) & (cols < grid.n_cols)
        flat = np.where(valid, rows * grid.n_cols + cols, 0)
        column = np.where(valid, column_of[flat], -1)
        keep = column >= 0
        spot = np.broadcast_to(np.arange(start, start + centres.shape[0])[:, None], keep.shape)
        rows_list.append(spot[keep])
        cols_list.append(column[keep])
        vals_list.append(share[keep])
    return sp.csr_matrix(
        (np.concatenate(vals_list), (np.concatenate(rows_list), np.concatenate(cols_list))),
        shape=(coords_px.shape[0], pixels.size),
        dtype=np.float64,
    )


def tissue_pixels(
    grid: PixelGrid,
    coords_px: np.ndarray,
    tissue: np.ndarray,
    pitch_px: float,
    radius_px: float,
    *,
    image_mask: np.ndarray | None = None,
    image_scalef: float = 1.0,
) -> np.ndarray:
    """Flat indices of the tissue pixels :math:`\\mathcal T` (module docstring), sorted.

    Parameters
    ----------
    image_mask
        Boolean H&E tissue mask in the image's pixels (``image_scalef`` image pixels per full-resolution
        pixel); ignored when it covers no tissue spot.
    """
    centres = grid.centres_px()
    distance, nearest = cKDTree(coords_px).query(centres, k=1)
    mask = tissue[nearest] & (distance <= pitch_px)
    if image_mask is not None and image_mask.any():
        rows = np.clip(
            np.round(centres[:, 1] * image_scalef - 0.5).astype(np.int64), 0, image_mask.shape[0] - 1
        )
        cols = np.clip(
            np.round(centres[:, 0] * image_scalef - 0.5).astype(np.int64), 0, image_mask.shape[1] - 1
        )
        on_image = image_mask[rows, cols]
        if (on_image & mask).any():
            mask &= on_image
    # The footprint of a tissue spot is tissue: its corrected value counts molecules under all of it.
    tissue_idx = np.flatnonzero(tissue)
    if tissue_idx.size:
        footprint = aggregation_matrix(grid, coords_px[tissue_idx], radius_px, np.arange(grid.n_pixels))
        mask[np.unique(footprint.indices)] = True
    return np.flatnonzero(mask)


# --------------------------------------------------------------------------------------------- image


def image_features(
    image: np.ndarray,
    scalef: float,
    grid: PixelGrid,
    *,
    pitch_px: float | None = None,
    context: Sequence[float] = CONTEXT_PITCHES,
) -> np.ndarray:
    r"""``(F, H, W)`` float32 histology features of each grid pixel, standardised per channel.

    The image (RGB in ``[0, 1]``, ``scalef`` image pixels per full-resolution pixel) is sampled bilinearly
    at ``k x k`` points per grid pixel (``k`` the image pixels per grid pixel, between 2 and 8). Per stain
    channel (haematoxylin, eosin and DAB optical densities of :func:`skimage.color.rgb2hed`, and the grey
    intensity): the pixel's mean and standard deviation (texture: nuclei), and the mean blurred by Gaussians
    of ``context`` spot pitches (tissue context), with the standard deviation blurred at the middle scale;
    ``4 (3 + len(context))`` channels. The blurs are the fixed first layer of the model's network
    (:class:`SuperResConfig`): a scale-space filter bank, the same physical scales at every factor.
    """
    from skimage.color import rgb2hed

    pitch_px = grid.pixel_px if pitch_px is None else pitch_px
    rgb = np.clip(np.asarray(image, dtype=np.float64)[..., :3], 1e-3, 1.0)
    stains = np.concatenate([rgb2hed(rgb), (1.0 - rgb.mean(axis=2))[..., None]], axis=2)
    samples = int(np.clip(math.ceil(grid.pixel_px * scalef), 2, 8))
    offsets = (np.arange(samples) + 0.5) / samples
    rr = (np.arange(grid.n_rows)[:, None] + offsets[None, :]).ravel()
    cc = (np.arange(grid.n_cols)[:, None] + offsets[None, :]).ravel()
    y = (grid.origin_px[1] + rr * grid.pixel_px) * scalef - 0.5
    x = (grid.origin_px[0] + cc * grid.pixel_px) * scalef - 0.5
    yy, xx = np.meshgrid(y, x, indexing="ij")
    means, stds = [], []
    for k in range(stains.shape[2]):
        sampled = ndimage.map_coordinates(stains[..., k], [yy, xx], order=1, mode="nearest")
        blocks = sampled.reshape(grid.n_rows, samples, grid.n_cols, samples)
        means.append(blocks.mean(axis=(1, 3)))
        stds.append(blocks.std(axis=(1, 3)))
    stack = means + stds
    sigmas = [c * pitch_px / grid.pixel_px for c in context]
    for sigma in sigmas:
        stack += [ndimage.gaussian_filter(mean, sigma, mode="nearest") for mean in means]
    middle = sigmas[len(sigmas) // 2]
    stack += [ndimage.gaussian_filter(std, middle, mode="nearest") for std in stds]
    features = np.stack(stack).astype(np.float64)
    centre = features.mean(axis=(1, 2), keepdims=True)
    spread = features.std(axis=(1, 2), keepdims=True)
    return ((features - centre) / np.where(spread > 1e-12, spread, 1.0)).astype(np.float32)


# --------------------------------------------------------------------------------------------- cells


@dataclass(frozen=True)
class Nuclei:
    """Nuclei of an H&E image and the cells around them, in the image's pixels.

    Attributes
    ----------
    owner
        ``(H, W)`` int64 cell of each image pixel: its nearest nucleus within the cell's reach, else
        ``n_cells`` (no cell).
    features
        ``(n_cells, F)`` float32 image descriptors of each cell, standardised per column
        (:func:`segment_nuclei`).
    centres
        ``(n_cells, 2)`` ``(x, y)`` of each nucleus's centre of mass, in image pixels (divided by the image's
        scale factor, full-resolution pixels).
    """

    owner: np.ndarray
    features: np.ndarray
    centres: np.ndarray

    @property
    def n_cells(self) -> int:
        return int(self.features.shape[0])

    def areas(
        self, x_px: np.ndarray, y_px: np.ndarray, image_scalef: float, point_area: float
    ) -> sp.csr_matrix:
        """``(R, C + 1)`` area of each cell in ``R`` regions sampled at ``(R, Q)`` full-resolution points
        ``(x_px, y_px)``: each point takes the cell of the image pixel under it and stands for ``point_area``;
        column ``C`` is the area in no cell."""
        height, width = self.owner.shape
        rows = np.clip(np.floor(y_px * image_scalef).astype(np.int64), 0, height - 1)
        cols = np.clip(np.floor(x_px * image_scalef).astype(np.int64), 0, width - 1)
        owner = self.owner[rows, cols]
        return sp.csr_matrix(
            (
                np.full(owner.size, point_area),
                (np.repeat(np.arange(owner.shape[0]), owner.shape[1]), owner.ravel()),
            ),
            shape=(owner.shape[0], self.n_cells + 1),
        )


def segment_nuclei(
    image: np.ndarray,
    um_per_px: float,
    *,
    tissue_mask: np.ndarray | None = None,
    reach_um: float = CELL_REACH_UM,
) -> Nuclei:
    """Nuclei of an H&E image by thresholding its haematoxylin density, and the cells they imply.

    The haematoxylin optical density (colour deconvolution, :func:`skimage.color.rgb2hed`), smoothed by
    ``NUCLEUS_SMOOTHING_UM``, is thresholded by Otsu's method over the tissue (``tissue_mask``, else the whole
    image), and touching nuclei are split by a watershed of the distance transform (:func:`_split_nuclei`).
    Each image pixel belongs to its nearest nucleus within
    ``reach_um``, which makes the cell. A cell is described by its nucleus (mean, maximum and standard
    deviation of the haematoxylin density, log area in square microns) and by its surroundings (haematoxylin
    and eosin densities blurred by Gaussians of ``CELL_CONTEXT_UM``, at the nucleus's centre).

    Parameters
    ----------
    image
        ``(H, W, 3)`` RGB in ``[0, 1]``.
    um_per_px
        Microns per image pixel.
    """
    from skimage.color import rgb2hed
    from skimage.filters import threshold_otsu

    hed = rgb2hed(np.clip(np.asarray(image, dtype=np.float64)[..., :3], 1e-3, 1.0))
    haematoxylin = ndimage.gaussian_filter(hed[..., 0], NUCLEUS_SMOOTHING_UM / um_per_px)
    inside = haematoxylin[tissue_mask] if tissue_mask is not None and tissue_mask.any() else haematoxylin
    nuclei = np.zeros(haematoxylin.shape, dtype=bool)
    if np.ptp(inside) > 1e-9:
        nuclei = haematoxylin > threshold_otsu(inside)
        if tissue_mask is not None and tissue_mask.any():
            nuclei &= tissue_mask
    labels, n_cells = _split_nuclei(nuclei, um_per_px)
    if n_cells == 0:
        return Nuclei(
            np.zeros(haematoxylin.shape, dtype=np.int64),
            np.zeros((0, 4 + 2 * len(CELL_CONTEXT_UM)), dtype=np.float32),
            np.zeros((0, 2)),
        )
    index = np.arange(1, n_cells + 1)
    distance, (rows, cols) = ndimage.distance_transform_edt(~nuclei, return_indices=True)
    owner = labels[rows, cols].astype(np.int64) - 1
    owner[distance * um_per_px > reach_um] = n_cells
    centres = np.asarray(ndimage.center_of_mass(nuclei, labels, index), dtype=np.float64).reshape(-1, 2)
    columns = [
        ndimage.mean(haematoxylin, labels, index),
        ndimage.maximum(haematoxylin, labels, index),
        ndimage.standard_deviation(haematoxylin, labels, index),
        np.log(ndimage.sum(np.ones_like(haematoxylin), labels, index) * um_per_px**2),
    ]
    for scale_um in CELL_CONTEXT_UM:
        for density in (hed[..., 1], haematoxylin):
            columns.append(_blurred_at(density, scale_um / um_per_px, centres))
    features = np.column_stack(columns)
    spread = features.std(axis=0)
    features = (features - features.mean(axis=0)) / np.where(spread > 1e-12, spread, 1.0)
    # Image pixel (row, col) spans [row, row + 1) x [col, col + 1): its centre is at + 0.5.
    return Nuclei(owner, features.astype(np.float32), centres[:, ::-1] + 0.5)


def _blurred_at(image: np.ndarray, sigma: float, points: np.ndarray) -> np.ndarray:
    """``image`` blurred by a Gaussian of ``sigma`` pixels, at ``(row, col)`` points (bilinear).

    Wide blurs run on the image averaged over blocks of a third of ``sigma``, where they cost a fraction and
    differ by far less than the features' spread.
    """
    block = max(1, int(sigma // 3))
    if block > 1:
        rows, cols = (n // block * block for n in image.shape)
        image = image[:rows, :cols].reshape(rows // block, block, cols // block, block).mean(axis=(1, 3))
    blurred = ndimage.gaussian_filter(image, sigma / block, mode="nearest")
    return ndimage.map_coordinates(blurred, ((points + 0.5) / block - 0.5).T, order=1, mode="nearest")


def _split_nuclei(nuclei: np.ndarray, um_per_px: float) -> tuple[np.ndarray, int]:
    """Labels of the nuclei in a binary mask, touching nuclei split by a watershed of the distance to the
    background from its maxima at least ``NUCLEUS_SEPARATION_UM`` apart."""
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    components, n_components = ndimage.label(nuclei)
    if n_components == 0:
        return components, 0
    depth = ndimage.distance_transform_edt(nuclei)
    peaks = peak_local_max(
        depth,
        min_distance=max(1, round(NUCLEUS_SEPARATION_UM / um_per_px)),
        labels=components,
        exclude_border=False,
    )
    markers = np.zeros(nuclei.shape, dtype=np.int64)
    markers[peaks[:, 0], peaks[:, 1]] = np.arange(1, peaks.shape[0] + 1)
    labels = watershed(-depth, markers, mask=nuclei)
    # A component without a peak (none when every component has a maximum) keeps a label of its own.
    orphan = nuclei & (labels == 0)
    if orphan.any():
        extra, n_extra = ndimage.label(orphan)
        labels[orphan] = extra[orphan] + peaks.shape[0]
        return labels, peaks.shape[0] + n_extra
    return labels, peaks.shape[0]


def cell_shares(
    grid: PixelGrid, pixels: np.ndarray, nuclei: Nuclei, image_scalef: float, *, um_per_px: float
) -> sp.csr_matrix:
    """``(P, C + 1)`` share of each tissue pixel's area in each cell; column ``C`` is the area in no cell.

    Each pixel is sampled at points ``CELL_SAMPLING_UM`` apart (``um_per_px``: microns per full-resolution
    pixel), each point taking the cell of the image pixel under it; rows sum to 1.
    """
    per_side = max(1, math.ceil(grid.pixel_px * um_per_px / CELL_SAMPLING_UM))
    offsets = (np.arange(per_side) + 0.5) / per_side
    rows, cols = grid.indices(pixels)
    points = (rows.size, per_side * per_side)
    y = grid.origin_px[1] + (rows[:, None, None] + offsets[None, :, None]) * grid.pixel_px
    x = grid.origin_px[0] + (cols[:, None, None] + offsets[None, None, :]) * grid.pixel_px
    return nuclei.areas(
        np.broadcast_to(x, (rows.size, per_side, per_side)).reshape(points),
        np.broadcast_to(y, (rows.size, per_side, per_side)).reshape(points),
        image_scalef,
        1.0 / points[1],
    )


def footprint_cells(
    coords_px: np.ndarray,
    radius_px: float,
    nuclei: Nuclei,
    image_scalef: float,
    *,
    um_per_px: float,
    pixel_px: float,
) -> sp.csr_matrix:
    """``(S, C + 1)`` area of each cell inside each spot's footprint, in grid pixels (``pixel_px`` a side).

    The disc is sampled at points ``CELL_SAMPLING_UM`` apart on a square lattice, each point taking the cell
    of the image pixel under it; column ``C`` is the footprint's area in no cell.
    """
    step = CELL_SAMPLING_UM / um_per_px
    reach = int(math.floor(radius_px / step))
    dy, dx = (d.ravel() * step for d in np.mgrid[-reach : reach + 1, -reach : reach + 1])
    inside = dx * dx + dy * dy <= radius_px * radius_px
    dx, dy = dx[inside], dy[inside]
    # Each point stands for its share of the disc's exact area.
    point_area = math.pi * radius_px * radius_px / dx.size / (pixel_px * pixel_px)
    return nuclei.areas(coords_px[:, 0:1] + dx, coords_px[:, 1:2] + dy, image_scalef, point_area)


def surrounding_programmes(
    cell_xy: np.ndarray, spot_xy: np.ndarray, abundance: np.ndarray, *, sigma: float, radius: float
) -> np.ndarray:
    r"""``(C, K)`` programme mix of the spots around each cell.

    The Gaussian-weighted mean of the spots' programme shares,

    .. math::

        a_{ck} = \frac{\sum_s \omega_{cs}\, n_{sk} / \sum_j n_{sj}}{\sum_s \omega_{cs}}, \qquad
        \omega_{cs} = \exp\left(-\frac{\lVert x_c - c_s \rVert^2}{2 \sigma^2}\right)
        \mathbf 1\left[\rho < \lVert x_c - c_s \rVert \le 3 \sigma\right],

    leaves out the spot whose footprint (radius :math:`\rho`) holds the cell's centre: the cells the model is
    trained on all lie under a footprint, and would otherwise read their own spot's answer, which a cell in the
    gaps between footprints cannot. A cell with no spot in reach has the uniform mix :math:`1 / K`.

    Parameters
    ----------
    cell_xy, spot_xy
        ``(C, 2)`` cell and ``(S, 2)`` spot centres, in the same frame as ``sigma`` and ``radius``.
    abundance
        ``(S, K)`` non-negative programme abundances :math:`n` of the spots.
    """
    n_programmes = abundance.shape[1]
    shares = abundance / np.maximum(abundance.sum(axis=1, keepdims=True), 1e-300)
    pairs = cKDTree(cell_xy).sparse_distance_matrix(cKDTree(spot_xy), 3.0 * sigma, output_type="coo_matrix")
    keep = pairs.data > radius
    weights = sp.csr_matrix(
        (np.exp(-0.5 * (pairs.data[keep] / sigma) ** 2), (pairs.row[keep], pairs.col[keep])),
        shape=(cell_xy.shape[0], spot_xy.shape[0]),
    )
    total = np.asarray(weights.sum(axis=1)).ravel()
    reached = total > 0
    mix = np.full((cell_xy.shape[0], n_programmes), 1.0 / n_programmes)
    mix[reached] = (weights @ shares)[reached] / total[reached, None]
    return mix


def poisson_nmf(
    counts: np.ndarray, rank: int, *, iterations: int = 500, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    r"""Non-negative factorisation :math:`V \approx W H` under the Poisson (generalised Kullback-Leibler) loss.

    Lee and Seung's multiplicative updates,
    :math:`H \leftarrow H \odot W^\top (V / WH) / W^\top 1` and :math:`W \leftarrow W \odot (V / WH) H^\top /
    1 H^\top`, from a seeded uniform start.

    Parameters
    ----------
    counts
        ``(S, G)`` non-negative :math:`V`.
    rank
        Inner dimension :math:`K`.

    Returns
    -------
    ``(S, K)`` :math:`W` and ``(K, G)`` :math:`H`.

    References
    ----------
    Lee, D. D. & Seung, H. S. Algorithms for non-negative matrix factorization. NIPS 13 (2001).
    """
    counts = np.asarray(counts, dtype=np.float64)
    rng = np.random.default_rng(seed)
    start = math.sqrt(max(float(counts.mean()), 1e-12) / rank)
    W = rng.uniform(0.5, 1.5, (counts.shape[0], rank)) * start
    H = rng.uniform(0.5, 1.5, (rank, counts.shape[1])) * start
    tiny = 1e-12
    for _ in range(iterations):
        H *= (W.T @ (counts / (W @ H + tiny))) / (W.sum(axis=0)[:, None] + tiny)
        W *= ((counts / (W @ H + tiny)) @ H.T) / (H.sum(axis=1)[None, :] + tiny)
    return W, H


# --------------------------------------------------------------------------------------------- model


@dataclass
class SuperResConfig:
    """Settings of :func:`superresolve`.

    Attributes
    ----------
    model
        ``cells`` (default): the cells of the H&E's nuclei, typed from their image features, mixing a few
        expression programmes of the spots; ``network``: a per-pixel network with gene heads and the C3-Diff
        contrastive term (module docstring, ``docs/superres.md``).
    programmes
        Rank of the cell model's Poisson factorisation of the spots (capped by the genes and spots).
    cell_reach_um
        How far a cell reaches beyond its nucleus, in microns (cell model).
    neighbour_sigma
        Width, in spot pitches, of the Gaussian weights of the surrounding spots whose programme mix
        (:func:`surrounding_programmes`) tempers each cell's typing (cell model); 0 types cells from their
        looks alone.
    ensemble
        Cell models fitted from different random starts (seeds ``seed`` onwards) and averaged.
    epochs, learning_rate, weight_decay
        Full-batch training of the model's network (AdamW for ``network``, Adam for ``cells``; weight decay
        for ``network`` only).
    refine_epochs
        Epochs of the cell model's second stage, which refines the network and the programmes together.
    hidden, embedding
        Width of the network's hidden layers and of the per-pixel embedding :math:`h_p` (``network``).
    lambda_agg, lambda_modal
        Weights of the aggregation-consistency and cross-modal contrastive terms (the seed's Table 1: 2, 1).
    temperature
        InfoNCE temperature :math:`\\tau`.
    gain_sigma
        Width of the gain field's Gaussian weights, in spot pitches.
    supersample
        Points per pixel side in the aggregation operator.
    seed
        Seed of the network's initialisation.
    device
        ``cpu``, ``cuda`` or ``auto`` (a GPU when there is one).
    threads
        CPU threads of PyTorch during the call (default: PyTorch's own setting); 1 is fastest on a busy
        machine, where threads wait for each other.
    """

    model: str = "cells"
    programmes: int = 10
    ensemble: int = 8
    neighbour_sigma: float = 1.0
    cell_reach_um: float = CELL_REACH_UM
    epochs: int = 300
    refine_epochs: int = 100
    learning_rate: float = 1e-2
    weight_decay: float = 1e-5
    hidden: int = 64
    embedding: int = 16
    lambda_agg: float = 2.0
    lambda_modal: float = 1.0
    temperature: float = 0.1
    gain_sigma: float = 0.5
    supersample: int = 5
    seed: int = 0
    device: str = "auto"
    threads: int | None = None


def _network(n_features: int, config: SuperResConfig, n_genes: int):
    import torch
    from torch import nn

    class SuperResNet(nn.Module):
        """Per-pixel network on the scale-space features: two hidden layers (1 x 1 convolutions after the
        fixed filter bank), the embedding :math:`h_p`, gene heads and the contrastive projection heads."""

        def __init__(self) -> None:
            super().__init__()
            h, d = config.hidden, config.embedding
            self.body = nn.Sequential(
                nn.Linear(n_features, h), nn.GELU(), nn.Linear(h, h), nn.GELU(), nn.Linear(h, d)
            )
            self.genes = nn.Linear(d, n_genes)
            self.image_projection = nn.Linear(d, d)
            self.expression_encoder = nn.Sequential(nn.Linear(n_genes, 64), nn.GELU(), nn.Linear(64, d))

        def embed(self, features: torch.Tensor) -> torch.Tensor:
            """``(P, F)`` features of pixels -> ``(P, D)`` embeddings."""
            return self.body(features)

    return SuperResNet()


@dataclass
class SuperResResult:
    """Super-resolved maps of one sample.

    Attributes
    ----------
    maps
        ``(P, G)`` float32 expected molecules per tissue pixel (zero outside tissue by construction).
    unprojected
        ``(P, G)`` float32 maps as the model predicts them, before the gain and the projection onto the spots.
    genes
        Gene names.
    grid
        The pixel grid; ``pixels`` the flat indices of its tissue pixels (rows of ``maps``).
    factor
        Pixels per spot pitch.
    aggregation
        ``(S, P)`` operator :math:`A` (CSR), spots in ``adata`` order.
    spot_values
        ``(S, G)`` spot values the maps aggregate to.
    loss_history
        ``epoch``, ``total``, ``aggregation``, ``modal``.
    seconds
        Wall time of training and projection.
    """

    maps: np.ndarray
    unprojected: np.ndarray
    genes: list[str]
    grid: PixelGrid
    pixels: np.ndarray
    factor: int
    aggregation: sp.csr_matrix
    spot_values: np.ndarray
    loss_history: pd.DataFrame
    config: SuperResConfig
    seconds: float = 0.0
    device: str = "cpu"
    extra: dict[str, Any] = field(default_factory=dict)

    def aggregate(self, maps: np.ndarray | None = None) -> np.ndarray:
        """``A @ maps`` (default: the result's maps): the spots' values the maps imply."""
        return np.asarray(self.aggregation @ np.asarray(self.maps if maps is None else maps, np.float64))

    def dense(self, gene: str | int) -> np.ndarray:
        """``(H, W)`` image of one gene's map, zero outside tissue."""
        column = self.genes.index(gene) if isinstance(gene, str) else int(gene)
        image = np.zeros(self.grid.n_pixels, dtype=np.float32)
        image[self.pixels] = self.maps[:, column]
        return image.reshape(self.grid.shape)

    def to_anndata(self, adata: AnnData | None = None) -> AnnData:
        """AnnData of the tissue pixels: ``X`` the maps, ``layers['unprojected']``, ``obs`` ``array_row``,
        ``array_col``, ``in_tissue``; ``obsm['spatial']`` full-resolution pixel centres; ``uns['spatial']``
        the sample's images with ``spot_diameter_fullres`` set to the pixel size, so that
        ``scanpy.pl.spatial`` draws it; ``uns['superres']`` the grid and settings."""
        rows, cols = self.grid.indices(self.pixels)
        obs = pd.DataFrame(
            {"array_row": rows, "array_col": cols, "in_tissue": np.ones(rows.size, dtype=bool)},
            index=pd.Index([f"px_{r:05d}_{c:05d}" for r, c in zip(rows, cols, strict=True)]),
        )
        var = pd.DataFrame(index=pd.Index(self.genes))
        uns: dict[str, Any] = {
            "superres": {
                "factor": int(self.factor),
                "origin_px": list(self.grid.origin_px),
                "pixel_px": float(self.grid.pixel_px),
                "n_rows": int(self.grid.n_rows),
                "n_cols": int(self.grid.n_cols),
                "seconds": float(self.seconds),
                "device": self.device,
                "config": {k: v for k, v in asdict(self.config).items()},
                "aggregation": "A_sp = share of pixel p's area within the spot's disc",
            },
            "loss_history": self.loss_history,
        }
        if adata is not None and "spatial" in adata.uns:
            sample_id = adata.uns.get("undiffuse", {}).get("sample_id") or next(iter(adata.uns["spatial"]))
            library = adata.uns["spatial"][sample_id]
            scalefactors = dict(library.get("scalefactors", {}))
            scalefactors["spot_diameter_fullres"] = float(self.grid.pixel_px)
            uns["spatial"] = {
                sample_id: {
                    "images": dict(library.get("images", {})),
                    "scalefactors": scalefactors,
                    "metadata": dict(library.get("metadata", {})),
                }
            }
            uns["undiffuse"] = {**dict(adata.uns.get("undiffuse", {})), "sample_id": sample_id}
        return AnnData(
            X=self.maps.astype(np.float32),
            obs=obs,
            var=var,
            layers={"unprojected": self.unprojected.astype(np.float32)},
            obsm={"spatial": self.grid.centres_px(self.pixels)},
            uns=uns,
        )


def _source(adata: AnnData) -> str | None:
    return adata.uns.get("undiffuse", {}).get("source") if "undiffuse" in adata.uns else None


def sample_image(adata: AnnData) -> tuple[np.ndarray, float] | None:
    """The sample's best H&E image (hires, else lowres) and its scale factor, or None."""
    sample_id = adata.uns.get("undiffuse", {}).get("sample_id")
    spatial = adata.uns.get("spatial", {})
    if not spatial:
        return None
    library = spatial.get(sample_id) if sample_id in spatial else next(iter(spatial.values()))
    for key in ("hires", "lowres"):
        image = library.get("images", {}).get(key)
        if image is not None and np.asarray(image).size:
            return np.asarray(image), float(library["scalefactors"][f"tissue_{key}_scalef"])
    return None


def spot_inputs(
    adata: AnnData, genes: Sequence[str] | None = None, layer: str | None = None
) -> tuple[np.ndarray, list[str], np.ndarray, np.ndarray, float, float]:
    """Spot values, genes, tissue mask, centres, pitch and footprint radius (full-resolution pixels).

    Spot values come from ``layer``, else layer ``corrected``, else ``X``; the tissue from ``obs['tissue']``,
    else ``obs['in_tissue']``.

    Raises
    ------
    InputError
        Missing genes, coordinates or tissue calls, or values that are negative or not finite.
    """
    from .spatial import spot_pitch, tissue_spots

    source = _source(adata)
    if "spatial" not in adata.obsm:
        raise InputError(source, "no spot coordinates (obsm['spatial']); read the sample with undiffuse")
    genes = list(adata.var_names if genes is None else genes)
    missing = [g for g in genes if g not in adata.var_names]
    if missing:
        raise InputError(source, f"genes not in the sample: {missing[:5]}; pass genes that it measures")
    if not genes:
        raise InputError(source, "no gene to super-resolve; pass at least one gene")
    if layer is None and "corrected" in adata.layers:
        layer = "corrected"
    if layer is not None and layer not in adata.layers:
        raise InputError(source, f"no layer {layer!r}; use one of {list(adata.layers)} or X")
    view = adata[:, genes]
    matrix = view.X if layer is None else view.layers[layer]
    values = as_dense(matrix)
    if not np.all(np.isfinite(values)) or (values < 0).any():
        raise InputError(source, "spot values must be finite and non-negative; pass the corrected sample")
    tissue = tissue_spots(adata, source=source)
    coords = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    pitch = adata.uns.get("undiffuse", {}).get("spot_pitch_px") or spot_pitch(coords)
    diameter = None
    image = sample_image(adata)
    if image is not None or "spatial" in adata.uns:
        for library in adata.uns.get("spatial", {}).values():
            diameter = library.get("scalefactors", {}).get("spot_diameter_fullres", diameter)
    radius = 0.55 * float(pitch) / 2 if not diameter else float(diameter) / 2
    return values, genes, tissue, coords, float(pitch), radius


def _gain_weights(
    pixel_centres: np.ndarray, coords: np.ndarray, spots: np.ndarray, sigma: float
) -> sp.csr_matrix:
    """``(P, S)`` row-normalised Gaussian weights of the spots ``spots`` within 3 sigma of each pixel."""
    tree = cKDTree(coords[spots])
    pairs = tree.sparse_distance_matrix(cKDTree(pixel_centres), 3.0 * sigma, output_type="coo_matrix")
    weights = sp.csr_matrix(
        (np.exp(-0.5 * (pairs.data / sigma) ** 2) + 1e-12, (pairs.col, spots[pairs.row])),
        shape=(pixel_centres.shape[0], coords.shape[0]),
    )
    # Exact zero distances are dropped by the sparse distance matrix: add them back.
    distance, nearest = tree.query(pixel_centres, k=1)
    exact = distance == 0
    if exact.any():
        weights = weights + sp.csr_matrix(
            (np.ones(exact.sum()), (np.flatnonzero(exact), spots[nearest[exact]])), shape=weights.shape
        )
    # Pixels beyond every spot's reach take the nearest spot's gain.
    far = np.asarray(weights.sum(axis=1)).ravel() <= 0
    if far.any():
        weights = weights + sp.csr_matrix(
            (np.ones(far.sum()), (np.flatnonzero(far), spots[nearest[far]])), shape=weights.shape
        )
    norm = np.asarray(weights.sum(axis=1)).ravel()
    return sp.diags(1.0 / norm) @ weights


def project(
    maps: np.ndarray,
    aggregation: sp.csr_matrix,
    spot_values: np.ndarray,
    *,
    tol: float = 1e-7,
    max_iter: int = 500,
) -> np.ndarray:
    r"""Make ``maps`` aggregate exactly to ``spot_values``: :math:`A x_g = y_g` on every spot with a footprint.

    Iterative proportional fitting, :math:`x_{pg} \leftarrow x_{pg} \sum_s A_{sp} r_{sg} / \sum_s A_{sp}`
    with :math:`r_{sg} = y_{sg} / (A x_g)_s`, on the pixels under some footprint; pixels outside every
    footprint are left alone. When footprints do not overlap (Visium) one step is exact. A footprint whose
    map is zero first receives :math:`y_{sg} / \sum_p A_{sp}` on each of its pixels.

    Returns
    -------
    ``(P, G)`` float64 maps.
    """
    x = np.array(maps, dtype=np.float64)
    y = np.asarray(spot_values, dtype=np.float64)
    area = np.asarray(aggregation.sum(axis=1)).ravel()
    has = area > 0
    cover = np.asarray(aggregation.sum(axis=0)).ravel()
    under = cover > 0
    col_norm = sp.diags(np.divide(1.0, cover, out=np.zeros_like(cover), where=under))
    spread = aggregation.T.tocsr()
    current = aggregation @ x
    empty = (current <= 0) & (y > 0) & has[:, None]
    if empty.any():
        fill = np.where(empty, y / np.where(has, area, 1.0)[:, None], 0.0)
        footprint = (spread > 0).astype(np.float64)
        x += footprint @ fill
        current = aggregation @ x
    for _ in range(max_iter):
        ratio = np.divide(y, current, out=np.ones_like(y), where=current > 0)
        ratio[~has] = 1.0
        factor = col_norm @ (spread @ ratio)
        x[under] *= factor[under]
        current = aggregation @ x
        scale = np.maximum(np.abs(y).max(axis=0), 1e-300)
        if np.max(np.abs(current[has] - y[has]) / scale) <= tol:
            break
    return x


def superresolve(
    adata: AnnData,
    *,
    factor: int = 10,
    genes: Sequence[str] | None = None,
    layer: str | None = None,
    image: np.ndarray | None = None,
    image_scalef: float | None = None,
    origin_px: tuple[float, float] | None = None,
    config: SuperResConfig | None = None,
    progress: bool = False,
    **overrides: Any,
) -> SuperResResult:
    """Super-resolve the corrected spot maps of a sample with its H&E image (module docstring).

    Parameters
    ----------
    adata
        Corrected sample (``corrected.h5ad`` or :meth:`CorrectionResult.to_anndata`): spots x genes with
        ``obsm['spatial']``, tissue calls and the image in ``uns['spatial']``.
    factor
        Pixels per spot pitch (5: 20 um pixels on Visium, 10: 10 um).
    genes
        Genes to super-resolve (default: all).
    layer
        Spot values (default: layer ``corrected`` when present, else ``X``).
    image, image_scalef
        H&E image (RGB in [0, 1]) and its pixels per full-resolution pixel (default: the sample's hires or
        lowres image).
    origin_px
        A corner of the grid, in full-resolution pixels (default: one pitch beyond the spots' bounding box).
    config, **overrides
        :class:`SuperResConfig` and any of its fields.

    Returns
    -------
    SuperResResult

    Raises
    ------
    InputError
        The sample lacks coordinates, tissue calls, an image or the genes, or holds invalid values.
    """
    import torch

    config = SuperResConfig(**{**asdict(config or SuperResConfig()), **overrides})
    if config.model not in MODELS:
        raise ValueError(f"unknown super-resolution model {config.model!r}; use one of {MODELS}")
    if factor < 1:
        raise InputError(_source(adata), f"the super-resolution factor must be at least 1, got {factor}")
    values, genes, tissue, coords, pitch, radius = spot_inputs(adata, genes, layer)
    if image is None:
        found = sample_image(adata)
        if found is None:
            raise InputError(
                _source(adata), "no H&E image in uns['spatial']; super-resolution needs the tissue image"
            )
        image, image_scalef = found
    image = np.asarray(image, dtype=np.float64)
    if image.max() > 1.0:
        image = image / 255.0
    image_scalef = 1.0 if image_scalef is None else float(image_scalef)
    start = time.perf_counter()
    device = torch.device(
        "cuda"
        if config.device == "auto" and torch.cuda.is_available()
        else "cpu"
        if config.device == "auto"
        else config.device
    )
    torch.manual_seed(config.seed)
    previous_threads = torch.get_num_threads()
    if config.threads is not None and device.type == "cpu":
        torch.set_num_threads(int(config.threads))
    try:
        return _fit(
            adata,
            values,
            genes,
            tissue,
            coords,
            pitch,
            radius,
            image,
            image_scalef,
            factor,
            origin_px,
            config,
            device,
            progress,
            start,
        )
    finally:
        torch.set_num_threads(previous_threads)


def _fit(
    adata,
    values,
    genes,
    tissue,
    coords,
    pitch,
    radius,
    image,
    image_scalef,
    factor,
    origin_px,
    config,
    device,
    progress,
    start,
) -> SuperResResult:
    """The body of :func:`superresolve`, once its inputs are checked."""
    from .tissue import image_tissue_pixels

    grid = pixel_grid(coords, pitch, factor, origin_px=origin_px)
    mask = image_tissue_pixels(image, spot_radius_px=radius * image_scalef) if image.ndim == 3 else None
    pixels = tissue_pixels(grid, coords, tissue, pitch, radius, image_mask=mask, image_scalef=image_scalef)
    A = aggregation_matrix(grid, coords, radius, pixels, supersample=config.supersample)
    values = np.where(tissue[:, None], values, 0.0)  # off-tissue spots have no tissue pixel to hold values
    # Training data: tissue spots whose footprint holds tissue pixels.
    area = np.asarray(A.sum(axis=1)).ravel()
    train = np.flatnonzero(tissue & (area > 0))
    if config.model == "cells":
        from .qc import spot_pitch_um

        um_per_px = spot_pitch_um(adata) / pitch
        rgb = image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=2)
        nuclei = segment_nuclei(
            rgb, um_per_px / image_scalef, tissue_mask=mask, reach_um=config.cell_reach_um
        )
        shares = cell_shares(grid, pixels, nuclei, image_scalef, um_per_px=um_per_px)
        spot_cells = footprint_cells(
            coords[train], radius, nuclei, image_scalef, um_per_px=um_per_px, pixel_px=grid.pixel_px
        )
        surroundings = (
            partial(
                surrounding_programmes,
                nuclei.centres / image_scalef,
                coords[train],
                sigma=config.neighbour_sigma * pitch,
                radius=radius,
            )
            if config.neighbour_sigma > 0
            else None
        )
        # Members differ in their random starts only; their mean is still exact after the projection.
        members = [
            _cell_model(
                values,
                train,
                spot_cells,
                shares,
                nuclei.features,
                surroundings,
                config,
                seed,
                device,
                progress,
            )
            for seed in range(config.seed, config.seed + config.ensemble)
        ]
        unprojected = np.mean([maps for maps, _ in members], axis=0)
        history = pd.concat([part.assign(member=k) for k, (_, part) in enumerate(members)], ignore_index=True)
        # The cells already spread each footprint's molecules: the projection alone makes them exact.
        guess = unprojected
        extra = {"cells": nuclei.n_cells}
    else:
        features = image_features(image, image_scalef, grid, pitch_px=pitch)
        features = features.reshape(features.shape[0], -1).T[pixels]  # (P, F) over tissue pixels
        unprojected, history = _network_model(values, train, A, features, config, device, progress)
        gain = _gain_weights(grid.centres_px(pixels), coords, train, config.gain_sigma * pitch)
        eps = 0.1 * np.maximum(values[train].mean(axis=0), 1e-6)
        guess = unprojected * np.exp(gain @ np.log((values + eps) / (A @ unprojected + eps)))
        extra = {}
    maps = project(guess, A, values)
    return SuperResResult(
        maps=maps.astype(np.float32),
        unprojected=unprojected.astype(np.float32),
        genes=genes,
        grid=grid,
        pixels=pixels,
        factor=int(factor),
        aggregation=A,
        spot_values=values,
        loss_history=history,
        config=config,
        seconds=time.perf_counter() - start,
        device=str(device),
        extra=extra,
    )


def _torch_sparse(matrix: sp.spmatrix, device) -> Any:
    """A SciPy sparse matrix as a coalesced float32 ``torch`` COO tensor on ``device``."""
    import torch

    coo = matrix.tocoo()
    return (
        torch.sparse_coo_tensor(
            torch.as_tensor(np.vstack([coo.row, coo.col]), dtype=torch.int64),
            torch.as_tensor(coo.data, dtype=torch.float32),
            size=coo.shape,
            check_invariants=True,
        )
        .coalesce()
        .to(device)
    )


def _cell_model(
    values, train, spot_cells, shares, cell_features, surroundings, config, seed, device, progress
):
    r"""The cell model: ``(P, G)`` maps before the projection onto the spots, and the loss history.

    1. The tissue spots' values are factorised, :math:`y_s \approx n_s M` (:func:`poisson_nmf`, ``programmes``
       expression programmes :math:`M` per unit area, abundances :math:`n_s` in pixel areas).
    2. Cell :math:`c` has programme weights :math:`w_c = \mathrm{softmax}(f_\theta(\phi_c))_{1..K}` (the last
       of :math:`K + 1` classes emits nothing); area outside every cell has one learned set of weights. When
       ``surroundings`` is given (it maps the abundances to the ``(C, K)`` programme mix :math:`a_c` of the
       spots around each cell, :func:`surrounding_programmes`), the weights are
       :math:`\mathrm{softmax}(f_\theta(\phi_c) + \beta \log(a_c + \epsilon))_{1..K}`: the cell's looks
       times its surroundings' mix raised to a learned power :math:`\beta` (from 0), a tempered Bayes rule
       whose prior strength the spots decide.
       :math:`f_\theta` is trained (``epochs``) so that the cell areas :math:`C` in the training spots'
       footprints (:func:`footprint_cells`) reproduce the abundances, under the Poisson deviance of
       :math:`C w` against :math:`n`.
    3. The network and the programmes are refined together (``refine_epochs``) under the Poisson deviance of
       the genes, :math:`\sum_g \frac{1}{m_g} \sum_s (C w M)_{sg} - y_{sg} \log (C w M)_{sg}`, each gene
       weighted by its mean :math:`m_g` so that all genes count.

    Pixel maps are :math:`S w M`, ``S`` the pixels' cell shares (:func:`cell_shares`). ``seed`` starts the
    factorisation and the network.
    """
    import torch

    from .trainer import Adam

    rank = max(1, min(config.programmes, values.shape[1], train.size))
    scale = np.maximum(values[train].mean(axis=0), 1e-6)
    abundance, programmes = poisson_nmf(values[train] / scale, rank, seed=seed)
    # Abundances in pixel areas, so that a unit of a cell's area carries at most a unit of programme.
    unit = float(np.asarray(spot_cells.sum(axis=1)).mean()) / max(float(abundance.sum(axis=1).mean()), 1e-12)
    abundance, programmes = abundance * unit, programmes * scale / unit

    n_cells = cell_features.shape[0]
    torch.manual_seed(seed)
    used = np.unique(spot_cells.indices)
    has_background = bool(used.size and used[-1] == n_cells)
    C = _torch_sparse(spot_cells[:, used], device)
    features = torch.as_tensor(cell_features, device=device)
    # The log of the surrounding spots' programme mix, added to the logits with a learned weight.
    surrounding = torch.zeros((n_cells, rank + 1), device=device)
    if surroundings is not None:
        mix = np.log(surroundings(abundance) + SURROUNDING_FLOOR)
        surrounding[:, :rank] = torch.as_tensor(mix, dtype=torch.float32, device=device)
    in_footprints = torch.as_tensor(used[used < n_cells], device=device)
    trained_cells = (features[in_footprints], surrounding[in_footprints])
    temper = torch.zeros(1, device=device, requires_grad=True)
    net = torch.nn.Sequential(
        torch.nn.Linear(cell_features.shape[1], config.hidden),
        torch.nn.GELU(),
        torch.nn.Linear(config.hidden, config.hidden),
        torch.nn.GELU(),
        torch.nn.Linear(config.hidden, rank + 1),
    ).to(device)
    background = torch.zeros(rank + 1, device=device, requires_grad=True)

    def weights(cells: tuple[torch.Tensor, torch.Tensor], with_background: bool) -> torch.Tensor:
        """Programme weights of cells given as their ``(looks, surrounding mix)`` rows."""
        looks, mix = cells
        w = torch.softmax(net(looks) + temper * mix, dim=1)[:, :rank]
        return torch.cat([w, torch.softmax(background, dim=0)[None, :rank]]) if with_background else w

    def deviance(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        tiny = 1e-8
        return predicted - target + target * torch.log((target + tiny) / (predicted + tiny))

    target = torch.as_tensor(abundance, dtype=torch.float32, device=device)
    counts = torch.as_tensor(values[train], dtype=torch.float32, device=device)
    gene_scale = torch.as_tensor(scale, dtype=torch.float32, device=device)
    log_programmes = torch.log(torch.as_tensor(programmes, dtype=torch.float32, device=device) + 1e-12)
    log_programmes.requires_grad_(True)
    history = []
    from tqdm.auto import tqdm

    stages = [("programmes", config.epochs), ("genes", config.refine_epochs)]
    bar = tqdm(
        total=config.epochs + config.refine_epochs,
        desc=f"superres model {seed - config.seed + 1}/{config.ensemble}",
        disable=None if progress else True,
    )
    for stage, epochs in stages:
        trained = [*net.parameters(), background, temper] + ([log_programmes] if stage == "genes" else [])
        optimiser = Adam(trained, lr=config.learning_rate)
        for _ in range(epochs):
            optimiser.zero_grad()
            areas = torch.sparse.mm(C, weights(trained_cells, has_background))
            if stage == "programmes":
                loss = torch.mean(deviance(areas, target))
            else:
                loss = torch.mean(deviance(areas @ torch.exp(log_programmes), counts) / gene_scale)
            loss.backward()
            optimiser.step()
            history.append((len(history), stage, loss.item()))
            bar.update()
    bar.close()
    with torch.no_grad():
        cell_weights = weights((features, surrounding), True).cpu().numpy()
        programmes = torch.exp(log_programmes).cpu().numpy()
    maps = (shares @ cell_weights.astype(np.float64)) @ programmes.astype(np.float64)
    return maps, pd.DataFrame(history, columns=["epoch", "stage", "loss"])


def _network_model(values, train, A, features, config, device, progress):
    """The network model (module docstring): ``(P, G)`` maps before projection and the loss history."""
    import torch

    area = np.asarray(A.sum(axis=1)).ravel()
    A_train = A[train]
    used = np.unique(A_train.indices)
    scale = np.maximum(values[train].mean(axis=0), 1e-6)
    target = np.log1p(values[train] / scale)
    net = _network(features.shape[1], config, values.shape[1]).to(device)
    with torch.no_grad():
        density = values[train].sum(axis=0) / max(area[train].sum(), 1e-12)
        net.genes.bias.copy_(torch.as_tensor(np.log(np.maximum(density, 1e-6)), dtype=torch.float32))
        net.genes.weight.mul_(0.1)
    feats_used = torch.as_tensor(features[used], device=device)
    A_t = _torch_sparse(A_train[:, used], device)
    area_t = torch.as_tensor(area[train], dtype=torch.float32, device=device)[:, None]
    scale_t = torch.as_tensor(scale, dtype=torch.float32, device=device)
    target_t = torch.as_tensor(target, dtype=torch.float32, device=device)
    labels = torch.arange(train.size, device=device)
    optimiser = torch.optim.AdamW(
        net.parameters(),
        lr=config.learning_rate,
        weight_decay=config.weight_decay,
        betas=(0.9, 0.999),
        eps=1e-8,
    )
    history = []
    from tqdm.auto import tqdm

    for epoch in tqdm(range(config.epochs), desc="superres", disable=None if progress else True):
        optimiser.zero_grad()
        h = net.embed(feats_used)
        log_x = net.genes(h).clamp(max=30.0)
        pred = torch.sparse.mm(A_t, torch.exp(log_x))
        agg = torch.mean((torch.log1p(pred / scale_t) - target_t) ** 2)
        loss = config.lambda_agg * agg
        modal = torch.zeros((), device=device)
        if config.lambda_modal > 0 and train.size > 1:
            pooled = torch.sparse.mm(A_t, h) / area_t
            u = torch.nn.functional.normalize(net.image_projection(pooled), dim=1)
            v = torch.nn.functional.normalize(net.expression_encoder(target_t), dim=1)
            logits = u @ v.T / config.temperature
            modal = 0.5 * (
                torch.nn.functional.cross_entropy(logits, labels)
                + torch.nn.functional.cross_entropy(logits.T, labels)
            )
            loss = loss + config.lambda_modal * modal
        loss.backward()
        optimiser.step()
        history.append((epoch, loss.item(), agg.item(), modal.item()))

    with torch.no_grad():
        network = np.concatenate(
            [
                torch.exp(net.genes(net.embed(torch.as_tensor(chunk, device=device))).clamp(max=30.0))
                .cpu()
                .numpy()
                for chunk in np.array_split(features, max(1, features.shape[0] // 65536))
            ]
        ).astype(np.float64)
    return network, pd.DataFrame(history, columns=["epoch", "total", "aggregation", "modal"])


# --------------------------------------------------------------------------------------------- baselines


def _densities(values: np.ndarray, radius_px: float) -> np.ndarray:
    """Spot values -> molecules per full-resolution pixel area (spot value over the footprint's area)."""
    return values / (math.pi * radius_px * radius_px)


def nearest_spot(
    grid: PixelGrid, pixels: np.ndarray, coords: np.ndarray, values: np.ndarray, radius_px: float
) -> np.ndarray:
    """Baseline: each pixel takes the density of its nearest spot, times the pixel's area."""
    _, nearest = cKDTree(coords).query(grid.centres_px(pixels), k=1)
    return _densities(values, radius_px)[nearest] * grid.pixel_px**2


def bicubic(
    grid: PixelGrid, pixels: np.ndarray, coords: np.ndarray, values: np.ndarray, radius_px: float
) -> np.ndarray:
    """Baseline: piecewise cubic (Clough-Tocher) interpolation of the spot densities at the pixel centres,
    the bicubic upsampling of a map on Visium's hexagonal lattice; negative values clipped to zero, pixels
    beyond the spots' hull take the nearest spot."""
    from scipy.interpolate import CloughTocher2DInterpolator

    centres = grid.centres_px(pixels)
    density = _densities(values, radius_px)
    out = CloughTocher2DInterpolator(coords, density, fill_value=np.nan)(centres)
    out = np.asarray(out, dtype=np.float64).reshape(centres.shape[0], -1)
    missing = ~np.isfinite(out).all(axis=1)
    if missing.any():
        _, nearest = cKDTree(coords).query(centres[missing], k=1)
        out[missing] = density[nearest]
    return np.clip(out, 0.0, None) * grid.pixel_px**2


def guided_filter(
    grid: PixelGrid,
    pixels: np.ndarray,
    upsampled: np.ndarray,
    guide: np.ndarray,
    *,
    radius: int,
    eps: float = 1e-2,
) -> np.ndarray:
    r"""Baseline: He et al.'s guided filter of an upsampled map (e.g. :func:`bicubic`) with the H&E as guide.

    With box means over windows of ``2 radius + 1`` pixels, :math:`a = \mathrm{cov}(I, p) / (\mathrm{var}(I)
    + \epsilon)`, :math:`b = \bar p - a \bar I` and :math:`q = \bar a I + \bar b`; the guide :math:`I` is
    ``guide`` (``(H, W)``, standardised), each gene is filtered on its own scale (divided by its mean) and
    clipped at zero; pixels outside tissue stay zero.

    Returns
    -------
    ``(P, G)`` filtered maps on ``pixels``.
    """
    size = 2 * radius + 1
    inside = np.zeros(grid.n_pixels, dtype=np.float64)
    inside[pixels] = 1.0
    inside = inside.reshape(grid.shape)

    def box(a: np.ndarray) -> np.ndarray:
        # Mean over the tissue pixels of each window (normalised convolution).
        num = ndimage.uniform_filter(a * inside, size=size, mode="constant")
        den = ndimage.uniform_filter(inside, size=size, mode="constant")
        return np.divide(num, den, out=np.zeros_like(num), where=den > 1e-9)

    guide = np.asarray(guide, dtype=np.float64)
    guide = (guide - guide[inside > 0].mean()) / max(guide[inside > 0].std(), 1e-12)
    mean_i = box(guide)
    var_i = box(guide * guide) - mean_i**2
    out = np.zeros_like(upsampled, dtype=np.float64)
    for g in range(upsampled.shape[1]):
        level = max(float(upsampled[:, g].mean()), 1e-12)
        p = np.zeros(grid.n_pixels)
        p[pixels] = upsampled[:, g] / level
        p = p.reshape(grid.shape)
        mean_p = box(p)
        a = (box(guide * p) - mean_i * mean_p) / (var_i + eps)
        b = mean_p - a * mean_i
        q = box(a) * guide + box(b)
        out[:, g] = np.clip(q.ravel()[pixels], 0.0, None) * level
    return out


# --------------------------------------------------------------------------------------------- cell types


def pixel_cell_types(maps: np.ndarray, genes: Sequence[str], markers: pd.DataFrame) -> pd.DataFrame:
    """Cell type and score of every pixel, as the seed's section 4 defines it: each marker's map min-max
    scaled over the tissue pixels, the mean over a type's markers, argmax and its score
    (:mod:`undiffuse.celltypes`).

    Returns
    -------
    DataFrame (one row per row of ``maps``): ``cell_type``, ``score`` and ``score_{type}`` per type.
    """
    from .celltypes import assign_types, marker_sets, type_scores

    sets = marker_sets(markers, list(genes))
    if not sets:
        raise ValueError("none of the marker genes is among the super-resolved genes")
    column_of = {g: k for k, g in enumerate(genes)}
    used = sorted({g for members in sets.values() for g in members})
    scores = type_scores(np.asarray(maps)[:, [column_of[g] for g in used]], used, sets)
    return assign_types(scores).join(scores.add_prefix("score_"))


def write_result(result: SuperResResult, adata: AnnData, path: str | Path) -> Path:
    """Write the result's AnnData (:meth:`SuperResResult.to_anndata`) atomically."""
    from .atomic import atomic_path

    out = result.to_anndata(adata)
    with atomic_path(path) as tmp:
        out.write_h5ad(tmp, compression="gzip")
    return Path(path)


# --------------------------------------------------------------------------------------------- report


def most_changed_genes(adata: AnnData, genes: Sequence[str], n: int) -> list[str]:
    """The ``n`` genes the correction moved most (:func:`undiffuse.metrics.relative_change` between the raw
    counts ``X`` and ``layers['corrected']``); the first ``n`` of ``genes`` without that layer."""
    from .metrics import relative_change

    genes = list(genes)
    if "corrected" not in adata.layers:
        return genes[:n]
    view = adata[:, genes]
    before, after = (as_dense(m) for m in (view.X, view.layers["corrected"]))
    order = np.argsort(-relative_change(before, after), kind="stable")
    return [genes[k] for k in order[:n]]


def _extent(result: SuperResResult, scalef: float) -> list[float]:
    x0, y0 = result.grid.origin_px
    side = result.grid.pixel_px
    return [
        x0 * scalef,
        (x0 + result.grid.n_cols * side) * scalef,
        (y0 + result.grid.n_rows * side) * scalef,
        y0 * scalef,
    ]


def plot_maps(result: SuperResResult, adata: AnnData, genes: Sequence[str], path: str | Path) -> Path:
    """Figure: each gene's super-resolved map over the H&E image (pixels outside tissue transparent)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .atomic import atomic_path

    found = sample_image(adata)
    genes = list(genes)
    fig, axes = plt.subplots(1, max(len(genes), 1), figsize=(3.2 * max(len(genes), 1), 3.4), squeeze=False)
    for ax, gene in zip(axes[0], genes, strict=False):
        extent = _extent(result, found[1] if found else 1.0)
        if found:
            ax.imshow(found[0], extent=None)
        image = np.ma.masked_where(result.dense(gene) <= 0, result.dense(gene))
        shown = ax.imshow(image, extent=extent, cmap="magma", alpha=0.85, interpolation="nearest")
        ax.set_xlim(extent[0], extent[1])
        ax.set_ylim(extent[2], extent[3])
        ax.set_title(f"{gene} ({result.factor}x)", fontsize=9)
        ax.set_axis_off()
        fig.colorbar(shown, ax=ax, fraction=0.046, label="molecules / pixel")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return Path(path)


def plot_cell_types(result: SuperResResult, adata: AnnData, typed: pd.DataFrame, path: str | Path) -> Path:
    """Figure: the cell type of each tissue pixel (seed section 4) and its score, over the H&E image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    from .atomic import atomic_path

    found = sample_image(adata)
    extent = _extent(result, found[1] if found else 1.0)
    names = sorted(typed["cell_type"].unique())
    codes = np.full(result.grid.n_pixels, np.nan)
    codes[result.pixels] = pd.Categorical(typed["cell_type"], categories=names).codes
    scores = np.full(result.grid.n_pixels, np.nan)
    scores[result.pixels] = typed["score"].to_numpy()
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.6))
    colours = ListedColormap(plt.get_cmap("tab10").colors[: max(len(names), 1)])
    for ax, values, cmap, title in (
        (axes[0], codes, colours, f"cell type per pixel ({result.factor}x)"),
        (axes[1], scores, "viridis", "score of the type"),
    ):
        if found:
            ax.imshow(found[0])
        shown = ax.imshow(
            np.ma.masked_invalid(values.reshape(result.grid.shape)),
            extent=extent,
            cmap=cmap,
            interpolation="nearest",
            alpha=0.9,
            **({"vmin": -0.5, "vmax": len(names) - 0.5} if ax is axes[0] else {}),
        )
        ax.set_xlim(extent[0], extent[1])
        ax.set_ylim(extent[2], extent[3])
        ax.set_title(title, fontsize=9)
        ax.set_axis_off()
        bar = fig.colorbar(shown, ax=ax, fraction=0.046)
        if ax is axes[0]:
            bar.set_ticks(range(len(names)), labels=names)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return Path(path)
