r"""Evaluation of a correction, with and without a ground truth.

Every metric compares two *stages* of a sample: ``raw`` (the observed counts, ``X`` of ``corrected.h5ad``)
and ``corrected`` (``layers['corrected']``, as :func:`undiffuse.correct` writes it). Metrics against a ground truth follow the
C3-Diff paper: root mean squared error and Pearson correlation per gene map,

.. math::

    \mathrm{RMSE}_g = \sqrt{\tfrac{1}{|\Omega|} \textstyle\sum_{i \in \Omega} (\hat z_{ig} - z_{ig})^2},
    \qquad
    \mathrm{PCC}_g = \frac{\sum_i (\hat z_{ig} - \bar{\hat z}_g)(z_{ig} - \bar z_g)}
    {\sqrt{\sum_i (\hat z_{ig} - \bar{\hat z}_g)^2 \sum_i (z_{ig} - \bar z_g)^2}},

over the tissue spots :math:`\Omega`. Without a truth, the consistency check re-applies the learned diffusion
to the corrected field and compares it with the observation, at the spot level and on a coarser grid of 2 x 2
neighbouring spots, as C3-Diff evaluates datasets that lack a high-resolution truth. The ARC score is
:func:`undiffuse.qc.arc_score` and Moran's I :func:`undiffuse.moran.morans_i`, the statistics of the QC and
the quantile initialisation. The border half-width (:func:`border_halfwidth`) measures how far a marker's
expression spreads across the border of its region, as You et al. (Nat Methods 2024) measure diffusion.

:func:`evaluate_sample` computes every table at once; :func:`write_metrics` writes them to
``results/{sample}/metrics/``.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData
from scipy.optimize import isotonic_regression
from scipy.special import ndtri

from .arrays import as_dense, group_indicator
from .atomic import atomic_path
from .errors import InputError
from .spatial import (
    FIRST_RING_RADIUS,
    adjacency,
    distance_to_mask,
    pitch_coordinates,
    spot_pitch,
    tissue_spots,
)

#: The two stages every before/after metric compares.
RAW, CORRECTED = "raw", "corrected"

#: Stage of the consistency check that compares the re-diffused corrected field with the observation.
REDIFFUSED = "rediffused"

#: Stage of metrics computed on the ground truth itself (e.g. the marker specificity of the true field).
TRUTH = "truth"

#: Edge of the coarse grid's blocks, in spots along each array axis.
COARSE_FACTOR = 2

#: What each summary metric measures, shown beside it in the report.
METRIC_DESCRIPTIONS: dict[str, str] = {
    "out_of_tissue_fraction": "share of all UMIs on background spots (all genes)",
    "arc_score": "SpotClean ARC score: (background UMIs / all spots) / (UMIs / tissue spot)",
    "moran_i_mean": "mean Moran's I over corrected genes, all spots, first ring (as squidpy)",
    "consistency_rmse": "RMSE vs observed counts, all spots (pooled over genes); rediffused: the learned "
    "diffusion re-applied to the corrected field",
    "consistency_pearson": "Pearson vs observed counts, all spots (mean over genes); rediffused as above",
    "consistency_rmse_2x2": "as consistency_rmse, on blocks of 2 x 2 neighbouring spots",
    "consistency_pearson_2x2": "as consistency_pearson, on blocks of 2 x 2 neighbouring spots",
    "truth_rmse": "RMSE vs ground truth, tissue spots (pooled over genes)",
    "truth_pearson": "Pearson vs ground truth, tissue spots (mean over genes)",
    "marker_specificity": "share of a marker's in-tissue UMIs inside its own region (mean over markers)",
    "border_halfwidth": "half-width at half maximum (pitches) of a marker's rise across its region's border, "
    "tissue spots (median over markers)",
    "cell_type_accuracy": "share of tissue spots whose marker-based cell type is their true region",
}

#: Names of the tables :func:`evaluate_sample` may return (``summary`` and ``genes`` always).
TABLE_NAMES = ("summary", "genes", "consistency", "truth", "markers", "cell_types", "notes")

Rediffuse = Callable[[AnnData], np.ndarray]


def rmse(estimate: np.ndarray, reference: np.ndarray) -> np.ndarray:
    r"""Root mean squared error per column, :math:`\sqrt{\mathrm{mean}_i (e_{ig} - r_{ig})^2}`.

    Parameters
    ----------
    estimate, reference
        ``(N, G)`` arrays (or ``(N,)`` for a single map).

    Returns
    -------
    ``(G,)`` float64 (a scalar array for ``(N,)`` inputs).
    """
    estimate, reference = _pair(estimate, reference)
    return np.sqrt(np.mean((estimate - reference) ** 2, axis=0))


def pooled_rmse(estimate: np.ndarray, reference: np.ndarray) -> float:
    """Root mean squared error over all entries of the two arrays (all spots and genes together)."""
    estimate, reference = _pair(estimate, reference)
    return float(np.sqrt(np.mean((estimate - reference) ** 2))) if estimate.size else 0.0


def pearson(estimate: np.ndarray, reference: np.ndarray) -> np.ndarray:
    r"""Pearson correlation per column.

    A column that is constant in either array has no defined correlation; it gets 0 (no linear association),
    so that tables never hold NaN.

    Returns
    -------
    ``(G,)`` float64 in ``[-1, 1]``.
    """
    estimate, reference = _pair(estimate, reference)
    e = estimate - estimate.mean(axis=0)
    r = reference - reference.mean(axis=0)
    numerator = np.sum(e * r, axis=0)
    denominator = np.sqrt(np.sum(e * e, axis=0) * np.sum(r * r, axis=0))
    # A relative floor: centred sums of a float32 constant column are rounding noise, not variance.
    scale = np.maximum(np.abs(estimate).max(axis=0, initial=0.0), np.abs(reference).max(axis=0, initial=0.0))
    defined = denominator > 1e-12 * np.maximum(scale, 1e-300) ** 2 * max(estimate.shape[0], 1)
    correlation = np.divide(numerator, denominator, out=np.zeros_like(numerator), where=defined)
    return np.clip(correlation, -1.0, 1.0)


def out_of_tissue_fraction(counts: np.ndarray, tissue: np.ndarray) -> np.ndarray:
    """Share of each gene's counts that lies on background spots (0 for a gene without counts).

    Parameters
    ----------
    counts
        ``(N, G)`` non-negative counts on all spots (dense or sparse).
    tissue
        ``(N,)`` boolean tissue mask.
    """
    counts = sp.csr_matrix(counts) if sp.issparse(counts) else _as_2d(counts)
    tissue = _mask(tissue, counts.shape[0])
    total = _column_sums(counts)
    outside = _column_sums(counts[~tissue])
    return np.divide(outside, total, out=np.zeros_like(total), where=total > 0)


def relative_change(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    r"""How much the correction moved each gene: :math:`\sum_i |a_{ig} - b_{ig}| / \sum_i |b_{ig}|`.

    0 for a gene without counts. Dense or sparse inputs.
    """
    if sp.issparse(before) or sp.issparse(after):
        before, after = sp.csr_matrix(before, dtype=np.float64), sp.csr_matrix(after, dtype=np.float64)
        if before.shape != after.shape:
            raise ValueError(f"shapes differ: {after.shape} vs {before.shape}")
    else:
        before, after = _pair(before, after)
    moved = _column_sums(abs(after - before))
    mass = _column_sums(abs(before))
    return np.divide(moved, mass, out=np.zeros_like(moved), where=mass > 0)


def marker_specificity(
    counts: np.ndarray, regions: np.ndarray, marker_regions: np.ndarray, *, tissue: np.ndarray | None = None
) -> np.ndarray:
    r"""Share of each marker's in-tissue mass that lies inside its own region.

    .. math::

        s_g = \frac{\sum_{i \in \Omega,\ \rho(i) = R_g} x_{ig}}{\sum_{i \in \Omega} x_{ig}},

    where :math:`\rho(i)` is the region of spot :math:`i` and :math:`R_g` the region gene :math:`g` marks.
    Diffusion moves marker mass across region borders and lowers :math:`s_g`; a good correction restores it.

    Parameters
    ----------
    counts
        ``(N, G)`` counts of the marker genes.
    regions
        ``(N,)`` region label of each spot.
    marker_regions
        ``(G,)`` region each gene marks.
    tissue
        ``(N,)`` mask of the spots to count (default: all).

    Returns
    -------
    ``(G,)`` shares in ``[0, 1]`` (0 for a gene without in-tissue counts).
    """
    counts = _as_2d(counts)
    regions = np.asarray(regions).astype(str)
    marker_regions = np.asarray(marker_regions).astype(str)
    if regions.shape[0] != counts.shape[0] or marker_regions.shape[0] != counts.shape[1]:
        raise ValueError("regions must have one entry per spot and marker_regions one per gene")
    keep = np.ones(counts.shape[0], dtype=bool) if tissue is None else _mask(tissue, counts.shape[0])
    inside = regions[keep][:, None] == marker_regions[None, :]
    kept = counts[keep]
    total = kept.sum(axis=0)
    own = np.where(inside, kept, 0.0).sum(axis=0)
    return np.divide(own, total, out=np.zeros_like(total), where=total > 0)


#: Half-width (spot pitches) of the window on either side of a region border over which the border profile is
#: taken: a Gaussian edge of scale up to 2 pitches reaches both plateaus within it (3 scales); a wider edge is
#: cut off by the window and measures narrower than it is.
BORDER_REACH = 6.0
#: ... and at least this far in microns, so that on Visium HD bins the plateaus lie beyond kernels of ~30 um.
BORDER_REACH_UM = 96.0

#: Converts the distance between the quartile crossings of a Gaussian-blurred step, :math:`2 z_{3/4} \sigma`,
#: into the half-width at half maximum of its derivative, :math:`\sigma \sqrt{2 \ln 2}`.
QUARTILES_TO_HWHM = float(np.sqrt(2 * np.log(2)) / (2 * ndtri(0.75)))


def signed_border_distance(coords: np.ndarray, region: np.ndarray) -> np.ndarray:
    r"""Signed distance of each spot to the border of a region, positive inside it.

    The border lies half a spot pitch :math:`h` beyond the region's outermost spots:

    .. math::

        s_i = \begin{cases} \min_{j \notin R} \lVert c_i - c_j \rVert - h/2 & i \in R \\
        -\left(\min_{j \in R} \lVert c_i - c_j \rVert - h/2\right) & i \notin R \end{cases}

    so that the spots on either side of a straight border sit at :math:`\pm h/2`.

    Parameters
    ----------
    coords
        ``(N, 2)`` centres of the spots to place (normally the tissue spots only, in spot pitches: the
        other side of a region border is then other tissue, not background).
    region
        ``(N,)`` boolean: the spots inside the region.

    Returns
    -------
    ``(N,)`` float64 distances in the unit of ``coords``.
    """
    coords = np.asarray(coords, dtype=np.float64)
    region = _mask(region, coords.shape[0])
    if region.all() or not region.any():
        raise ValueError("the region must hold some of the spots but not all of them")
    half_pitch = 0.5 * spot_pitch(coords)
    inside = distance_to_mask(coords, ~region) - half_pitch
    outside = distance_to_mask(coords, region) - half_pitch
    return np.where(region, inside, -outside)


def border_profile(
    values: np.ndarray, distance: np.ndarray, *, bin_width: float = 1.0, reach: float = BORDER_REACH
) -> pd.DataFrame:
    r"""Expression of one gene against the signed distance to a region border, binned and normalised.

    The spots with :math:`|s_i| \le` ``reach`` are binned by :math:`s_i` into bins of ``bin_width`` whose
    edges are multiples of ``bin_width`` (the border is an edge). A non-decreasing step function is fitted to
    the bins' mean values, weighted by their number of spots (isotonic regression): a marker should rise into
    its region, and the fit pools the noise of the plateaus. The fit runs from the *outside plateau* (its
    first value) to the *inside plateau* (its last value); the normalised profile maps them to 0 and 1.

    Parameters
    ----------
    values
        ``(N,)`` expression of the gene on the spots of ``distance``.
    distance
        ``(N,)`` signed distance to the border (:func:`signed_border_distance`).
    bin_width, reach
        In the unit of ``distance``.

    Returns
    -------
    One row per non-empty bin, outside first: ``distance`` (mean signed distance of its spots), ``n_spots``,
    ``mean``, ``fitted`` (the isotonic fit) and ``normalised`` (``(fitted - outside) / (inside - outside)``,
    all 0 when the profile does not rise: the two plateaus are equal up to rounding).
    """
    values = as_dense(values).reshape(-1)
    distance = np.asarray(distance, dtype=np.float64).reshape(-1)
    if values.shape != distance.shape:
        raise ValueError(f"values has {values.size} spots and distance {distance.size}")
    if not bin_width > 0 or not reach >= bin_width:
        raise ValueError(f"need bin_width > 0 and reach >= bin_width, got {bin_width} and {reach}")
    near = np.abs(distance) <= reach
    bins = np.floor(distance[near] / bin_width).astype(np.int64)
    labels, index, n_spots = np.unique(bins, return_inverse=True, return_counts=True)
    if labels.size == 0:
        raise ValueError(f"no spot lies within {reach} of the border")
    mean = np.bincount(index, weights=values[near]) / n_spots
    fitted = isotonic_regression(mean, weights=n_spots.astype(np.float64), increasing=True).x
    contrast = fitted[-1] - fitted[0]
    # Pooling a falling or flat profile into one level leaves rounding noise, not a rise.
    rises = contrast > 1e-9 * np.abs(fitted).max()
    normalised = (fitted - fitted[0]) / contrast if rises else np.zeros_like(fitted)
    return pd.DataFrame(
        {
            "distance": np.bincount(index, weights=distance[near]) / n_spots,
            "n_spots": n_spots,
            "mean": mean,
            "fitted": fitted,
            "normalised": normalised,
        }
    )


def border_halfwidth(
    values: np.ndarray, distance: np.ndarray, *, bin_width: float = 1.0, reach: float = BORDER_REACH
) -> np.ndarray:
    r"""Half-width at half maximum (HWHM) of each gene's rise across a region border.

    You et al. (Nat Methods 2024) measure diffusion as the width at half maximum of a marker's profile
    across a thin structure, a peak. Across the border of a wide region the profile is an edge instead,
    :math:`p(s)`, and its derivative :math:`p'(s)` is the peak (the line-spread function of imaging): the
    profile of a marker confined to a thin line. This metric is the HWHM of :math:`p'`.

    The derivative of a binned profile is noise, so the HWHM is read from the quartiles of the edge. With
    :math:`s_{1/4}` and :math:`s_{3/4}` the distances where the normalised profile of :func:`border_profile`
    crosses 1/4 and 3/4 (linear interpolation between bins),

    .. math::

        \mathrm{HWHM} = \frac{\sqrt{2 \ln 2}}{2 z_{3/4}} \left(s_{3/4} - s_{1/4}\right)
        \approx 0.873 \left(s_{3/4} - s_{1/4}\right),

    with :math:`z_{3/4} = \Phi^{-1}(3/4)`. For a step blurred by a Gaussian of standard deviation
    :math:`\sigma`, :math:`p(s) = \Phi(s / \sigma)`, this is exactly :math:`\sigma \sqrt{2 \ln 2} \approx
    1.177\,\sigma`, the HWHM of the Gaussian :math:`p'`; other kernels get the width of the Gaussian with
    the same quartiles. The half crossing itself is no width: a symmetric blur crosses 1/2 on the border.
    The resolution of the bins sets a floor: an unblurred step on a lattice of pitch :math:`h`, binned by
    :math:`h`, measures :math:`0.873\,h / 2 \approx 0.44\,h`.
    It describes the core of the spread: when most molecules stay in their spot (a local bleed share below
    about one half), the profile keeps a sharp step and the half-width stays near that floor however far the
    others travel; :func:`marker_specificity` weighs those tails.

    Parameters
    ----------
    values
        ``(N, G)`` (or ``(N,)``) expression on the spots of ``distance``.
    distance
        ``(N,)`` signed distance to the border, positive inside the region (:func:`signed_border_distance`).
    bin_width, reach
        Bins of the profile, in the unit of ``distance`` (see :func:`border_profile`).

    Returns
    -------
    ``(G,)`` HWHM in the unit of ``distance``; NaN for a gene whose profile does not rise into the region
    (inside plateau not above the outside one), which has no border to measure.
    """
    values = _as_2d(values)
    widths = np.full(values.shape[1], np.nan)
    for g in range(values.shape[1]):
        profile = border_profile(values[:, g], distance, bin_width=bin_width, reach=reach)
        if profile["normalised"].iat[-1] == 1.0:
            s, p = profile["distance"].to_numpy(), profile["normalised"].to_numpy()
            lower, upper = (_first_crossing(s, p, level) for level in (0.25, 0.75))
            widths[g] = QUARTILES_TO_HWHM * (upper - lower)
    return widths


def marker_region(
    values: np.ndarray, coords: np.ndarray, *, adjacency_radius: float = FIRST_RING_RADIUS
) -> np.ndarray:
    r"""The region a set of markers marks, for samples without region labels.

    Each marker is divided by its mean over the spots (so that each counts equally), the score of a spot is
    the mean over markers, the score is averaged over each spot and its first ring of neighbours
    (:func:`undiffuse.spatial.adjacency`) to damp counting noise, and the region is the spots whose smoothed
    score exceeds Otsu's threshold (the cut that best separates the scores into two classes).

    Parameters
    ----------
    values
        ``(N, G)`` (or ``(N,)``) marker expression on the spots to split (normally the tissue spots' raw
        counts).
    coords
        ``(N, 2)`` spot centres in spot pitches.
    adjacency_radius
        Radius of the neighbourhood averaged, in spot pitches (default: the first ring).

    Returns
    -------
    ``(N,)`` boolean region mask.
    """
    from skimage.filters import threshold_otsu

    values = _as_2d(values)
    level = values.mean(axis=0)
    if not (level > 0).any():
        raise ValueError("the markers have no counts on these spots")
    score = (values[:, level > 0] / level[level > 0]).mean(axis=1)
    neighbourhood = adjacency(coords, radius=adjacency_radius) + sp.identity(len(score), format="csr")
    smoothed = np.asarray(neighbourhood @ score).ravel() / np.asarray(neighbourhood.sum(axis=1)).ravel()
    return smoothed > threshold_otsu(smoothed)


def _first_crossing(distance: np.ndarray, profile: np.ndarray, level: float) -> float:
    """Where a non-decreasing profile (0 at its first point, 1 at its last) first reaches ``level``."""
    k = int(np.argmax(profile >= level))  # >= 1: the profile starts at 0 < level
    share = (level - profile[k - 1]) / (profile[k] - profile[k - 1])
    return float(distance[k - 1] + share * (distance[k] - distance[k - 1]))


def coarse_blocks(array_row: np.ndarray, array_col: np.ndarray, *, factor: int = COARSE_FACTOR) -> np.ndarray:
    """Label each spot with its block of ``factor x factor`` neighbouring spots on the array grid.

    On the Visium hexagonal grid a row holds every other column (``array_col`` steps by 2), so a block spans
    ``factor`` rows and ``2 * factor`` column indices: 2 x 2 spots for the default factor. On square grids
    (Visium HD) a block spans ``factor`` rows and columns.

    Returns
    -------
    ``(N,)`` int64 block labels ``0 .. B-1``.
    """
    rows = np.asarray(array_row, dtype=np.int64)
    cols = np.asarray(array_col, dtype=np.int64)
    if rows.shape != cols.shape or rows.ndim != 1:
        raise ValueError("array_row and array_col must be 1-D and of equal length")
    if factor < 1:
        raise ValueError("factor must be a positive integer")
    step = _column_step(rows, cols)
    rows_block = (rows - rows.min()) // factor
    cols_block = (cols - cols.min()) // (factor * step)
    _, labels = np.unique(np.stack([rows_block, cols_block], axis=1), axis=0, return_inverse=True)
    return labels.reshape(-1).astype(np.int64)


def aggregate_blocks(values: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Sum the rows of ``values`` ``(N, G)`` within each block of ``labels`` ``(N,)``: ``(B, G)``."""
    return np.asarray(group_indicator(labels) @ _as_2d(values))


