"""QC figures of the prepare step: tissue mask over the H&E image, total counts on the slide, background
decay curve. Each function returns a new :class:`~matplotlib.figure.Figure`, made without pyplot so that
no global state or backend is touched; save it with ``fig.savefig``, or let a notebook display it."""

from __future__ import annotations

import numpy as np
import pandas as pd
from anndata import AnnData
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from skimage import transform

from ..qc import DecayFit, DiffusionEstimate
from ..spatial import SPATIAL_KEY
from ..tissue import TissueMask, pick_image

FIGURE_SIZE = (6.5, 6.0)

#: Longest side of an image drawn under spots.
DISPLAY_PIXELS = 1000


def _slide_axes(adata: AnnData, ax: Axes) -> tuple[np.ndarray, float]:
    """Draw the H&E image (when there is one) and return spot centres in its pixels and a marker size."""
    picked = pick_image(adata, prefer="lowres")
    coords = np.asarray(adata.obsm[SPATIAL_KEY], dtype=np.float64)
    scale = 1.0
    if picked is not None:
        _, image, scale = picked
        # A figure a few inches wide shows no more than about a thousand pixels.
        block = max(int(np.ceil(max(image.shape[:2]) / DISPLAY_PIXELS)), 1)
        if block > 1:
            image = transform.downscale_local_mean(image[..., :3], (block, block, 1))
            scale /= block
        ax.imshow(np.clip(image, 0.0, 1.0))
    else:
        ax.invert_yaxis()
    coords_px = coords * scale
    pitch_px = float(adata.uns["undiffuse"]["spot_pitch_px"]) * scale
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    # Marker area in points^2 so that markers roughly fill the spot lattice at this figure size.
    span = max(np.ptp(coords_px[:, 0]), np.ptp(coords_px[:, 1]), pitch_px)
    size = (0.8 * pitch_px / span * FIGURE_SIZE[0] * 72 * 0.8) ** 2
    return coords_px, size


def plot_tissue_mask(adata: AnnData, mask: TissueMask) -> Figure:
    """Spots of the tissue mask over the H&E image; where an image mask exists, spots on which it and
    Space Ranger's ``in_tissue`` disagree are marked."""
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
    """Total UMIs of every spot (log10 scale) on the slide, background included."""
    fig = Figure(figsize=FIGURE_SIZE)
    ax = fig.subplots()
    coords_px, size = _slide_axes(adata, ax)
    values = np.log10(np.asarray(total_counts, dtype=np.float64) + 1.0)
    points = ax.scatter(*coords_px.T, c=values, s=size, cmap="viridis", linewidths=0)
    fig.colorbar(points, ax=ax, shrink=0.8, label="log10(total UMIs + 1)")
    ax.set_title("Total counts per spot, all spots")
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
        ax.fill_between(decay["distance"], decay["q25_umis"], decay["q75_umis"], color="0.85", label="IQR")
        ax.plot(decay["distance"], decay["median_umis"], "o-", color="black", ms=3, label="median")
        grid = np.linspace(max(float(decay["distance"].min()), 0.5), float(decay["distance"].max()), 200)
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
    ax.set_ylabel("UMIs per background spot")
    ax.set_title(f"Background decay; Gaussian-equivalent scale {estimate.scale:.2f} pitches")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
