"""The smoothness prior of the deconvolution: its M-step, its empirical-Bayes strength, and what it buys."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import hex_lattice, hex_sample, mean_pearson, tissue_rmse

from undiffuse.correct import CorrectionConfig, deconvolve_known_kernel
from undiffuse.diffusion import expected_counts
from undiffuse.geometry import expression_profiles
from undiffuse.moran import spatial_weights
from undiffuse.operators import PairOperator
from undiffuse.ot.deconvolution import deconvolve_em
from undiffuse.ot.prior import (
    MAX_STRENGTH,
    GammaFieldPrior,
    TissueNeighbours,
    bilateral_weights,
    blur_attenuation,
    empirical_strength,
    local_excess_variation,
)


@pytest.fixture(scope="module")
def lattice():
    coords = hex_lattice(24, 20)
    tissue = np.hypot(*(coords - coords.mean(0)).T) < 7.0
    neighbours = TissueNeighbours.build(coords, tissue, dtype=torch.float64, device="cpu")
    return coords, tissue, neighbours


def test_neighbours_are_tissue_rings_and_centre_is_deep_in_tissue(lattice):
    coords, tissue, neighbours = lattice
    degree = neighbours.degree.numpy()
    assert (degree[~tissue] == 0).all()
    assert degree[tissue].max() == 6 and degree[tissue].min() >= 1
    assert tissue[neighbours.centre]
    assert np.hypot(*(coords[neighbours.centre] - coords.mean(0))) < 1.0
    mean = neighbours.mean(torch.ones((len(tissue), 1), dtype=torch.float64))[:, 0].numpy()
    np.testing.assert_allclose(mean[tissue], 1.0)
    assert (mean[~tissue] == 0).all()


def test_update_is_maximum_likelihood_at_zero_and_neighbour_mean_when_strong(lattice):
    _, tissue, neighbours = lattice
    rng = np.random.default_rng(0)
    field = torch.as_tensor(rng.gamma(2.0, 5.0, (len(tissue), 3)) * tissue[:, None])
    expected = torch.as_tensor(rng.gamma(2.0, 5.0, (len(tissue), 3)) * tissue[:, None])
    weak = GammaFieldPrior(neighbours, torch.zeros(3, dtype=torch.float64)).update(expected, field)
    np.testing.assert_allclose(weak.numpy(), expected.numpy(), rtol=1e-12)
    strong = GammaFieldPrior(neighbours, torch.full((3,), 1e9, dtype=torch.float64)).update(expected, field)
    np.testing.assert_allclose(strong.numpy(), neighbours.mean(field).numpy(), rtol=1e-6)
    # Between the two: closer to the neighbour mean where a spot holds few molecules compared with alpha.
    middle = GammaFieldPrior(neighbours, torch.full((3,), 10.0, dtype=torch.float64)).update(expected, field)
    centre = neighbours.mean(field)
    inside = torch.as_tensor(tissue)
    lies_between = (middle - expected) * (middle - centre) <= 1e-9
    assert lies_between[inside].all()


def test_isolated_spot_keeps_its_update():
    coords = hex_lattice(6, 6)
    tissue = np.zeros(len(coords), bool)
    tissue[[0, 20]] = True  # two tissue spots that are not neighbours
    neighbours = TissueNeighbours.build(coords, tissue, dtype=torch.float64, device="cpu")
    expected = torch.zeros((len(coords), 1), dtype=torch.float64)
    expected[[0, 20], 0] = torch.tensor([3.0, 7.0], dtype=torch.float64)
    updated = GammaFieldPrior(neighbours, torch.tensor([50.0], dtype=torch.float64)).update(
        expected, expected
    )
    np.testing.assert_array_equal(updated.numpy(), expected.numpy())


def test_strength_recovers_the_gamma_shape_without_blur(lattice):
    """Counts Poisson around white Gamma(alpha) variation of a flat mean: the moment estimate finds alpha.

    The prior's alpha describes a spot's variation around its neighbours' mean; for white variation that mean
    varies too, by 1 / degree of a spot's variance, so the expected estimate is alpha / mean(1 + 1 / degree).
    """
    _, tissue, neighbours = lattice
    true_alpha = np.array([4.0, 20.0, 80.0])
    means = np.array([40.0, 60.0, 400.0])
    degree = neighbours.degree.numpy()
    expected = true_alpha / np.mean(1.0 + 1.0 / degree[degree > 0])
    estimates = []
    for seed in range(16):
        rng = np.random.default_rng(seed)
        field = rng.gamma(true_alpha, means / true_alpha, (len(tissue), 3)) * tissue[:, None]
        counts = torch.as_tensor(rng.poisson(field), dtype=torch.float64)
        excess, energy = local_excess_variation(counts, neighbours)
        attenuation = blur_attenuation(lambda f: f, neighbours, counts)
        np.testing.assert_allclose(attenuation.numpy(), 1.0)
        estimates.append(empirical_strength(excess, energy, attenuation).numpy())
    np.testing.assert_allclose(np.median(estimates, axis=0), expected, rtol=0.15)


def test_counts_without_variation_beyond_noise_get_a_strong_prior(lattice):
    _, tissue, neighbours = lattice
    one = torch.ones(1, dtype=torch.float64)
    constant = torch.as_tensor(30.0 * tissue[:, None], dtype=torch.float64)
    assert float(empirical_strength(*local_excess_variation(constant, neighbours), one)) == MAX_STRENGTH
    pure_noise = [
        float(
            empirical_strength(
                *local_excess_variation(torch.as_tensor(counts, dtype=torch.float64), neighbours), one
            )
        )
        for counts in (
            np.random.default_rng(seed).poisson(30.0, (len(tissue), 1)) * tissue[:, None] for seed in range(9)
        )
    ]
    assert np.median(pure_noise) > 100  # a coefficient of variation below 0.1


def test_blur_attenuation_falls_with_bleeding(lattice):
    coords, tissue, neighbours = lattice
    operator = PairOperator(coords, tissue, 4.0, dtype=torch.float64)
    kernel = operator.bind(lambda d, c: (-(d**2) / 2.0)[:, None].repeat(1, 3))
    bleed = torch.tensor([0.0, 0.3, 0.6], dtype=torch.float64)
    distal = torch.zeros(3, dtype=torch.float64)
    attenuation = blur_attenuation(
        lambda f: expected_counts(f, kernel, bleed, distal),
        neighbours,
        torch.zeros((len(tissue), 3), dtype=torch.float64),
    )
    values = attenuation.numpy()
    assert values[0] == pytest.approx(1.0)
    assert values[0] > values[1] > values[2] > 0


def test_em_with_prior_keeps_totals_and_confinement(lattice):
    coords, tissue, neighbours = lattice
    operator = PairOperator(coords, tissue, 3.0, dtype=torch.float64)
    kernel = operator.bind(lambda d, c: (-(d**2))[:, None].repeat(1, 2))
    rng = np.random.default_rng(5)
    counts = torch.as_tensor(rng.poisson(8.0, (len(tissue), 2)), dtype=torch.float64)
    start = counts * torch.as_tensor(tissue)[:, None]
    start = start / start.sum(0) * counts.sum(0)
    shares = torch.tensor([0.3, 0.3], dtype=torch.float64)
    prior = GammaFieldPrior(neighbours, torch.tensor([5.0, 500.0], dtype=torch.float64))
    field = deconvolve_em(counts, start, kernel, shares, 0.05 * shares, n_iter=30, prior=prior)
    np.testing.assert_allclose(field.sum(0).numpy(), counts.sum(0).numpy(), rtol=1e-10)
    assert torch.all(field[~torch.as_tensor(tissue)] == 0)
    assert torch.isfinite(field).all() and (field >= 0).all()
    # The stronger prior gives the smoother field.
    roughness = neighbours.deviation_energy(field) / field.square().sum(0)
    assert roughness[1] < roughness[0]


@pytest.mark.slow
def test_prior_beats_maximum_likelihood_with_the_true_kernel():
    """Poisson data at modest depth: MAP EM is closer to the truth than ML EM, in RMSE and in correlation."""
    adata, truth = hex_sample(n_genes=4, depth=20.0, seed=2)
    tissue = adata.obs["in_tissue"].to_numpy()
    common = dict(genes=list(adata.var_names), scale=1.8, bleed=0.3, distal=0.01, q_init=0.0)
    ml = deconvolve_known_kernel(adata, **common, config=CorrectionConfig(progress=False, prior_strength=0))
    map_ = deconvolve_known_kernel(adata, **common, config=CorrectionConfig(progress=False))

    assert tissue_rmse(map_, truth, tissue) < tissue_rmse(ml, truth, tissue)
    assert mean_pearson(map_, truth, tissue) > mean_pearson(ml, truth, tissue)
    np.testing.assert_allclose(map_.sum(0), adata.X.toarray().sum(0), rtol=1e-4)


def two_domains(seed=0):
    """A hexagonal lattice split into two domains (left, right) whose 5-gene profiles differ, with noise."""
    rng = np.random.default_rng(seed)
    coords = hex_lattice(16, 20)
    tissue = np.ones(len(coords), dtype=bool)
    domain = (coords[:, 0] >= 10).astype(int)
    profiles = np.where(domain[:, None] == 1, 1.0, -1.0) * np.arange(1, 6) + rng.normal(
        0, 0.3, (len(coords), 5)
    )
    return coords, tissue, domain, profiles


def test_bilateral_weights_are_row_normalised_and_low_across_a_border():
    coords, _, domain, profiles = two_domains()
    ring = spatial_weights(coords)
    weight = bilateral_weights(ring, profiles).numpy()
    rows = np.bincount(ring.source.numpy(), weights=weight, minlength=len(coords))
    np.testing.assert_allclose(rows, 1.0, rtol=1e-12)
    assert (weight >= 0).all()
    crosses = domain[ring.source.numpy()] != domain[ring.target.numpy()]
    assert weight[crosses].max() < 1e-3 < weight[~crosses].min()


def test_bilateral_weights_with_equal_profiles_are_the_uniform_prior():
    coords, tissue, _, _ = two_domains()
    tissue = tissue & (np.hypot(*(coords - coords.mean(0)).T) < 7.0)
    uniform = TissueNeighbours.build(coords, tissue, dtype=torch.float64, device="cpu")
    equal = TissueNeighbours.build(
        coords, tissue, profiles=np.ones((len(coords), 3)), dtype=torch.float64, device="cpu"
    )
    np.testing.assert_allclose(equal.weights.weight.numpy(), uniform.weights.weight.numpy(), rtol=1e-12)
    np.testing.assert_allclose(equal.degree.numpy(), uniform.degree.numpy(), rtol=1e-12)
    assert equal.centre == uniform.centre


def test_bilateral_prior_keeps_a_sharper_border_than_the_uniform_one():
    """Strong smoothing of a noisy two-domain field: the bilateral neighbour mean keeps the step between the
    domains, the uniform one spreads it over several spots."""
    coords, tissue, domain, profiles = two_domains()
    rng = np.random.default_rng(1)
    truth = torch.as_tensor(np.where(domain == 1, 50.0, 5.0)[:, None])
    noisy = torch.as_tensor(rng.poisson(truth.numpy()).astype(np.float64))
    errors = {}
    for name, kind in (("uniform", None), ("bilateral", profiles)):
        neighbours = TissueNeighbours.build(coords, tissue, profiles=kind, dtype=torch.float64, device="cpu")
        prior = GammaFieldPrior(neighbours, torch.full((1,), 20.0, dtype=torch.float64))
        field = noisy.clone()
        for _ in range(30):
            field = prior.update(noisy, field)
        near_border = np.abs(coords[:, 0] - 9.75) < 2.0
        errors[name] = float((field - truth)[near_border].abs().mean())
    assert errors["bilateral"] < 0.5 * errors["uniform"]


def test_expression_profiles_tell_domains_apart():
    adata, truth = hex_sample(n_genes=6, depth=50.0, seed=3)
    tissue = adata.obs["in_tissue"].to_numpy()
    profiles = expression_profiles(adata, tissue, n_components=3)
    assert profiles.shape == (adata.n_obs, 3) and np.isfinite(profiles).all()
    domain = truth[:, 0] > truth[:, 1]
    inside = tissue & (truth.sum(1) > 0)
    gap = abs(profiles[inside & domain, 0].mean() - profiles[inside & ~domain, 0].mean())
    assert gap > 2 * profiles[inside & domain, 0].std()


def test_bilateral_result_of_a_gene_does_not_depend_on_the_other_genes_corrected():
    """The profiles come from the sample's selected genes, once, not from the genes of a chunk."""
    adata, _ = hex_sample(n_genes=4, depth=20.0, seed=2)
    config = CorrectionConfig(progress=False, prior_weights="bilateral")
    common = dict(scale=1.8, bleed=0.3, distal=0.01, q_init=0.0, config=config)
    together = deconvolve_known_kernel(adata, genes=list(adata.var_names), **common)
    alone = deconvolve_known_kernel(adata, genes=["gene1"], **common)
    np.testing.assert_allclose(alone[:, 0], together[:, 1], rtol=1e-5, atol=1e-4)
    batched = deconvolve_known_kernel(
        adata, genes=list(adata.var_names), **{**common, "config": replace(config, batch_genes=3)}
    )
    np.testing.assert_allclose(batched, together, rtol=1e-5, atol=1e-4)
    uniform = deconvolve_known_kernel(
        adata,
        genes=["gene1"],
        **{**common, "config": CorrectionConfig(progress=False, prior_weights="uniform")},
    )
    assert not np.allclose(alone[:, 0], uniform[:, 0])


def test_bilateral_prior_beats_the_uniform_one_on_striped_domains():
    """With the true kernel, on narrow striped domains (borders everywhere), the bilateral prior is closer to
    the truth than the uniform one."""
    adata, truth = hex_sample(n_genes=4, depth=20.0, seed=2)
    tissue = adata.obs["in_tissue"].to_numpy()
    common = dict(genes=list(adata.var_names), scale=1.8, bleed=0.3, distal=0.01, q_init=0.0)
    fields = {
        weights: deconvolve_known_kernel(
            adata, **common, config=CorrectionConfig(progress=False, prior_weights=weights)
        )
        for weights in ("uniform", "bilateral")
    }
    assert tissue_rmse(fields["bilateral"], truth, tissue) < tissue_rmse(fields["uniform"], truth, tissue)
    assert mean_pearson(fields["bilateral"], truth, tissue) > mean_pearson(fields["uniform"], truth, tissue)


def test_prior_weights_is_validated():
    with pytest.raises(Exception, match="prior_weights must be 'uniform' or 'bilateral'"):
        CorrectionConfig(prior_weights="gaussian")