def consistency_table(
    observed: np.ndarray,
    rediffused: np.ndarray,
    corrected: np.ndarray,
    blocks: np.ndarray,
    genes: list[str] | pd.Index,
) -> pd.DataFrame:
    """Per-gene agreement of the observation with the re-diffused corrected field, and with the field itself.

    Parameters
    ----------
    observed
        ``(N, G)`` observed counts on all spots.
    rediffused
        ``(N, G)`` expected observed counts predicted from the corrected field by the learned diffusion.
    corrected
        ``(N, G)`` corrected field; compared as is, it tells how much of the agreement re-diffusion adds.
    blocks
        ``(N,)`` coarse-grid labels from :func:`coarse_blocks`.

    Returns
    -------
    DataFrame indexed by gene with ``rmse_{stage}``, ``pearson_{stage}``, ``rmse_{stage}_2x2``,
    ``pearson_{stage}_2x2`` for the stages ``rediffused`` and ``corrected``.
    """
    columns: dict[str, np.ndarray] = {}
    coarse_observed = aggregate_blocks(observed, blocks)
    for stage, field in ((REDIFFUSED, rediffused), (CORRECTED, corrected)):
        coarse = aggregate_blocks(field, blocks)
        columns[f"rmse_{stage}"] = rmse(field, observed)
        columns[f"pearson_{stage}"] = pearson(field, observed)
        columns[f"rmse_{stage}_2x2"] = rmse(coarse, coarse_observed)
        columns[f"pearson_{stage}_2x2"] = pearson(coarse, coarse_observed)
    return pd.DataFrame(columns, index=pd.Index(list(genes), name="gene"))


