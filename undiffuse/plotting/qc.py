"""QC figures of the prepare step: tissue mask over the H&E image, total counts on the slide, background
decay curve. Each function returns a new :class:`~matplotlib.figure.Figure`, made without pyplot so that
no global state or backend is touched; save it with ``fig.savefig``, or let a notebook display it.

Visium spots are drawn as markers. Visium HD bins (up to millions) are drawn as a raster image instead: the
values are averaged over blocks of bins so that the raster has at most :data:`DISPLAY_PIXELS` pixels a
side, and the raster is placed on the H&E image by the affine map from array indices to pixels (which also
holds for a slightly rotated slide).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from anndata import AnnData
from matplotlib.axes import Axes
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.transforms import Affine2D
from skimage import transform

from ..qc import DecayFit, DiffusionEstimate, is_visium_hd
from ..spatial import SPATIAL_KEY
from ..tissue import TissueMask, pick_image

FIGURE_SIZE = (6.5, 6.0)

#: Longest side of an image drawn under spots.
DISPLAY_PIXELS = 1000


def _draw_image(adata: AnnData, ax: Axes, *, prefer: str) -> float:
    """Draw the H&E image (when there is one); return the factor from full-resolution to drawn pixels."""
    picked = pick_image(adata, prefer=prefer)
    if picked is None:
        ax.invert_yaxis()
        return 1.0
    _, image, scale = picked
    # A figure a few inches wide shows no more than about a thousand pixels.
    block = max(int(np.ceil(max(image.shape[:2]) / DISPLAY_PIXELS)), 1)
    if block > 1:
        image = transform.downscale_local_mean(image[..., :3], (block, block, 1))
        scale /= block
    ax.imshow(np.clip(image, 0.0, 1.0))
    return scale


def _slide_axes(adata: AnnData, ax: Axes) -> tuple[np.ndarray, float]:
    """Draw the H&E image (when there is one) and return spot centres in its pixels and a marker size."""
    coords = np.asarray(adata.obsm[SPATIAL_KEY], dtype=np.float64)
    scale = _draw_image(adata, ax, prefer="lowres")
    coords_px = coords * scale
    pitch_px = float(adata.uns["undiffuse"]["spot_pitch_px"]) * scale
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    # Marker area in points^2 so that markers roughly fill the spot lattice at this figure size.
    span = max(np.ptp(coords_px[:, 0]), np.ptp(coords_px[:, 1]), pitch_px)
    size = (0.8 * pitch_px / span * FIGURE_SIZE[0] * 72 * 0.8) ** 2
    return coords_px, size


class _BinRaster:
    """Bins of a square lattice gathered into raster pixels of ``block x block`` bins, placed on the slide."""

    def __init__(self, adata: AnnData, scale: float) -> None:
        rows = adata.obs["array_row"].to_numpy(dtype=np.int64)
        cols = adata.obs["array_col"].to_numpy(dtype=np.int64)
        self.row0, self.col0 = int(rows.min()), int(cols.min())
        extent = max(int(rows.max()) - self.row0, int(cols.max()) - self.col0) + 1
        self.block = max(int(np.ceil(extent / DISPLAY_PIXELS)), 1)
        r, c = (rows - self.row0) // self.block, (cols - self.col0) // self.block
        self.shape = (int(r.max()) + 1, int(c.max()) + 1)
        self.pixel = r * self.shape[1] + c
        self.n_bins = np.bincount(self.pixel, minlength=self.shape[0] * self.shape[1])
        # Affine map from (array_col, array_row) to drawn pixels, fitted on the bins themselves.
        design = np.column_stack([cols, rows, np.ones(cols.size)]).astype(np.float64)
        coords = np.asarray(adata.obsm[SPATIAL_KEY], dtype=np.float64) * scale
        step = max(1, cols.size // 100_000)
        (a, b), (c_, d), (e, f) = np.linalg.lstsq(design[::step], coords[::step], rcond=None)[0]
        self.affine = Affine2D.from_values(a, b, c_, d, e, f)

    def mean(self, values: np.ndarray) -> np.ma.MaskedArray:
        """Mean of ``values`` over the bins of each raster pixel; pixels without bins are masked."""
        sums = np.bincount(self.pixel, np.asarray(values, dtype=np.float64), minlength=self.n_bins.size)
        mean = np.divide(sums, self.n_bins, out=np.zeros_like(sums), where=self.n_bins > 0)
        return np.ma.masked_array(mean.reshape(self.shape), mask=(self.n_bins == 0).reshape(self.shape))

    def show(self, ax: Axes, raster: np.ndarray, **kwargs: object):
        """Draw a raster (2-D values or RGBA) at its place on the slide; returns the image artist."""
        left, top = self.col0 - 0.5, self.row0 - 0.5
        extent = (left, left + self.shape[1] * self.block, top + self.shape[0] * self.block, top)
        artist = ax.imshow(raster, extent=extent, origin="upper", interpolation="nearest", **kwargs)
        artist.set_transform(self.affine + ax.transData)
        return artist


def _finish_raster_axes(ax: Axes, adata: AnnData, scale: float) -> None:
    """Frame the bins and hide the ticks.

    Limits are set by hand: autoscaling sees a raster's extent in array indices, before its transform.
    """
    coords = np.asarray(adata.obsm[SPATIAL_KEY], dtype=np.float64) * scale
    pad = 0.02 * float(np.ptp(coords, axis=0).max())
    ax.set_xlim(coords[:, 0].min() - pad, coords[:, 0].max() + pad)
    ax.set_ylim(coords[:, 1].max() + pad, coords[:, 1].min() - pad)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])


def _plot_tissue_mask_raster(adata: AnnData, mask: TissueMask) -> Figure:
    fig = Figure(figsize=FIGURE_SIZE)
    ax = fig.subplots()
    scale = _draw_image(adata, ax, prefer="hires")
    raster = _BinRaster(adata, scale)
    layers = [(mask.tissue, "tab:green", 0.35, f"tissue ({int(mask.tissue.sum())} bins)")]
    if mask.image_spots is not None:
        image_only = mask.image_spots & ~mask.in_tissue
        in_tissue_only = ~mask.image_spots & mask.in_tissue
        layers += [
            (image_only, "tab:blue", 0.8, f"image only ({int(image_only.sum())})"),
            (in_tissue_only, "tab:red", 0.8, f"in_tissue only ({int(in_tissue_only.sum())})"),
        ]
    handles = []
    for selected, colour, alpha, label in layers:
        share = raster.mean(selected.astype(np.float64)).filled(0.0)
        rgba = np.zeros((*share.shape, 4))
        rgba[..., :3] = to_rgba(colour)[:3]
        rgba[..., 3] = alpha * np.minimum(share * 2.0, 1.0)  # a pixel half covered is fully coloured
        raster.show(ax, rgba)
        handles.append(Patch(color=colour, alpha=alpha, label=label))
    _finish_raster_axes(ax, adata, scale)
    title = f"Tissue mask ({mask.source})"
    if mask.image_spots is not None:
        title += f"; image vs in_tissue Jaccard {mask.agreement()['mask_jaccard']:.3f}"
    ax.set_title(title)
    ax.legend(handles=handles, loc="lower left", fontsize=7, framealpha=0.8)
    fig.tight_layout()
    return fig


def plot_tissue_mask(adata: AnnData, mask: TissueMask) -> Figure:
    """Spots of the tissue mask over the H&E image; where an image mask exists, spots on which it and
    Space Ranger's ``in_tissue`` disagree are marked. Visium HD bins are drawn as a raster."""
    if is_visium_hd(adata):
        return _plot_tissue_mask_raster(adata, mask)
    fig = Figure(figsize=FIGURE_SIZE)
    ax = fig.subplots()
    coords_px, size = _slide_axes(adata, ax)
    tissue = mask.tissue
    ax.scatter(
        *coords_px[tissue].T,
        s=size,
        facecolors="none",
        edgecolors="tab:green",
        linewidths=0.6,
        label=f"tissue ({tissue.sum()} spots)",
    )
    if mask.image_spots is not None:
        image_only = mask.image_spots & ~mask.in_tissue
        spaceranger_only = ~mask.image_spots & mask.in_tissue
        ax.scatter(
            *coords_px[image_only].T,
            s=size,
            c="tab:blue",
            marker="x",
            label=f"image only ({image_only.sum()})",
        )
        ax.scatter(
            *coords_px[spaceranger_only].T,
            s=size,
            c="tab:red",
            marker="x",
            label=f"in_tissue only ({spaceranger_only.sum()})",
        )
        jaccard = mask.agreement()["mask_jaccard"]
        ax.set_title(f"Tissue mask ({mask.source}); image vs in_tissue Jaccard {jaccard:.3f}")
    else:
        ax.set_title(f"Tissue mask ({mask.source}); no image")
    ax.legend(loc="lower left", fontsize=7, framealpha=0.8)
    fig.tight_layout()
    return fig


