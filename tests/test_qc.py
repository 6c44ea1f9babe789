"""QC: ARC score, background decay, and the diffusion range estimator."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import hex_lattice
from scipy import stats

from undiffuse.diffusion import diffuse
from undiffuse.qc import (
    CUTOFF_RANGE,
    FALLBACK_CUTOFF,
    FALLBACK_SCALE,
    TAIL_FRACTION,
    DecayFit,
    arc_score,
    background_decay,
    decay_floors,
    estimate_diffusion,
    half_plane_tail,
    inverse_half_plane_tail,
    lattice_distance_to_mask,
)
from undiffuse.spatial import distance_to_mask


def model_decay(kind: str, floor: float, amplitude: float, scale: float, n_bins: int = 15) -> pd.DataFrame:
    distance = np.arange(1, n_bins + 1, dtype=np.float64)
    median = DecayFit(kind, floor, amplitude, scale, 0.0, 1.0).predict(distance)
    return pd.DataFrame(
        {
            "bin": distance,
            "distance": distance,
            "n_spots": 100,
            "median_umis": median,
            "mean_umis": median,
            "q25_umis": median * 0.9,
            "q75_umis": median * 1.1,
        }
    )


def test_arc_score_by_hand():
    totals = np.array([10.0, 20.0, 30.0, 2.0, 4.0])
    tissue = np.array([True, True, True, False, False])
    # (6 background UMIs / 5 spots) / (60 / 3 per tissue spot)
    assert arc_score(totals, tissue) == pytest.approx(1.2 / 20.0)
    assert arc_score(totals, np.ones(5, dtype=bool)) == 0.0


@pytest.mark.parametrize(("kind", "reference"), [("gaussian", stats.norm()), ("heavy_tailed", stats.t(df=2))])
def test_half_plane_tail_is_the_marginal_tail(kind, reference):
    u = np.linspace(-3, 6, 50)
    np.testing.assert_allclose(half_plane_tail(u, kind), reference.sf(u), rtol=1e-10, atol=1e-14)
    for h in (0.4, 0.05, 1e-3):
        assert half_plane_tail(np.array(inverse_half_plane_tail(h, kind)), kind) == pytest.approx(h)


@pytest.mark.parametrize("kind", ["gaussian", "heavy_tailed"])
def test_decay_floors_recover_each_genes_floor(kind):
    """Per-gene floors of the half-plane decay with a shared shape: exact on noiseless decays, within a few
    percent (or a fifth of a count) on Poisson counts, where the mean beyond the tail is biased high by a heavy
    tail."""
    rng = np.random.default_rng(0)
    distance = rng.uniform(0.5, 25.0, 3000)
    floors, amplitudes = np.array([0.5, 2.0, 8.0]), np.array([40.0, 10.0, 200.0])
    expected = DecayFit(kind, 0.0, 1.0, 3.0, 0.0, 1.0).predict(distance)[:, None] * amplitudes + floors
    np.testing.assert_allclose(decay_floors(distance, expected, kind, 3.0), floors, rtol=1e-8)
    measured = decay_floors(distance, rng.poisson(expected).astype(float), kind, 3.0)
    np.testing.assert_allclose(measured, floors, rtol=0.05, atol=0.2)
    if kind == "heavy_tailed":
        assert (expected[distance > 15].mean(axis=0) > 1.1 * floors).any()


@pytest.mark.parametrize("kind", ["gaussian", "heavy_tailed"])
def test_fit_recovers_model_parameters(kind):
    estimate, fits = estimate_diffusion(model_decay(kind, floor=300.0, amplitude=4000.0, scale=2.0))
    assert estimate.fitted and estimate.kernel == kind
    fit = fits[kind]
    assert fit.floor == pytest.approx(300.0, rel=1e-3)
    assert fit.amplitude == pytest.approx(4000.0, rel=1e-3)
    assert fit.scale == pytest.approx(2.0, rel=1e-3)
    # The cutoff is where the excess is TAIL_FRACTION of the excess at one pitch.
    excess = fit.predict(np.array([1.0, estimate.cutoff])) - fit.floor
    assert excess[1] / excess[0] == pytest.approx(TAIL_FRACTION, rel=1e-6)
    if kind == "gaussian":
        assert estimate.scale == pytest.approx(2.0, rel=1e-3)


def test_cutoff_is_clipped():
    narrow, _ = estimate_diffusion(model_decay("gaussian", 100.0, 1000.0, 0.3))
    wide, _ = estimate_diffusion(model_decay("gaussian", 100.0, 1000.0, 12.0, n_bins=30))
    assert narrow.cutoff == CUTOFF_RANGE[0] and wide.cutoff == CUTOFF_RANGE[1]
    assert wide.scale <= wide.cutoff / 2


def test_fallback_without_background():
    empty = background_decay(np.zeros(4), np.ones(4), np.ones(4, dtype=bool))
    assert empty.empty
    estimate, fits = estimate_diffusion(empty)
    assert not estimate.fitted and fits == {}
    assert (estimate.cutoff, estimate.scale) == (FALLBACK_CUTOFF, FALLBACK_SCALE)


def test_background_decay_bins():
    distance = np.array([0.0, 0.0, 1.0, 1.0, 1.73, 2.0, 2.65, 3.0])
    umis = np.array([100.0, 90.0, 10.0, 12.0, 6.0, 8.0, 3.0, 5.0])
    tissue = distance == 0
    table = background_decay(distance, umis, tissue)
    assert table["bin"].tolist() == [1.0, 2.0, 3.0]
    assert table["n_spots"].tolist() == [2, 2, 2]
    assert table["median_umis"].tolist() == [11.0, 7.0, 4.0]
    assert table["distance"].tolist() == pytest.approx([1.0, 1.865, 2.825])


@pytest.mark.parametrize(
    ("kind", "scale", "tolerance"),
    [("gaussian", 1.5, 0.1), ("gaussian", 3.0, 0.1), ("heavy_tailed", 1.5, 0.15)],
)
def test_estimator_recovers_the_forward_model(kind, scale, tolerance):
    """Diffuse a uniform half-plane of tissue with the shared forward model; the fit finds the kernel.

    The heavy tail needs a wider lattice and kernel support (the forward model's default truncation at
    eight scales makes its tail look narrower); the estimate is then within 15 %.
    """
    coords = hex_lattice(64, 64)
    tissue = coords[:, 0] < 30
    field = np.where(tissue, 1000.0, 0.0)[:, None]
    cutoff = 20.0 if kind == "heavy_tailed" else None
    observed = diffuse(
        field, coords, tissue, scale=np.array([scale]), bleed=0.3, distal=0.05, kind=kind, cutoff=cutoff
    )[:, 0]
    # Spots near the top and bottom edges do not see a half-plane of tissue; keep the middle rows.
    middle = (coords[:, 1] > 16) & (coords[:, 1] < coords[:, 1].max() - 16)
    distance = distance_to_mask(coords, tissue)
    estimate, fits = estimate_diffusion(background_decay(distance[middle], observed[middle], tissue[middle]))
    assert estimate.fitted and estimate.kernel == kind
    assert fits[kind].scale == pytest.approx(scale, rel=tolerance)
    assert CUTOFF_RANGE[0] <= estimate.cutoff <= CUTOFF_RANGE[1]


def test_lattice_distance_equals_the_kd_tree_distance():
    rng = np.random.default_rng(0)
    rows, cols = np.divmod(np.arange(40 * 30), 30)
    keep = rng.uniform(size=rows.size) > 0.1  # sites without a bin are not tissue
    rows, cols = rows[keep], cols[keep]
    tissue = np.hypot(rows - 20, cols - 12) < 8
    coords = np.column_stack([cols, rows]).astype(np.float64)
    assert np.allclose(lattice_distance_to_mask(rows, cols, tissue), distance_to_mask(coords, tissue))


def test_mean_statistic_fit_recovers_a_noisy_sparse_decay():
    """HD bins hold a few UMIs: Poisson draws around the model, fitted through the mean of each bin."""
    rng = np.random.default_rng(1)
    truth = DecayFit("heavy_tailed", 0.3, 6.0, 2.0, 0.0, 1.0)
    distance = np.repeat(np.arange(1, 41, dtype=np.float64), 400) + rng.uniform(-0.4, 0.4, 16000)
    umis = rng.poisson(truth.predict(distance)).astype(np.float64)
    decay = background_decay(distance, umis, np.zeros(distance.size, dtype=bool), pitch_um=2.0)
    assert decay["median_umis"].nunique() <= 4  # the medians are quantised: no curve to fit
    assert np.allclose(decay["distance_um"], 2.0 * decay["distance"])
    estimate, fits = estimate_diffusion(decay, statistic="mean")
    assert estimate.fitted and estimate.kernel == "heavy_tailed" and estimate.statistic == "mean"
    assert fits["heavy_tailed"].scale == pytest.approx(2.0, rel=0.2)