def stage_matrices(adata: AnnData, *, layer: str = "corrected") -> tuple[sp.csc_matrix, sp.csc_matrix]:
    """Sparse float64 ``(N, G)`` ``(raw, corrected)``: ``X`` and ``layers[layer]`` of a corrected sample.

    Sparse and by column: a sample holds every gene of the slide, and a Visium HD slide has hundreds of
    thousands of bins, so only the columns a metric needs (the corrected genes, the truth's, the markers) are
    made dense, and those on their own.
    """
    if layer not in adata.layers:
        raise ValueError(f"the AnnData has no layers[{layer!r}]; run undiffuse.correct first")
    return sp.csc_matrix(adata.X, dtype=np.float64), sp.csc_matrix(adata.layers[layer], dtype=np.float64)


def corrected_gene_mask(adata: AnnData) -> np.ndarray:
    """Boolean ``(G,)``: the genes the correction changed (``var['undiffuse_corrected']``)."""
    from .correct import CORRECTED_COLUMN

    if CORRECTED_COLUMN not in adata.var:
        raise ValueError(f"the AnnData has no var[{CORRECTED_COLUMN!r}]; run undiffuse.correct first")
    return adata.var[CORRECTED_COLUMN].to_numpy(dtype=bool)


def evaluate_sample(
    corrected: AnnData,
    *,
    layer: str = "corrected",
    truth: AnnData | None = None,
    markers: pd.DataFrame | None = None,
    rediffuse: Rediffuse | None = None,
) -> dict[str, pd.DataFrame]:
    """Every metric of one corrected sample.

    Parameters
    ----------
    corrected
        ``(N, G)`` output of :func:`undiffuse.correct` (or ``corrected.h5ad``): raw counts in ``X``, the
        correction in ``layers[layer]``, ``var['undiffuse_corrected']``, ``obs['tissue']``,
        ``obs['array_row']``/``obs['array_col']``, ``obsm['spatial']``. Moran's I is read from
        ``var['undiffuse_moran_raw']`` and ``['undiffuse_moran_corrected']`` when the merge stored it there,
        and computed otherwise.
    layer
        Layer of the corrected values.
    truth
        The simulator's ``truth.h5ad`` (``X`` = undiffused expected counts, ``obs['domain']``,
        ``var['marker_of']``), matched to ``corrected`` by barcode and gene name.
    markers
        Marker table with columns ``cell_type`` and ``gene`` (:func:`undiffuse.celltypes.read_markers`),
        for the cell-type localisation.
    rediffuse
        Maps the corrected AnnData, restricted to its corrected genes, to their expected observed counts
        ``(N, G_corrected)`` (default: :func:`undiffuse.correct.rediffuse`, the learned diffusion).

    Returns
    -------
    Tables by name:

    - ``summary``: long table ``metric``, ``stage``, ``value`` (see :data:`METRIC_DESCRIPTIONS`);
    - ``genes``: per gene ``passed_through``, ``total_raw``, ``relative_change``,
      ``out_of_tissue_{raw,corrected}``, ``moran_{raw,corrected}`` (:func:`undiffuse.moran.morans_i`);
    - ``consistency``: per corrected gene, see :func:`consistency_table`;
    - ``truth`` (with a truth): per gene ``rmse_{raw,corrected}``, ``pearson_{raw,corrected}``;
    - ``markers`` (with a truth): per marker gene ``region``, ``specificity_{raw,corrected,truth}``,
      ``halfwidth_{raw,corrected,truth}`` (:func:`border_halfwidth` across the border of its region); for
      markers of cell types (Visium HD) ``home_domains`` (:func:`home_domains`) instead of ``region``, and no
      specificity;
    - ``cell_types`` (with markers): per tissue spot, see :func:`undiffuse.celltypes.compare_cell_types`,
      plus ``region`` with a truth;
    - ``notes``: why a table is missing (e.g. the learned model is incomplete), also issued as warnings.
    """
    # Imported here so that reading and writing metrics does not load torch and scanpy.
    from .qc import arc_score

    raw, fixed = stage_matrices(corrected, layer=layer)
    tissue = tissue_spots(corrected)
    is_corrected = corrected_gene_mask(corrected)
    genes = corrected.var_names
    stages = {RAW: raw, CORRECTED: fixed}

    summary: list[tuple[str, str, float]] = []
    for stage, values in stages.items():
        totals = np.asarray(values.sum(axis=1)).ravel()
        summary.append(("out_of_tissue_fraction", stage, float(out_of_tissue_fraction(totals, tissue)[0])))
        summary.append(("arc_score", stage, arc_score(totals, tissue)))

    morans = stage_morans_i(corrected, {RAW: raw, CORRECTED: fixed})
    gene_table = pd.DataFrame(
        {
            "passed_through": ~is_corrected,
            "total_raw": _column_sums(raw),
            "relative_change": relative_change(raw, fixed),
            **{f"out_of_tissue_{stage}": out_of_tissue_fraction(v, tissue) for stage, v in stages.items()},
            **{f"moran_{stage}": values for stage, values in morans.items()},
        },
        index=pd.Index(genes, name="gene"),
    )
    averaged = is_corrected if is_corrected.any() else np.ones_like(is_corrected)
    for stage in stages:
        summary.append(("moran_i_mean", stage, float(gene_table[f"moran_{stage}"][averaged].mean())))
    tables: dict[str, pd.DataFrame] = {"genes": gene_table}

    notes: list[tuple[str, str]] = []
    if is_corrected.any():
        consistency = _consistency(corrected, raw, fixed, is_corrected, rediffuse, summary, notes)
        if consistency is not None:
            tables["consistency"] = consistency
    else:
        notes.append(("consistency", "not computed: no gene was corrected"))

    if truth is not None:
        tables.update(_truth_tables(corrected, truth, stages, tissue, summary, notes))

    if markers is not None:
        from .celltypes import compare_cell_types, marker_sets

        if marker_sets(markers, genes):
            tables["cell_types"] = _cell_types(
                compare_cell_types(corrected, markers), truth, markers, summary
            )
        else:
            notes.append(("cell_types", "not computed: none of the marker genes is measured in this sample"))

    if notes:
        tables["notes"] = pd.DataFrame(notes, columns=["topic", "note"]).set_index("topic")
        for topic, note in notes:
            warnings.warn(f"{topic}: {note}", stacklevel=2)
    tables["summary"] = pd.DataFrame(summary, columns=["metric", "stage", "value"])
    return {name: tables[name] for name in TABLE_NAMES if name in tables}


