r"""Quality control of a raw sample, and the diffusion range measured on its background spots.

Background spots (no tissue above them) catch only molecules that diffused there, so their UMIs, as a
function of the distance to the nearest tissue spot, are the direct evidence of lateral diffusion
("spot swapping"). From that decay curve this module estimates the largest diffusion distance, which the
correction uses as its kernel cutoff, and a Gaussian-equivalent kernel scale, its initial kernel scale.

The estimator
-------------
Let :math:`m(d)` be the median UMIs of background spots at distance :math:`d` (spot pitches) from the
tissue, in bins one pitch wide. Seen from a background spot, the tissue near the edge is roughly a
half-plane whose boundary lies :math:`\delta = 1/2` pitch beyond the centre of the last tissue spot. A
radial kernel :math:`K_s` of scale :math:`s` spreading the molecules of a uniform half-plane source leaves,
at distance :math:`d`, its one-dimensional marginal tail :math:`H((d - \delta) / s)`, so

.. math::

    m(d) = f + A\, H\!\left(\frac{d - \delta}{s}\right),

with a floor :math:`f` (molecules spread uniformly over the slide: distal bleeding and ambient RNA) and an
amplitude :math:`A`. Two families of :mod:`undiffuse.diffusion` are fitted by weighted least squares
(weights: the standard error of each bin's median, :math:`1.2533\,\mathrm{IQR} / (1.349 \sqrt n)`):

- ``gaussian``, :math:`K \propto e^{-r^2 / 2s^2}`: :math:`H(u) = \tfrac12 \operatorname{erfc}(u / \sqrt 2)`;
- ``heavy_tailed``, the Student-t kernel with :math:`\nu = 2`,
  :math:`K \propto (1 + r^2 / 2 s^2)^{-2}`: :math:`H(u) = \tfrac12 - u / (2 \sqrt{2 + u^2})`.

The family with the smaller weighted residual describes the tail. The **cutoff** is the distance at which
its excess over the floor has fallen to ``tail_fraction`` (5 %) of the excess at one pitch,

.. math::

    H\!\left(\frac{d_c - \delta}{s}\right) = \tau\, H\!\left(\frac{1 - \delta}{s}\right),

solved in closed form and clipped to ``cutoff_range`` (3 to 15 pitches). The **scale** is the Gaussian
fit's :math:`s`, the Gaussian kernel that best explains the decay (the correction's kernels are
parametrised by a Gaussian-like scale), clipped to ``[0.25, cutoff / 2]``. Without enough background
spots (fewer than four bins of five spots) the estimate falls back to :data:`FALLBACK_CUTOFF` and
:data:`FALLBACK_SCALE` and says so (``fitted = False``).

Visium HD
---------
Square bins of 2-16 um hold a few UMIs each, so the median of a distance bin is mostly 0 or quantised: the
decay is fitted to the **mean** instead (weights: its standard error). Distances to the tissue come from
the bins' array indices by a Euclidean distance transform (exact on the lattice, linear in the number of
bins). The fit is reported in microns as well (``*_um`` metrics, ``distance_um`` in the decay table), and
the cutoff is clipped to :data:`CUTOFF_RANGE_UM` microns instead of a range of pitches, because diffusion
lengths are physical and the bin size is not.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData
from scipy import ndimage
from scipy.optimize import OptimizeWarning, curve_fit
from scipy.special import erfc, erfcinv

from .spatial import SPATIAL_KEY, distance_to_mask, pitch_coordinates

#: Boundary between tissue and background, beyond the centre of the outermost tissue spot (pitches).
EDGE_OFFSET = 0.5

#: Cutoff is where the fitted excess has fallen to this share of its value at one pitch.
TAIL_FRACTION = 0.05

#: Sane range of the diffusion cutoff, in pitches.
CUTOFF_RANGE = (3.0, 15.0)

#: Smallest Gaussian-equivalent scale reported, in pitches.
MIN_SCALE = 0.25

#: Used when the background cannot support a fit (a filtered matrix, a slide covered by tissue).
FALLBACK_CUTOFF = 5.0
FALLBACK_SCALE = 1.0

#: Bins with fewer background spots are shown but not fitted.
MIN_SPOTS_PER_BIN = 5
MIN_BINS = 4

KERNEL_FAMILIES = ("gaussian", "heavy_tailed")

#: Centre-to-centre distance of Visium spots, in microns.
VISIUM_PITCH_UM = 100.0

#: Sane range of the diffusion cutoff on Visium HD, in microns (from a few bins to well past the longest
#: diffusion lengths reported for HD, about 30 um).
CUTOFF_RANGE_UM = (10.0, 300.0)

#: Statistic of a distance bin that the decay is fitted to.
DECAY_STATISTICS = ("median", "mean")


def half_plane_tail(u: np.ndarray, kind: str) -> np.ndarray:
    """One-dimensional marginal tail :math:`H(u)` of a unit-scale radial kernel (see the module docs)."""
    u = np.asarray(u, dtype=np.float64)
    if kind == "gaussian":
        return 0.5 * erfc(u / math.sqrt(2.0))
    if kind == "heavy_tailed":
        return 0.5 - u / (2.0 * np.sqrt(2.0 + u**2))
    raise ValueError(f"unknown kernel family {kind!r}")


def inverse_half_plane_tail(h: float, kind: str) -> float:
    """``u`` with :math:`H(u) = h`, for ``0 < h < 1``."""
    if kind == "gaussian":
        return float(math.sqrt(2.0) * erfcinv(2.0 * h))
    if kind == "heavy_tailed":
        w = 1.0 - 2.0 * h
        return float(w * math.sqrt(2.0 / (1.0 - w**2)))
    raise ValueError(f"unknown kernel family {kind!r}")


def arc_score(total_counts: np.ndarray, tissue: np.ndarray) -> float:
    r"""SpotClean's ambient RNA contamination (ARC) score.

    .. math::

        \mathrm{ARC} = \frac{\sum_{i \notin \Omega} n_i / N}{\frac{1}{|\Omega|}\sum_{i \in \Omega} n_i},

    background UMIs per spot of the whole slide over the mean UMIs of a tissue spot: a conservative lower
    bound of the share of contaminating UMIs in tissue spots (Ni et al., 2022). Zero without background.
    """
    total_counts = np.asarray(total_counts, dtype=np.float64)
    tissue = np.asarray(tissue, dtype=bool)
    mean_tissue = total_counts[tissue].mean() if tissue.any() else 0.0
    if mean_tissue <= 0:
        return 0.0
    return float(total_counts[~tissue].sum() / total_counts.shape[0] / mean_tissue)


def spot_totals(adata: AnnData) -> np.ndarray:
    """Total UMIs of every spot, over all genes."""
    return np.asarray(adata.X.sum(axis=1), dtype=np.float64).ravel()


def background_decay(
    distance: np.ndarray, umis: np.ndarray, tissue: np.ndarray, *, pitch_um: float | None = None
) -> pd.DataFrame:
    """UMIs of background spots binned by distance to the nearest tissue spot.

    Parameters
    ----------
    distance
        ``(N,)`` distance of each spot to the nearest tissue spot, in pitches.
    umis
        ``(N,)`` total UMIs per spot.
    tissue
        ``(N,)`` tissue mask; only the other spots are binned.
    pitch_um
        Spot pitch in microns; adds the column ``distance_um``.

    Returns
    -------
    One row per bin one pitch wide centred on an integer distance: ``bin`` (centre), ``distance`` (mean
    distance of its spots), ``n_spots``, ``median_umis``, ``mean_umis``, ``sem_umis`` (standard error of
    the mean), ``q25_umis``, ``q75_umis`` and, with ``pitch_um``, ``distance_um``.
    """
    background = ~np.asarray(tissue, dtype=bool)
    frame = pd.DataFrame({"distance": distance[background], "umis": umis[background]})
    columns = ["bin", "distance", "n_spots", "median_umis", "mean_umis", "sem_umis", "q25_umis", "q75_umis"]
    if frame.empty:
        return pd.DataFrame(columns=columns + (["distance_um"] if pitch_um else []))
    frame["bin"] = np.maximum(np.round(frame["distance"]), 1.0)
    grouped = frame.groupby("bin")
    n_spots = grouped.size()
    table = pd.DataFrame(
        {
            "distance": grouped["distance"].mean(),
            "n_spots": n_spots,
            "median_umis": grouped["umis"].median(),
            "mean_umis": grouped["umis"].mean(),
            "sem_umis": grouped["umis"].std(ddof=1).fillna(0.0) / np.sqrt(n_spots),
            "q25_umis": grouped["umis"].quantile(0.25),
            "q75_umis": grouped["umis"].quantile(0.75),
        }
    )
    table = table.reset_index()[columns]
    if pitch_um:
        table["distance_um"] = table["distance"] * float(pitch_um)
    return table


@dataclass(frozen=True)
class DecayFit:
    """Fit of ``floor + amplitude * H((d - EDGE_OFFSET) / scale)`` for one kernel family."""

    kind: str
    floor: float
    amplitude: float
    scale: float
    weighted_sse: float
    r_squared: float

    def predict(self, distance: np.ndarray) -> np.ndarray:
        return self.floor + self.amplitude * half_plane_tail(
            (np.asarray(distance) - EDGE_OFFSET) / self.scale, self.kind
        )

    def cutoff(self, tail_fraction: float) -> float:
        """Distance where the excess over the floor is ``tail_fraction`` of its value at one pitch."""
        at_one = half_plane_tail(np.array((1.0 - EDGE_OFFSET) / self.scale), self.kind)
        return EDGE_OFFSET + self.scale * inverse_half_plane_tail(float(tail_fraction * at_one), self.kind)


def decay_floors(distance: np.ndarray, counts: np.ndarray, kind: str, scale: float) -> np.ndarray:
    r"""``(G,)`` each gene's floor :math:`f_g` of the half-plane decay with a given family and scale.

    Fits :math:`x_{jg} = f_g + A_g\, H((d_j - 1/2) / s)` to the counts of background spots :math:`j` by least
    squares, one pair :math:`(f_g, A_g)` per gene, the shape :math:`H` and scale :math:`s` shared (see the
    module docs). The floor is the level the local kernel leaves to the uniform (distal) share and ambient RNA;
    it is not clipped.

    Parameters
    ----------
    distance
        ``(B,)`` the background spots' distances to the nearest tissue spot (pitches).
    counts
        ``(B, G)`` their counts.
    kind, scale
        Kernel family and scale (pitches) of the decay.
    """
    design = np.stack(
        [np.ones_like(distance), half_plane_tail((distance - EDGE_OFFSET) / scale, kind)], axis=1
    )
    coefficients, *_ = np.linalg.lstsq(design, np.asarray(counts, dtype=np.float64), rcond=None)
    return coefficients[0]


def fit_decay(decay: pd.DataFrame, kind: str, *, statistic: str = "median") -> DecayFit | None:
    """Weighted least-squares fit of one kernel family to a decay table; None when it cannot be fitted.

    ``statistic`` is the column fitted: ``median`` (Visium spots) or ``mean`` (Visium HD bins, whose
    medians are quantised near zero).
    """
    if statistic not in DECAY_STATISTICS:
        raise ValueError(f"unknown decay statistic {statistic!r}; expected one of {DECAY_STATISTICS}")
    usable = decay[decay["n_spots"] >= MIN_SPOTS_PER_BIN]
    if len(usable) < MIN_BINS:
        return None
    x = usable["distance"].to_numpy(dtype=np.float64)
    y = usable[f"{statistic}_umis"].to_numpy(dtype=np.float64)
    n = usable["n_spots"].to_numpy(dtype=np.float64)
    # Floored so that a bin of identical values does not get infinite weight.
    if statistic == "median":
        iqr = (usable["q75_umis"] - usable["q25_umis"]).to_numpy(dtype=np.float64)
        sigma = 1.2533 * np.maximum(iqr / 1.349, 0.05 * max(float(np.median(y)), 1.0)) / np.sqrt(n)
    else:
        sem = usable["sem_umis"].to_numpy(dtype=np.float64)
        sigma = np.maximum(sem, 0.05 * max(float(np.median(y)), 1e-3) / np.sqrt(n))
    floor0 = float(np.min(y))
    scale0 = 1.5
    amp0 = max(float(y[0]) - floor0, 1e-6) / float(
        half_plane_tail(np.array((1 - EDGE_OFFSET) / scale0), kind)
    )

    def model(d: np.ndarray, floor: float, amplitude: float, scale: float) -> np.ndarray:
        return floor + amplitude * half_plane_tail((d - EDGE_OFFSET) / scale, kind)

    upper = float(np.max(y)) * 10 + 1.0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", OptimizeWarning)
            params, _ = curve_fit(
                model,
                x,
                y,
                p0=(floor0, amp0, scale0),
                sigma=sigma,
                bounds=([0.0, 0.0, 0.05], [upper, upper * 1e3, 50.0]),
                maxfev=20000,
            )
    except (RuntimeError, ValueError):
        return None
    residual = (y - model(x, *params)) / sigma
    centred = (y - np.average(y, weights=sigma**-2)) / sigma
    total = float(np.sum(centred**2))
    r_squared = 1.0 - float(np.sum(residual**2)) / total if total > 0 else 0.0
    if not np.all(np.isfinite(params)):
        return None
    return DecayFit(
        kind, float(params[0]), float(params[1]), float(params[2]), float(np.sum(residual**2)), r_squared
    )


@dataclass(frozen=True)
class DiffusionEstimate:
    """How far molecules diffuse, from the background decay.

    Attributes
    ----------
    cutoff
        Largest diffusion distance (pitches): the correction's kernel cutoff.
    scale
        Gaussian-equivalent kernel scale (pitches): the correction's initial kernel scale.
    fitted
        False when the fallback values were used.
    kernel
        Family that fits the tail best (``gaussian`` or ``heavy_tailed``), or ``none``.
    floor, amplitude, kernel_scale, r_squared
        Parameters and goodness of fit of that family (0 when not fitted).
    statistic
        Column of the decay table that was fitted (``median`` or ``mean``).
    pitch_um
        Spot pitch in microns, to read the distances in microns (0 when unknown).
    """

    cutoff: float
    scale: float
    fitted: bool
    kernel: str = "none"
    floor: float = 0.0
    amplitude: float = 0.0
    kernel_scale: float = 0.0
    r_squared: float = 0.0
    statistic: str = "median"
    pitch_um: float = 0.0


def estimate_diffusion(
    decay: pd.DataFrame,
    *,
    tail_fraction: float = TAIL_FRACTION,
    cutoff_range: tuple[float, float] = CUTOFF_RANGE,
    statistic: str = "median",
) -> tuple[DiffusionEstimate, dict[str, DecayFit]]:
    """Estimate the diffusion cutoff and Gaussian-equivalent scale from a background decay table.

    See the module docstring for the model; ``statistic`` as in :func:`fit_decay`. Returns the estimate and
    the fits by family.
    """
    fits = {
        kind: fit
        for kind in KERNEL_FAMILIES
        if (fit := fit_decay(decay, kind, statistic=statistic)) is not None
    }
    low, high = cutoff_range
    if "gaussian" not in fits or fits["gaussian"].amplitude <= 0:
        cutoff = float(np.clip(FALLBACK_CUTOFF, low, high))
        fallback = DiffusionEstimate(
            cutoff, min(FALLBACK_SCALE, cutoff / 2), fitted=False, statistic=statistic
        )
        return fallback, fits
    best = min(fits.values(), key=lambda fit: fit.weighted_sse)
    cutoff = float(np.clip(best.cutoff(tail_fraction), low, high))
    scale = float(np.clip(fits["gaussian"].scale, MIN_SCALE, cutoff / 2))
    estimate = DiffusionEstimate(
        cutoff=cutoff,
        scale=scale,
        fitted=True,
        kernel=best.kind,
        floor=best.floor,
        amplitude=best.amplitude,
        kernel_scale=best.scale,
        r_squared=best.r_squared,
        statistic=statistic,
    )
    return estimate, fits


def add_qc_metrics(adata: AnnData) -> None:
    """scanpy's QC metrics in place (``obs`` ``total_counts``, ``n_genes_by_counts``, ``pct_counts_mt``
    when mitochondrial genes are present; ``var`` ``total_counts``, ``n_cells_by_counts``, ...)."""
    names = adata.var_names.str.lower()
    adata.var["mt"] = names.str.startswith("mt-")
    qc_vars = ["mt"] if adata.var["mt"].any() else []
    # Imported here: scanpy costs seconds to import, and most users of this module (every correction job
    # through the tissue mask) never call it.
    import scanpy as sc

    sc.pp.calculate_qc_metrics(adata, qc_vars=qc_vars, percent_top=None, log1p=False, inplace=True)


@dataclass(frozen=True)
class QCReport:
    """QC of one sample: scalar metrics, the background decay table and the diffusion estimate."""

    metrics: dict[str, object]
    decay: pd.DataFrame
    estimate: DiffusionEstimate
    fits: dict[str, DecayFit]


def compute_qc(
    adata: AnnData,
    *,
    tissue: np.ndarray,
    tail_fraction: float = TAIL_FRACTION,
    cutoff_range: tuple[float, float] = CUTOFF_RANGE,
) -> QCReport:
    """Compute QC in place and return the report.

    Adds ``obs['distance_to_tissue']`` (pitches) and scanpy's QC columns to ``adata``.

    Parameters
    ----------
    adata
        Canonical AnnData with raw counts on all spots.
    tissue
        ``(N,)`` boolean mask of tissue spots (the mask the correction will use).
    tail_fraction, cutoff_range
        See :func:`estimate_diffusion`.

    Returns
    -------
    QCReport whose ``metrics`` hold only finite scalars: spot and UMI counts in tissue and background,
    the ARC score, the diffusion cutoff and scale and the fit behind them.
    """
    tissue = np.asarray(tissue, dtype=bool)
    add_qc_metrics(adata)
    umis = spot_totals(adata)
    hd = is_visium_hd(adata)
    pitch = spot_pitch_um(adata)
    if hd:
        distance = lattice_distance_to_mask(
            adata.obs["array_row"].to_numpy(), adata.obs["array_col"].to_numpy(), tissue
        )
        cutoff_range = (CUTOFF_RANGE_UM[0] / pitch, CUTOFF_RANGE_UM[1] / pitch)
    else:
        distance = distance_to_mask(pitch_coordinates(adata), tissue)
    adata.obs["distance_to_tissue"] = distance
    decay = background_decay(distance, umis, tissue, pitch_um=pitch)
    statistic = "mean" if hd else "median"
    estimate, fits = estimate_diffusion(
        decay, tail_fraction=tail_fraction, cutoff_range=cutoff_range, statistic=statistic
    )
    estimate = replace(estimate, pitch_um=pitch)

    n_genes = np.asarray((adata.X > 0).sum(axis=1)).ravel() if sp.issparse(adata.X) else (adata.X > 0).sum(1)
    background = ~tissue
    total = float(umis.sum())
    in_tissue = adata.obs["in_tissue"].to_numpy(dtype=bool)
    metrics: dict[str, object] = {
        "sample_id": str(adata.uns["undiffuse"]["sample_id"]),
        "platform": str(adata.uns["undiffuse"]["platform"]),
        "n_spots": int(adata.n_obs),
        "n_genes": int(adata.n_vars),
        "n_spots_in_tissue": int(in_tissue.sum()),
        "n_tissue_spots": int(tissue.sum()),
        "n_background_spots": int(background.sum()),
        "spot_pitch_px": float(adata.uns["undiffuse"]["spot_pitch_px"]),
        "umis_total": total,
        "umis_tissue": float(umis[tissue].sum()),
        "umis_background": float(umis[background].sum()),
        "background_umi_fraction": float(umis[background].sum() / total) if total > 0 else 0.0,
        "mean_umis_tissue_spot": float(umis[tissue].mean()),
        "median_umis_tissue_spot": float(np.median(umis[tissue])),
        "mean_umis_background_spot": float(umis[background].mean()) if background.any() else 0.0,
        "median_umis_background_spot": float(np.median(umis[background])) if background.any() else 0.0,
        "median_genes_tissue_spot": float(np.median(n_genes[tissue])),
        "max_distance_to_tissue": float(distance.max()),
        "arc_score": arc_score(umis, tissue),
        "diffusion_cutoff": estimate.cutoff,
        "diffusion_scale": estimate.scale,
        "decay_fitted": bool(estimate.fitted),
        "decay_kernel": estimate.kernel,
        "decay_floor": estimate.floor,
        "decay_amplitude": estimate.amplitude,
        "decay_kernel_scale": estimate.kernel_scale,
        "decay_r_squared": estimate.r_squared,
        "decay_statistic": statistic,
        "spot_pitch_um": pitch,
        "diffusion_cutoff_um": estimate.cutoff * pitch,
        "diffusion_scale_um": estimate.scale * pitch,
        "decay_kernel_scale_um": estimate.kernel_scale * pitch,
    }
    for kind, fit in fits.items():
        metrics[f"decay_{kind}_scale"] = fit.scale
        metrics[f"decay_{kind}_scale_um"] = fit.scale * pitch
        metrics[f"decay_{kind}_r_squared"] = fit.r_squared
    return QCReport(metrics=metrics, decay=_with_fits(decay, fits), estimate=estimate, fits=fits)


def is_visium_hd(adata: AnnData) -> bool:
    """Whether a canonical AnnData holds Visium HD square bins."""
    return adata.uns.get("undiffuse", {}).get("platform") == "visium_hd"


def spot_pitch_um(adata: AnnData) -> float:
    """Centre-to-centre distance of adjacent spots or bins in microns.

    Visium HD: the ``bin_size_um`` scale factor, else the pitch in pixels times ``microns_per_pixel``;
    Visium: 100 um.
    """
    info = adata.uns.get("undiffuse", {})
    if info.get("platform") != "visium_hd":
        return VISIUM_PITCH_UM
    library = adata.uns.get(SPATIAL_KEY, {}).get(info.get("sample_id"), {})
    scalefactors = library.get("scalefactors", {})
    if "bin_size_um" in scalefactors:
        return float(scalefactors["bin_size_um"])
    if "microns_per_pixel" in scalefactors and info.get("spot_pitch_px"):
        return float(scalefactors["microns_per_pixel"]) * float(info["spot_pitch_px"])
    raise ValueError(
        "a Visium HD sample needs bin_size_um or microns_per_pixel among its scale factors to measure "
        "diffusion in microns"
    )


def lattice_distance_to_mask(array_row: np.ndarray, array_col: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Distance of every bin of a square lattice to the nearest bin in ``mask`` (0 inside), in pitches.

    A Euclidean distance transform on the raster of array indices: exact on the lattice, linear in the
    number of bins and without a k-d tree of millions of points. Lattice sites without a bin are not in
    ``mask``.
    """
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        raise ValueError("the mask selects no spot")
    rows = np.asarray(array_row, dtype=np.int64) - int(np.min(array_row))
    cols = np.asarray(array_col, dtype=np.int64) - int(np.min(array_col))
    outside = np.ones((int(rows.max()) + 1, int(cols.max()) + 1), dtype=bool)
    outside[rows[mask], cols[mask]] = False
    return ndimage.distance_transform_edt(outside)[rows, cols]


def _with_fits(decay: pd.DataFrame, fits: dict[str, DecayFit]) -> pd.DataFrame:
    table = decay.copy()
    for kind, fit in fits.items():
        table[f"fit_{kind}"] = fit.predict(table["distance"].to_numpy(dtype=np.float64))
    return table
