"""Figures of the per-sample report and the multi-sample summary.

Every function returns a new :class:`~matplotlib.figure.Figure`, made without pyplot (no global state, no
backend), from the objects the workflow writes: ``corrected.h5ad`` as AnnData and the TSV tables as
DataFrames. The report notebooks only call these functions, so the same figures can be drawn in any notebook.
The QC figures of the prepare step are in :mod:`undiffuse.plotting.qc`; the report embeds their PNG files.

Visium spots are drawn as discs; Visium HD bins as a raster over the H&E image, placed by the QC figures'
index-to-pixel map (:class:`undiffuse.plotting.qc._BinRaster`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib
import numpy as np
import pandas as pd
from anndata import AnnData
from matplotlib.axes import Axes
from matplotlib.collections import EllipseCollection
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from ..arrays import as_dense
from ..qc import is_visium_hd
from ..spatial import SPATIAL_KEY, spot_pitch
from ..tissue import pick_image
from .qc import _BinRaster, _draw_image, _finish_raster_axes

#: Colours of the stages that metrics compare.
STAGE_COLOURS = {"raw": "#8c8c8c", "corrected": "#1f77b4", "rediffused": "#ff7f0e", "truth": "#2ca02c"}


def spatial_scatter(
    adata: AnnData,
    values: np.ndarray | None = None,
    *,
    ax: Axes,
    spots: np.ndarray | None = None,
    colours: np.ndarray | None = None,
    cmap: str = "magma",
    vmin: float | None = None,
    vmax: float | None = None,
    size: float = 0.95,
    title: str | None = None,
    colourbar: bool = True,
) -> EllipseCollection | matplotlib.image.AxesImage:
    """Draw spots as discs over the sample's H&E image, coloured by ``values`` or by explicit ``colours``.

    Visium HD bins are drawn as a raster instead (:func:`bin_raster`), which also takes these arguments.

    Parameters
    ----------
    adata
        Sample with ``obsm['spatial']`` (full-resolution pixels) and optionally images in ``uns['spatial']``.
    values
        ``(N,)`` values mapped through ``cmap`` (ignored when ``colours`` is given).
    ax
        Axes to draw into.
    spots
        Boolean ``(N,)`` mask of the spots to draw (default: all).
    colours
        ``(N, 4)`` RGBA colours, for categorical maps.
    vmin, vmax
        Colour range (default: the range of the drawn values).
    size
        Disc diameter in spot pitches: near 1, neighbouring discs touch and a field reads as a surface.
    title
        Axes title.
    colourbar
        Add a colour bar for ``values``.
    """
    if is_visium_hd(adata):
        return bin_raster(
            adata,
            values,
            ax=ax,
            spots=spots,
            colours=colours,
            cmap=cmap,
            vmin=vmin,
            vmax=vmax,
            title=title,
            colourbar=colourbar,
        )
    picked = pick_image(adata) if "undiffuse" in adata.uns and SPATIAL_KEY in adata.uns else None
    image, scale = (picked[1], picked[2]) if picked is not None else (None, 1.0)
    coords = np.asarray(adata.obsm[SPATIAL_KEY], dtype=np.float64) * scale
    keep = np.ones(adata.n_obs, dtype=bool) if spots is None else np.asarray(spots, dtype=bool)
    diameter = size * _pitch_px(adata) * scale
    if image is not None:
        ax.imshow(np.clip(image, 0, 1))
    discs = EllipseCollection(
        widths=diameter,
        heights=diameter,
        angles=0.0,
        units="xy",
        offsets=coords[keep],
        offset_transform=ax.transData,
        linewidths=0,
    )
    if colours is not None:
        discs.set_facecolor(np.asarray(colours)[keep])
    elif values is not None:
        shown = np.asarray(values, dtype=np.float64)[keep]
        low = float(shown.min()) if vmin is None and shown.size else vmin
        high = float(shown.max()) if vmax is None and shown.size else vmax
        discs.set_array(shown)
        discs.set_cmap(cmap)
        discs.set_norm(
            Normalize(vmin=low, vmax=high if low is None or high is None or high > low else low + 1)
        )
    ax.add_collection(discs)
    _frame(ax, coords, diameter, image)
    if title:
        ax.set_title(title, fontsize=10)
    if values is not None and colours is None and colourbar:
        ax.figure.colorbar(discs, ax=ax, fraction=0.046, pad=0.02)
    return discs


def bin_raster(
    adata: AnnData,
    values: np.ndarray | None = None,
    *,
    ax: Axes,
    spots: np.ndarray | None = None,
    colours: np.ndarray | None = None,
    cmap: str = "magma",
    vmin: float | None = None,
    vmax: float | None = None,
    title: str | None = None,
    colourbar: bool = True,
) -> matplotlib.image.AxesImage:
    """Draw Visium HD bins as a raster over the H&E image (hires), as the QC figures do.

    Arguments as :func:`spatial_scatter`. Bins outside ``spots`` are transparent; on slides of more than a
    thousand bins a side, each raster pixel shows the mean of a block of bins.
    """
    scale = _draw_image(adata, ax, prefer="hires")
    raster = _BinRaster(adata, scale)
    keep = np.ones(adata.n_obs, dtype=bool) if spots is None else np.asarray(spots, dtype=bool)
    share = raster.mean(keep.astype(np.float64))
    drawn = share.filled(0.0) > 0
    if colours is not None:
        colours = np.asarray(colours, dtype=np.float64)
        rgba = np.stack([raster.mean(np.where(keep, colours[:, k], 0.0)).filled(0.0) for k in range(4)], -1)
        rgba[drawn] /= share.filled(1.0)[drawn][:, None]
        rgba[~drawn] = 0.0
        artist = raster.show(ax, np.clip(rgba, 0.0, 1.0))
    else:
        shown = np.zeros(adata.n_obs) if values is None else np.asarray(values, dtype=np.float64)
        mean = raster.mean(np.where(keep, shown, 0.0)).filled(0.0)
        mean = np.ma.masked_array(np.divide(mean, share.filled(1.0), where=drawn, out=mean), mask=~drawn)
        low = float(shown[keep].min()) if vmin is None and keep.any() else vmin
        high = float(shown[keep].max()) if vmax is None and keep.any() else vmax
        if low is not None and high is not None and high <= low:
            high = low + 1
        artist = raster.show(ax, mean, cmap=cmap, vmin=low, vmax=high)
    _finish_raster_axes(ax, adata, scale)
    if title:
        ax.set_title(title, fontsize=10)
    if values is not None and colours is None and colourbar:
        ax.figure.colorbar(artist, ax=ax, fraction=0.046, pad=0.02)
    return artist


def plot_quantiles(quantiles: pd.DataFrame) -> Figure:
    """Distribution of the initial quantiles; Moran's I at the initial quantile against that of raw counts.

    Parameters
    ----------
    quantiles
        Per scanned gene ``q_init``, ``moran_at_q_init`` and ``moran_raw``
        (:meth:`undiffuse.report.ReportInputs.quantiles`).
    """
    fig = Figure(figsize=(10, 3.6), layout="constrained")
    left, right = fig.subplots(1, 2)
    if quantiles.empty or "q_init" not in quantiles:
        _message(left, "no quantile scan")
        right.set_axis_off()
        return fig
    left.hist(
        quantiles["q_init"], bins=np.linspace(0, 1, 21), color=STAGE_COLOURS["corrected"], edgecolor="w"
    )
    left.set_xlabel("initial quantile q_init")
    left.set_ylabel("genes")
    left.set_title(f"initial quantiles of {len(quantiles)} genes", fontsize=10)
    if {"moran_raw", "moran_at_q_init"} <= set(quantiles.columns):
        right.scatter(quantiles["moran_raw"], quantiles["moran_at_q_init"], s=8, alpha=0.7)
        _diagonal(right)
        right.set_xlabel("Moran's I, raw counts")
        right.set_ylabel("Moran's I at q_init")
        right.set_title("Moran's I gained by the threshold", fontsize=10)
    else:
        right.set_axis_off()
    return fig


def plot_loss_history(history: Mapping[str, pd.DataFrame]) -> Figure:
    """Loss curves of every chunk, one panel per loss term (``total``, ``image``, ``out_of_tissue``, ...).

    Parameters
    ----------
    history
        ``{chunk: table}`` with ``epoch`` and one column per loss term.
    """
    tables = {str(chunk): pd.DataFrame(table) for chunk, table in history.items() if len(table)}
    # The terms are the tables' own columns, in their order: the trainer owns the list.
    terms = list(dict.fromkeys(column for table in tables.values() for column in table if column != "epoch"))
    fig = Figure(figsize=(3.2 * max(len(terms), 1), 3.2), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, max(len(terms), 1)))
    if not terms:
        _message(axes[0], "no loss history")
        return fig
    for ax, term in zip(axes, terms, strict=True):
        for chunk, table in tables.items():
            if term in table:
                epochs = table["epoch"] if "epoch" in table else np.arange(len(table))
                ax.plot(epochs, table[term], lw=1, label=chunk)
        ax.set_title(term, fontsize=10)
        ax.set_xlabel("epoch")
    axes[0].set_ylabel("loss (mean over genes)")
    if len(tables) <= 12:
        axes[-1].legend(fontsize=7, frameon=False, title="chunk", title_fontsize=7)
    return fig


def plot_kernel(
    kernel_profile: pd.DataFrame,
    diffusion_length: Sequence[float] | pd.Series,
    *,
    pitch_um: float | None = None,
) -> Figure:
    """The learned kernel profile (median over genes, interquartile band) and per-gene diffusion lengths.

    Parameters
    ----------
    kernel_profile
        ``uns['kernel_profile']``: ``distance``, ``weight``, ``q25``, ``q75``; with a ``chunk`` column (as
        merged from chunks) each chunk's profile is drawn.
    diffusion_length
        Learned diffusion length of each corrected gene, in spot pitches.
    pitch_um
        Spot (or bin) pitch in microns: distances and lengths are then drawn in microns.
    """
    factor, unit = (float(pitch_um), "um") if pitch_um else (1.0, "spot pitches")
    fig = Figure(figsize=(10, 3.6), layout="constrained")
    left, right = fig.subplots(1, 2)
    profile = pd.DataFrame(kernel_profile)
    if len(profile) and {"distance", "weight"} <= set(profile.columns):
        groups = profile.groupby("chunk") if "chunk" in profile else [("all genes", profile)]
        for chunk, table in groups:
            table = table.sort_values("distance")
            distance = table["distance"].to_numpy(dtype=np.float64) * factor
            (line,) = left.plot(distance, table["weight"], lw=1.2, label=f"chunk {chunk}")
            if {"q25", "q75"} <= set(table.columns):
                left.fill_between(distance, table["q25"], table["q75"], color=line.get_color(), alpha=0.2)
        left.set_xlabel(f"distance ({unit})")
        left.set_ylabel("kernel weight")
        left.set_title("learned kernel profile (median, 25-75%)", fontsize=10)
        if "chunk" in profile and profile["chunk"].nunique() <= 12:
            left.legend(fontsize=7, frameon=False)
    else:
        _message(left, "no kernel profile")
    lengths = np.asarray(diffusion_length, dtype=np.float64) * factor
    if lengths.size:
        right.hist(
            lengths, bins=min(30, max(5, lengths.size // 3)), color=STAGE_COLOURS["corrected"], edgecolor="w"
        )
        median = float(np.median(lengths))
        right.axvline(median, color="k", ls="--", lw=1, label=f"median {median:.3g}")
        right.set_xlabel(f"diffusion length ({unit})")
        right.set_ylabel("genes")
        right.set_title("per-gene diffusion lengths", fontsize=10)
        right.legend(fontsize=8, frameon=False)
    else:
        _message(right, "no corrected gene")
    return fig


def plot_before_after(adata: AnnData, genes: Sequence[str], *, quantile: float = 0.99) -> Figure:
    """Raw and corrected maps of ``genes`` over the image, one row per gene on one colour scale.

    Parameters
    ----------
    adata
        ``corrected.h5ad``: raw counts in ``X``, the correction in ``layers['corrected']``.
    genes
        Genes to draw (e.g. the most changed ones).
    quantile
        Top of each gene's colour scale, as a quantile of both maps, so that one hot spot does not wash out
        the rest.
    """
    genes = list(genes)
    fig = Figure(figsize=(9, 3.8 * max(len(genes), 1)), layout="constrained")
    axes = np.atleast_2d(fig.subplots(max(len(genes), 1), 2))
    if not genes:
        _message(axes[0, 0], "no corrected gene")
        axes[0, 1].set_axis_off()
        return fig
    for row, gene in zip(axes, genes, strict=True):
        raw = _column(adata, gene, None)
        fixed = _column(adata, gene, "corrected")
        top = float(np.quantile(np.concatenate([raw, fixed]), quantile))
        for ax, values, stage in ((row[0], raw, "raw"), (row[1], fixed, "corrected")):
            spatial_scatter(
                adata, values, ax=ax, vmin=0.0, vmax=top if top > 0 else None, title=f"{gene}: {stage}"
            )
    return fig


def plot_cell_types(
    adata: AnnData, cell_types: pd.DataFrame, *, stages: Sequence[str] = ("raw", "corrected")
) -> Figure:
    """Cell-type maps before and after correction, over the image.

    Parameters
    ----------
    adata
        The sample (coordinates and image).
    cell_types
        ``metrics/cell_types.tsv``: indexed by barcode, a ``cell_type_{stage}`` column per stage.
    stages
        Stages to draw, one panel each.
    """
    fig = Figure(figsize=(5.5 * len(stages) + 1.5, 5.5), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(stages)))
    if cell_types.empty:
        _message(axes[0], "no cell types (no marker table)")
        for ax in axes[1:]:
            ax.set_axis_off()
        return fig
    labels = {stage: cell_types[f"cell_type_{stage}"].astype(str) for stage in stages}
    types = sorted(set().union(*(set(column) for column in labels.values())))
    palette = matplotlib.colormaps["tab10" if len(types) <= 10 else "tab20"]
    colour_of = {cell_type: palette(k % palette.N) for k, cell_type in enumerate(types)}
    position = adata.obs_names.get_indexer(cell_types.index)
    if (position < 0).any():
        raise ValueError("the cell-type table names spots that the sample lacks")
    spots = np.zeros(adata.n_obs, dtype=bool)
    spots[position] = True
    for ax, stage in zip(axes, stages, strict=True):
        colours = np.zeros((adata.n_obs, 4))
        colours[position] = [colour_of[t] for t in labels[stage]]
        spatial_scatter(adata, ax=ax, spots=spots, colours=colours, title=f"cell types: {stage}")
    counts = {stage: column.value_counts() for stage, column in labels.items()}
    handles = [
        Patch(color=colour_of[t], label=f"{t} ({' / '.join(str(int(counts[s].get(t, 0))) for s in stages)})")
        for t in types
    ]
    axes[-1].legend(
        handles=handles,
        loc="upper left",
        bbox_to_anchor=(1.01, 1),
        fontsize=8,
        frameon=False,
        title="spots " + " / ".join(stages),
        title_fontsize=8,
    )
    return fig


def plot_truth_comparison(truth: pd.DataFrame) -> Figure:
    """Per-gene RMSE and Pearson correlation against the ground truth: corrected against raw.

    Parameters
    ----------
    truth
        ``metrics/truth.tsv``: ``rmse_raw``, ``rmse_corrected``, ``pearson_raw``, ``pearson_corrected``.
    """
    fig = Figure(figsize=(10, 4), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, metric, lower_is_better in zip(axes, ("rmse", "pearson"), (True, False), strict=True):
        raw, fixed = truth[f"{metric}_raw"], truth[f"{metric}_corrected"]
        ax.scatter(raw, fixed, s=10, alpha=0.7)
        if lower_is_better and (raw > 0).all() and (fixed > 0).all():
            # RMSE spans orders of magnitude between lowly and highly expressed genes.
            ax.set_xscale("log")
            ax.set_yscale("log")
        _diagonal(ax)
        better = int(((fixed < raw) if lower_is_better else (fixed > raw)).sum())
        ax.set_title(f"{metric} vs truth: corrected better for {better}/{len(truth)} genes", fontsize=10)
        ax.set_xlabel(f"{metric}, raw")
        ax.set_ylabel(f"{metric}, corrected")
    return fig


def plot_summary_metrics(summary: pd.DataFrame, metrics: Sequence[str] | None = None) -> Figure:
    """Bars per sample and stage, one panel per metric, for a multi-sample summary.

    Parameters
    ----------
    summary
        Long table: ``sample``, ``metric``, ``stage``, ``value``.
    metrics
        Metrics to draw (default: all, in order of appearance).
    """
    metrics = list(dict.fromkeys(summary["metric"])) if metrics is None else list(metrics)
    metrics = [metric for metric in metrics if (summary["metric"] == metric).any()]
    n_cols = min(3, max(len(metrics), 1))
    n_rows = max(1, -(-len(metrics) // n_cols))
    fig = Figure(figsize=(4.2 * n_cols, 3.2 * n_rows + 0.4), layout="constrained")
    axes = np.atleast_2d(fig.subplots(n_rows, n_cols, squeeze=False))
    if not metrics:
        _message(axes[0, 0], "no metrics")
        return fig
    samples = list(dict.fromkeys(summary["sample"]))
    stages = [s for s in STAGE_COLOURS if (summary["stage"] == s).any()]
    stages += [s for s in dict.fromkeys(summary["stage"]) if s not in stages]
    for ax, metric in zip(axes.flat, metrics, strict=False):
        table = summary[summary["metric"] == metric].pivot_table(
            index="sample", columns="stage", values="value"
        )
        table = table.reindex(index=samples, columns=[s for s in stages if s in table.columns])
        width = 0.8 / max(len(table.columns), 1)
        for k, stage in enumerate(table.columns):
            offset = (k - (len(table.columns) - 1) / 2) * width
            ax.bar(
                np.arange(len(table)) + offset,
                table[stage].fillna(0.0),
                width=width,
                color=STAGE_COLOURS.get(stage),
            )
        ax.set_xticks(np.arange(len(table)), table.index, rotation=30, ha="right", fontsize=8)
        ax.set_title(metric, fontsize=10)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.set_axis_off()
    handles = [Patch(color=STAGE_COLOURS.get(stage, "0.5"), label=stage) for stage in stages]
    fig.legend(handles=handles, loc="outside upper center", ncols=len(handles), frameon=False, fontsize=9)
    return fig


def _pitch_px(adata: AnnData) -> float:
    pitch = adata.uns.get("undiffuse", {}).get("spot_pitch_px")
    return float(pitch) if pitch else spot_pitch(np.asarray(adata.obsm[SPATIAL_KEY], dtype=np.float64))


def _frame(ax: Axes, coords: np.ndarray, diameter: float, image: np.ndarray | None) -> None:
    """Frame the spots with a margin, in image orientation (y grows downwards)."""
    low = coords.min(axis=0) - diameter
    high = coords.max(axis=0) + diameter
    if image is not None:
        low = np.maximum(low, 0)
        high = np.minimum(high, [image.shape[1], image.shape[0]])
    ax.set_xlim(low[0], high[0])
    ax.set_ylim(high[1], low[1])
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])


def _column(adata: AnnData, gene: str, layer: str | None) -> np.ndarray:
    view = adata[:, gene]
    matrix = view.X if layer is None else view.layers[layer]
    return as_dense(matrix).reshape(-1)


def _diagonal(ax: Axes) -> None:
    low = min(ax.get_xlim()[0], ax.get_ylim()[0])
    high = max(ax.get_xlim()[1], ax.get_ylim()[1])
    ax.plot([low, high], [low, high], color="k", lw=0.8, ls="--")
    ax.set_xlim(low, high)
    ax.set_ylim(low, high)


def _message(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=11, color="0.4")
    ax.set_axis_off()