def stage_morans_i(adata: AnnData, stages: Mapping[str, np.ndarray | sp.spmatrix]) -> dict[str, np.ndarray]:
    """``(G,)`` Moran's I per stage (all spots, first ring): read from the ``var`` columns the merge computed
    once (``undiffuse_moran_raw`` and ``undiffuse_moran_corrected``), else computed from ``stages``."""
    from .merge import MORAN_CORRECTED, MORAN_RAW

    stored = {RAW: MORAN_RAW, CORRECTED: MORAN_CORRECTED}
    if all(stored[stage] in adata.var for stage in stages):
        return {stage: adata.var[stored[stage]].to_numpy(np.float64) for stage in stages}
    from .moran import morans_i_numpy, spatial_weights

    weights = spatial_weights(adata)
    return {stage: morans_i_numpy(values, weights) for stage, values in stages.items()}


def _consistency(
    corrected: AnnData,
    raw: np.ndarray,
    fixed: np.ndarray,
    is_corrected: np.ndarray,
    rediffuse: Rediffuse | None,
    summary: list[tuple[str, str, float]],
    notes: list[tuple[str, str]],
) -> pd.DataFrame | None:
    """The consistency table of the corrected genes; appends its summary rows (pooled RMSE, mean Pearson).

    None, with a note, when ``corrected`` lacks part of the learned model: the other metrics still count.
    """
    if rediffuse is None:
        from .correct import rediffuse
    try:
        predicted = np.asarray(rediffuse(corrected[:, is_corrected].copy()), dtype=np.float64)
    except KeyError as err:
        notes.append(("consistency", f"not computed: the learned diffusion model lacks {err}"))
        return None
    expected_shape = (corrected.n_obs, int(is_corrected.sum()))
    if predicted.shape != expected_shape:
        raise ValueError(f"rediffuse returned shape {predicted.shape}, expected {expected_shape}")
    if not np.isfinite(predicted).all():
        raise ValueError("rediffuse returned NaN or Inf")
    observed = as_dense(raw[:, is_corrected])
    fields = {REDIFFUSED: predicted, CORRECTED: as_dense(fixed[:, is_corrected])}
    blocks = coarse_blocks(corrected.obs["array_row"].to_numpy(), corrected.obs["array_col"].to_numpy())
    table = consistency_table(
        observed, fields[REDIFFUSED], fields[CORRECTED], blocks, corrected.var_names[is_corrected]
    )
    coarse_observed = aggregate_blocks(observed, blocks)
    for stage, field in fields.items():
        summary.append(("consistency_rmse", stage, pooled_rmse(field, observed)))
        summary.append(("consistency_pearson", stage, float(table[f"pearson_{stage}"].mean())))
        summary.append(
            ("consistency_rmse_2x2", stage, pooled_rmse(aggregate_blocks(field, blocks), coarse_observed))
        )
        summary.append(("consistency_pearson_2x2", stage, float(table[f"pearson_{stage}_2x2"].mean())))
    return table


