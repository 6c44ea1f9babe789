"""Border half-width: analytic edges, the lattice's resolution floor, diffusion, regions from markers."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import ndtr

from undiffuse import metrics
from undiffuse.diffusion import diffuse

HWHM_PER_SIGMA = np.sqrt(2 * np.log(2))


def square_grid(spacing: float, half_width: int, height: int = 4) -> np.ndarray:
    """Spot centres on a square grid, columns at +-spacing/2, +-3 spacing/2, ... about the border x = 0."""
    x = (np.arange(-half_width, half_width) + 0.5) * spacing
    xx, yy = np.meshgrid(x, np.arange(height) * spacing)
    return np.column_stack([xx.ravel(), yy.ravel()])


def hex_lattice(n_rows: int, n_cols: int) -> np.ndarray:
    """Visium spot centres in spot pitches."""
    rows = np.repeat(np.arange(n_rows), n_cols)
    cols = np.tile(np.arange(n_cols), n_rows)
    return np.column_stack([cols + 0.5 * (rows % 2), rows * np.sqrt(3) / 2])


def test_signed_distance_is_the_distance_to_a_straight_border():
    coords = square_grid(0.1, 100)
    distance = metrics.signed_border_distance(coords, coords[:, 0] > 0)
    # Spots beside the border sit half a spacing from it, on either side.
    np.testing.assert_allclose(distance, coords[:, 0], atol=1e-12)


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0])
def test_halfwidth_of_a_gaussian_blurred_step_is_sigma_sqrt_2ln2(sigma):
    """p(s) = lo + (hi - lo) Phi(s / sigma): the derivative is a Gaussian of HWHM sigma sqrt(2 ln 2)."""
    spacing = 0.02
    coords = square_grid(spacing, int(8 * sigma / spacing))
    distance = metrics.signed_border_distance(coords, coords[:, 0] > 0)
    edge = ndtr(coords[:, 0] / sigma)
    values = np.column_stack([1.0 + 5.0 * edge, 20.0 * edge])  # any plateaus: the profile is normalised
    widths = metrics.border_halfwidth(values, distance, bin_width=spacing, reach=6 * sigma)
    np.testing.assert_allclose(widths, sigma * HWHM_PER_SIGMA, rtol=2e-3)


def test_profile_is_normalised_between_the_plateaus_and_crosses_half_on_the_border():
    coords = square_grid(0.05, 200)
    distance = metrics.signed_border_distance(coords, coords[:, 0] > 0)
    profile = metrics.border_profile(3.0 + 4.0 * ndtr(coords[:, 0]), distance, bin_width=0.05, reach=6.0)
    assert profile["normalised"].iat[0] == 0.0 and profile["normalised"].iat[-1] == 1.0
    assert (np.diff(profile["normalised"]) >= 0).all()
    assert profile["n_spots"].sum() == (np.abs(distance) <= 6.0).sum()
    # A symmetric blur crosses half on the border itself: that is why the width is read elsewhere.
    half = np.interp(0.5, profile["normalised"], profile["distance"])
    assert half == pytest.approx(0.0, abs=0.03)


def test_an_unblurred_step_measures_the_resolution_floor_of_the_lattice():
    coords = hex_lattice(30, 30)
    region = coords[:, 0] > 15
    distance = metrics.signed_border_distance(coords, region)
    assert set(np.round(distance[np.abs(distance) < 1], 9)) == {-0.5, 0.5}
    # Bins at -0.5 and +0.5 hold 0 and 1: the quartiles cross at -0.25 and 0.25.
    width = metrics.border_halfwidth(region.astype(float), distance)
    assert width[0] == pytest.approx(metrics.QUARTILES_TO_HWHM * 0.5)


def test_diffusion_widens_the_border_and_counts_noise_does_not_fake_it():
    coords = hex_lattice(60, 60)
    tissue = np.ones(len(coords), dtype=bool)
    region = coords[:, 0] > 30
    distance = metrics.signed_border_distance(coords, region)
    truth = np.where(region, 40.0, 4.0)[:, None]
    scales = np.array([1.0, 2.0])
    blurred = diffuse(np.repeat(truth, 2, axis=1), coords, tissue, scale=scales, bleed=1.0, distal=0.0)
    # Away from the edges of the slide (which the kernel runs off), where the border is straight.
    middle = (np.abs(coords[:, 1] - coords[:, 1].mean()) < 15) & (np.abs(distance) < 14)
    widths = metrics.border_halfwidth(blurred[middle], distance[middle], reach=8.0)
    # A Gaussian kernel of scale s blurs a straight border into Phi(s / scale): HWHM = 1.177 s, up to binning.
    np.testing.assert_allclose(widths, scales * HWHM_PER_SIGMA, rtol=0.1)
    floor = metrics.border_halfwidth(truth[middle], distance[middle], reach=8.0)[0]
    assert floor < widths[0] < widths[1]
    counts = np.random.default_rng(0).poisson(blurred[middle]).astype(float)
    np.testing.assert_allclose(
        metrics.border_halfwidth(counts, distance[middle], reach=8.0), widths, rtol=0.15
    )


def test_a_gene_that_does_not_rise_into_the_region_has_no_halfwidth():
    coords = hex_lattice(20, 20)
    region = coords[:, 0] > 10
    distance = metrics.signed_border_distance(coords, region)
    values = np.column_stack([np.where(region, 1.0, 5.0), np.full(len(coords), 2.0), region * 3.0])
    widths = metrics.border_halfwidth(values, distance)
    assert np.isnan(widths[:2]).all() and np.isfinite(widths[2])


def test_bad_regions_and_bins_are_refused():
    coords = hex_lattice(5, 5)
    with pytest.raises(ValueError, match="some of the spots but not all"):
        metrics.signed_border_distance(coords, np.ones(len(coords), dtype=bool))
    with pytest.raises(ValueError, match="bin_width"):
        metrics.border_profile(np.ones(3), np.array([-1.0, 0.5, 1.0]), bin_width=0.0)
    with pytest.raises(ValueError, match="no spot lies within"):
        metrics.border_profile(np.ones(2), np.array([-9.0, 9.0]), reach=2.0)


def test_marker_region_recovers_a_disc_from_noisy_marker_counts():
    coords = hex_lattice(40, 40)
    disc = np.hypot(*(coords - coords.mean(axis=0)).T) < 10
    rng = np.random.default_rng(1)
    markers = rng.poisson(np.where(disc, 12.0, 3.0)[:, None] * [1.0, 0.2]).astype(float)
    region = metrics.marker_region(markers, coords)
    assert np.mean(region == disc) > 0.97
    with pytest.raises(ValueError, match="no counts"):
        metrics.marker_region(np.zeros((len(coords), 2)), coords)


def test_home_domains_are_where_a_gene_reaches_half_its_highest_domain_mean():
    domains = np.array(["a", "a", "b", "b", "c", "c"])
    values = np.column_stack(
        [
            [4.0, 6.0, 0.0, 1.0, 1.0, 0.0],  # marker of a
            [4.0, 6.0, 3.0, 3.0, 0.0, 1.0],  # a and b (mean 3 >= half of 5)
            [1.0, 1.0, 1.0, 1.0, 1.0, 1.0],  # everywhere: no border
        ]
    )
    home = metrics.home_domains(values, domains)
    np.testing.assert_array_equal(home[:, 0], domains == "a")
    np.testing.assert_array_equal(home[:, 1], domains != "c")
    assert home[:, 2].all()