def plot_total_counts(adata: AnnData, total_counts: np.ndarray) -> Figure:
    """Total UMIs of every spot (log10 scale) on the slide, background included; Visium HD bins are drawn
    as a raster of the mean over blocks of bins."""
    fig = Figure(figsize=FIGURE_SIZE)
    ax = fig.subplots()
    values = np.log10(np.asarray(total_counts, dtype=np.float64) + 1.0)
    if is_visium_hd(adata):
        scale = _draw_image(adata, ax, prefer="hires")
        raster = _BinRaster(adata, scale)
        points = raster.show(ax, raster.mean(values), cmap="viridis")
        _finish_raster_axes(ax, adata, scale)
        unit = f"bin, mean over {raster.block} x {raster.block} bins" if raster.block > 1 else "bin"
        ax.set_title(f"Total counts per {unit}, all bins")
    else:
        coords_px, size = _slide_axes(adata, ax)
        points = ax.scatter(*coords_px.T, c=values, s=size, cmap="viridis", linewidths=0)
        ax.set_title("Total counts per spot, all spots")
    fig.colorbar(points, ax=ax, shrink=0.8, label="log10(total UMIs + 1)")
    fig.tight_layout()
    return fig


def plot_background_decay(
    decay: pd.DataFrame, estimate: DiffusionEstimate, fits: dict[str, DecayFit] | None = None
) -> Figure:
    """Median (and interquartile range) of background UMIs against distance to the tissue, with the
    fitted decay curves and the estimated cutoff."""
    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.subplots()
    if decay.empty:
        ax.text(0.5, 0.5, "no background spots", ha="center", va="center", transform=ax.transAxes)
    else:
        distance = decay["distance"].to_numpy(dtype=np.float64)
        if estimate.statistic == "mean":
            centre = decay["mean_umis"].to_numpy(dtype=np.float64)
            spread = 1.96 * decay["sem_umis"].to_numpy(dtype=np.float64)
            ax.fill_between(
                distance, np.maximum(centre - spread, 0.0), centre + spread, color="0.85", label="95% CI"
            )
            ax.plot(distance, centre, "o-", color="black", ms=3, label="mean")
        else:
            ax.fill_between(distance, decay["q25_umis"], decay["q75_umis"], color="0.85", label="IQR")
            ax.plot(distance, decay["median_umis"], "o-", color="black", ms=3, label="median")
        grid = np.linspace(max(float(distance.min()), 0.5), float(distance.max()), 200)
        styles = {"gaussian": ("tab:blue", "--"), "heavy_tailed": ("tab:orange", ":")}
        for kind, fit in (fits or {}).items():
            colour, style = styles.get(kind, ("tab:grey", "-."))
            ax.plot(grid, fit.predict(grid), style, color=colour, label=f"fit {kind.replace('_', '-')}")
        ax.axvline(
            estimate.cutoff,
            color="tab:red",
            lw=1,
            label=f"cutoff {estimate.cutoff:.1f}" + ("" if estimate.fitted else " (fallback)"),
        )
        ax.set_yscale("log")
    ax.set_xlabel("distance to nearest tissue spot (spot pitches)")
    ax.set_ylabel(f"UMIs per background spot ({estimate.statistic})")
    title = f"Background decay; Gaussian-equivalent scale {estimate.scale:.2f} pitches"
    pitch_um = estimate.pitch_um
    if pitch_um > 0:
        # Diffusion lengths are physical: the top axis reads the same distances in microns.
        top = ax.secondary_xaxis("top", functions=(lambda d: d * pitch_um, lambda um: um / pitch_um))
        top.set_xlabel("distance (um)")
        title += f" ({estimate.scale * pitch_um:.1f} um)"
    ax.set_title(title, fontsize=10)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