def align_truth(corrected: AnnData, truth: AnnData) -> AnnData:
    """The truth on the corrected sample's spots (same order) and on the genes both share (corrected order).

    Raises
    ------
    ValueError
        The truth lacks some of the sample's barcodes, or shares no gene with it.
    """
    barcodes = corrected.obs_names
    if not barcodes.isin(truth.obs_names).all():
        missing = int((~barcodes.isin(truth.obs_names)).sum())
        raise ValueError(f"the truth lacks {missing} of the corrected sample's {len(barcodes)} barcodes")
    shared = corrected.var_names[corrected.var_names.isin(truth.var_names)]
    if shared.empty:
        raise ValueError("the truth shares no gene with the corrected sample")
    return truth[barcodes, shared]


def _cell_types(
    cell_types: pd.DataFrame,
    truth: AnnData | None,
    markers: pd.DataFrame,
    summary: list[tuple[str, str, float]],
) -> pd.DataFrame:
    """Add the true region of each spot and the accuracy of the cell types, when the truth has regions."""
    if truth is None or "domain" not in truth.obs:
        return cell_types
    cell_types["region"] = truth.obs["domain"].reindex(cell_types.index).astype(str).to_numpy()
    # Accuracy is defined only where the region is one of the marker table's cell types.
    known = cell_types["region"].isin(set(markers["cell_type"]))
    if known.any():
        for stage in (RAW, CORRECTED):
            hits = (cell_types[f"cell_type_{stage}"] == cell_types["region"])[known]
            summary.append(("cell_type_accuracy", stage, float(hits.mean())))
    return cell_types


def _truth_tables(
    corrected: AnnData,
    truth: AnnData,
    stages: Mapping[str, sp.csc_matrix],
    tissue: np.ndarray,
    summary: list[tuple[str, str, float]],
    notes: list[tuple[str, str]],
) -> dict[str, pd.DataFrame]:
    """RMSE/Pearson against the truth per gene, marker specificity and border half-width; appends their summary
    rows.

    The truth's ``X`` may be sparse (the Visium HD truth is). Marker specificity needs the regions that the
    markers mark among the truth's ``obs['domain']``; markers of cell types that are not regions (Visium HD:
    cell types live in cells, not in the bins' domains) get a note instead.
    """
    from .qc import spot_pitch_um

    truth = align_truth(corrected, truth)
    shared = truth.var_names
    columns = corrected.var_names.get_indexer(shared)
    # Rows first: a sparse truth stays sparse till then.
    true_field = as_dense(truth.X[np.flatnonzero(tissue)])
    table = pd.DataFrame(index=pd.Index(shared, name="gene"))
    for stage, values in stages.items():
        estimate = as_dense(values[:, columns][tissue])
        table[f"rmse_{stage}"] = rmse(estimate, true_field)
        table[f"pearson_{stage}"] = pearson(estimate, true_field)
        summary.append(("truth_rmse", stage, pooled_rmse(estimate, true_field)))
        summary.append(("truth_pearson", stage, float(table[f"pearson_{stage}"].mean())))
    tables = {"truth": table}

    if "domain" in truth.obs and "marker_of" in truth.var:
        marker_of = truth.var["marker_of"].fillna("").astype(str)
        marker_genes = marker_of[marker_of != ""]
        regions = truth.obs["domain"].astype(str).to_numpy()
        marks_regions = marker_genes.isin(set(regions))
        if not marker_genes.empty:
            by_region = bool(marks_regions.any())
            if by_region:
                marker_genes = marker_genes[marks_regions]
            marker_columns = corrected.var_names.get_indexer(marker_genes.index)
            fields = {stage: as_dense(values[:, marker_columns]) for stage, values in stages.items()}
            fields[TRUTH] = as_dense(truth[:, marker_genes.index].X)
            if by_region:
                markers = pd.DataFrame(
                    {"region": marker_genes.to_numpy()}, index=pd.Index(marker_genes.index, name="gene")
                )
                for stage, values in fields.items():
                    share = marker_specificity(values, regions, marker_genes.to_numpy(), tissue=tissue)
                    markers[f"specificity_{stage}"] = share
                    summary.append(("marker_specificity", stage, float(share.mean())))
                inside = regions[tissue][:, None] == marker_genes.to_numpy()[None, :]
            else:
                notes.append(
                    (
                        "marker_specificity",
                        "not computed: the truth's markers mark cell types, not the regions of its spots; "
                        "each marker's border half-width is taken across the border of its home domains",
                    )
                )
                inside = home_domains(fields[TRUTH][tissue], regions[tissue])
                markers = pd.DataFrame(
                    {"home_domains": [",".join(np.unique(regions[tissue][column])) for column in inside.T]},
                    index=pd.Index(marker_genes.index, name="gene"),
                )
            coords = pitch_coordinates(corrected)[tissue]
            reach = border_reach(spot_pitch_um(corrected))
            widths = region_border_halfwidths(coords, inside, fields, tissue, reach=reach)
            for stage, width in widths.items():
                undefined = np.isnan(width)
                topic = f"border_halfwidth_{stage}"
                if undefined.all():
                    notes.append((topic, "not computed: no marker rises across a border of its region"))
                    continue
                if undefined.any():
                    notes.append(
                        (
                            topic,
                            f"{int(undefined.sum())} of {undefined.size} markers do not rise across a "
                            f"border of their region; their half-width is shown as {reach:g} "
                            "pitches, the edge of the window measured",
                        )
                    )
                markers[f"halfwidth_{stage}"] = np.where(undefined, reach, width)
                summary.append(("border_halfwidth", stage, float(np.median(width[~undefined]))))
            tables["markers"] = markers
    return tables


def border_reach(pitch_um: float) -> float:
    """Window of a border profile either side of the border, in pitches: :data:`BORDER_REACH` pitches and at
    least :data:`BORDER_REACH_UM` microns."""
    return max(BORDER_REACH, BORDER_REACH_UM / pitch_um)


def home_domains(true_values: np.ndarray, domains: np.ndarray) -> np.ndarray:
    """``(N, G)`` boolean: the spots of each gene's home domains, those where its mean true expression reaches
    half of its highest domain mean.

    The region of a marker of a cell type (Visium HD, where cell types live in cells and domains are mixtures
    of them) is where that type dominates; a gene expressed evenly across domains has them all as home, so
    no border.

    Parameters
    ----------
    true_values
        ``(N, G)`` true expression.
    domains
        ``(N,)`` domain labels.
    """
    true_values = _as_2d(true_values)
    labels, index = np.unique(np.asarray(domains), return_inverse=True)
    means = aggregate_blocks(true_values, index) / np.bincount(index, minlength=labels.size)[:, None]
    home = means >= 0.5 * means.max(axis=0, keepdims=True)
    return home[index]


def region_border_halfwidths(
    coords: np.ndarray,
    inside: np.ndarray,
    fields: Mapping[str, np.ndarray],
    tissue: np.ndarray,
    *,
    reach: float = BORDER_REACH,
) -> dict[str, np.ndarray]:
    """:func:`border_halfwidth` of each marker across the border of its region, among the tissue spots.

    ``coords`` are those of the tissue spots and ``inside`` ``(N_tissue, M)`` their membership of each
    marker's region; ``fields`` are ``(N, M)`` on all spots; ``reach`` as for :func:`border_profile`. A marker
    whose region covers no tissue spot, or all of them, has no border: NaN.
    """
    widths = {stage: np.full(inside.shape[1], np.nan) for stage in fields}
    regions, marker_region = np.unique(inside, axis=1, return_inverse=True)
    for r, region in enumerate(regions.T):
        if region.all() or not region.any():
            continue
        columns = marker_region.ravel() == r
        distance = signed_border_distance(coords, region)
        for stage, values in fields.items():
            widths[stage][columns] = border_halfwidth(values[tissue][:, columns], distance, reach=reach)
    return widths


def summary_dict(summary: pd.DataFrame) -> dict[str, dict[str, float]]:
    """The long summary table as ``{metric: {stage: value}}`` (the layout of ``metrics.json``)."""
    nested: dict[str, dict[str, float]] = {}
    for metric, stage, value in summary[["metric", "stage", "value"]].itertuples(index=False):
        nested.setdefault(str(metric), {})[str(stage)] = float(value)
    return nested


def write_metrics(tables: Mapping[str, pd.DataFrame], outdir: str | os.PathLike[str]) -> Path:
    """Write each table to ``outdir/{name}.tsv`` and the summary to ``outdir/metrics.json``, atomically.

    The folder appears complete or not at all. Raises ``ValueError`` if a table holds NaN or Inf.
    """
    if "summary" not in tables:
        raise ValueError("the metrics need a summary table")
    for name, table in tables.items():
        numeric = table.select_dtypes(include=[np.number]).to_numpy(dtype=np.float64)
        if not np.isfinite(numeric).all():
            raise ValueError(f"metrics table {name!r} holds NaN or Inf")
    outdir = Path(outdir)
    with atomic_path(outdir, directory=True) as tmp:
        for name, table in tables.items():
            table.to_csv(tmp / f"{name}.tsv", sep="\t", index=name != "summary")
        (tmp / "metrics.json").write_text(json.dumps(summary_dict(tables["summary"]), indent=2) + "\n")
    return outdir


def read_metrics(outdir: str | os.PathLike[str]) -> dict[str, pd.DataFrame]:
    """Tables written by :func:`write_metrics`, by name (index restored)."""
    outdir = Path(outdir)
    summary_path = outdir / "summary.tsv"
    if not summary_path.is_file():
        raise InputError(outdir, "not a metrics folder: summary.tsv is missing")
    tables = {"summary": pd.read_csv(summary_path, sep="\t")}
    for name in TABLE_NAMES[1:]:
        path = outdir / f"{name}.tsv"
        if path.is_file():
            tables[name] = pd.read_csv(path, sep="\t", index_col=0, keep_default_na=False)
    return tables


def _column_sums(values) -> np.ndarray:
    """``(G,)`` float64 column sums of a dense or sparse ``(N, G)`` array."""
    return np.asarray(values.sum(axis=0), dtype=np.float64).reshape(-1)


def _as_2d(values) -> np.ndarray:
    values = as_dense(values)
    return values[:, None] if values.ndim == 1 else values


def _pair(estimate, reference) -> tuple[np.ndarray, np.ndarray]:
    estimate, reference = as_dense(estimate), as_dense(reference)
    if estimate.shape != reference.shape:
        raise ValueError(f"shapes differ: {estimate.shape} vs {reference.shape}")
    return estimate, reference


def _mask(mask, n: int) -> np.ndarray:
    mask = np.asarray(mask, dtype=bool).reshape(-1)
    if mask.shape[0] != n:
        raise ValueError(f"the mask has {mask.shape[0]} entries for {n} spots")
    return mask


def _column_step(rows: np.ndarray, cols: np.ndarray) -> int:
    """Smallest column step between spots of one row: 2 on the hexagonal Visium grid, 1 on square grids."""
    order = np.lexsort((cols, rows))
    same_row = rows[order][1:] == rows[order][:-1]
    steps = np.diff(cols[order])[same_row]
    steps = steps[steps > 0]
    return int(steps.min()) if steps.size else 1
