"""The low-rank model of the true field (undiffuse.ot.programmes): Poisson NMF, its EM with a kernel per gene,
and the ``programmes`` option of correct."""

from __future__ import annotations

import importlib
import itertools

import numpy as np
import pytest
import torch
from conftest import hex_sample, tissue_rmse

from undiffuse.correct import (
    KEY,
    PROGRAMMES_MIN_GENES,
    CorrectionConfig,
    _geometry,
    _programmes,
    correct,
    deconvolve_known_kernel,
)
from undiffuse.diffusion import expected_counts, profile
from undiffuse.errors import ConfigError
from undiffuse.geometry import SampleGeometry
from undiffuse.model import DiffusionModel
from undiffuse.ot import programmes as programmes_module
from undiffuse.ot.programmes import (
    PROGRAMME_ITERATIONS,
    RANK_CANDIDATES,
    START_EM_ITERATIONS,
    UPDATE_CANDIDATES,
    choose_rank,
    deconvolve_programmes,
    low_rank_updates,
    poisson_nmf,
    split_counts,
    successive_projections,
)

SCALE, BLEED, DISTAL = 1.8, 0.3, 0.01


def test_poisson_nmf_recovers_an_exact_low_rank_matrix():
    rng = np.random.default_rng(0)
    values = torch.as_tensor(rng.gamma(2.0, size=(60, 3)) @ rng.gamma(2.0, size=(3, 12)))
    weights, programmes = poisson_nmf(values, 3, n_iter=2000)
    assert weights.shape == (60, 3) and programmes.shape == (3, 12)
    assert (weights >= 0).all() and (programmes >= 0).all()
    assert torch.linalg.norm(weights @ programmes - values) < 1e-2 * torch.linalg.norm(values)


def test_poisson_nmf_by_blocks_of_rows_is_the_same_fit(monkeypatch):
    rng = np.random.default_rng(1)
    values = torch.as_tensor(rng.gamma(2.0, size=(50, 4)) @ rng.gamma(2.0, size=(4, 9)))
    whole = poisson_nmf(values, 3, n_iter=50)
    monkeypatch.setattr(programmes_module, "NMF_BLOCK_ROWS", 7)
    blocks = poisson_nmf(values, 3, n_iter=50)
    for a, b in zip(whole, blocks, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_successive_projections_pick_one_pure_row_of_each_programme_in_noise(monkeypatch):
    rng = np.random.default_rng(3)
    programmes = rng.gamma(0.5, size=(4, 30))
    mixtures = rng.dirichlet(np.ones(4), size=200)
    weights = np.concatenate([np.eye(4)[rng.integers(0, 4, size=40)], mixtures]) * rng.uniform(
        5, 10, (240, 1)
    )
    values = rng.poisson(50 * weights @ programmes) / 50.0
    # Rows of a low total with one gene each: profiles of the largest norm, but left out as counting noise.
    values = torch.as_tensor(np.concatenate([values, 0.02 * np.eye(3, 30)]))
    pure = np.nonzero(weights.max(axis=1) == weights.sum(axis=1))[0]
    picked = successive_projections(values, 4).numpy()
    assert len(set(picked)) == 4 and set(picked) <= set(pure)
    assert sorted(np.argmax(weights[picked], axis=1)) == [0, 1, 2, 3]
    monkeypatch.setattr(programmes_module, "PROJECTION_BLOCK_ROWS", 17)
    np.testing.assert_array_equal(successive_projections(values, 4).numpy(), picked)


@pytest.fixture(scope="module")
def low_counts():
    """Twelve genes of two domain patterns (an exact rank-2 truth) at a few molecules per spot, and the
    maximum a posteriori field of each gene under the true kernel."""
    adata, truth = hex_sample(n_genes=12, depth=4.0, seed=1, bleed=BLEED, scale=SCALE)
    genes = list(adata.var_names)
    config = CorrectionConfig(progress=False)
    start = deconvolve_known_kernel(
        adata, genes=genes, scale=np.full(len(genes), SCALE), bleed=BLEED, distal=DISTAL, config=config
    )
    return adata, truth, start


def known_kernels(adata, batches):
    geometry = _geometry(
        adata, CorrectionConfig(progress=False), image=None, device=torch.device("cpu"), dtype=torch.float32
    )
    kernels = []
    for genes in batches:
        n = genes.stop - genes.start
        model = DiffusionModel(
            geometry,
            profile(torch.full((n,), SCALE), "gaussian"),
            torch.full((n,), BLEED),
            torch.full((n,), DISTAL),
        )
        kernels.append((genes, model.kernel, model.bleed, model.distal))
    return geometry, kernels


def test_low_rank_em_keeps_totals_and_beats_the_per_gene_prior(low_counts):
    adata, truth, start = low_counts
    counts = adata.X.toarray()
    geometry, kernels = known_kernels(adata, [slice(0, 12)])
    tissue = adata.obs["in_tissue"].to_numpy(bool)
    assert (start[~tissue] == 0).all()
    field = deconvolve_programmes(counts, start[tissue], kernels, geometry.tissue, 2)
    assert field.shape == (tissue.sum(), counts.shape[1])
    assert np.isfinite(field).all() and (field >= 0).all()
    np.testing.assert_allclose(field.sum(axis=0), counts.sum(axis=0), rtol=1e-5)
    # A gene with few counts borrows the shape of the others: closer to the truth than each gene alone.
    on_slide = np.zeros_like(start)
    on_slide[tissue] = field
    assert tissue_rmse(on_slide, truth, tissue) < 0.8 * tissue_rmse(start, truth, tissue)


def test_each_low_rank_em_update_raises_the_likelihood_of_the_counts(low_counts):
    adata, _, start = low_counts
    counts = adata.X.toarray()
    geometry, kernels = known_kernels(adata, [slice(0, 12)])
    tissue = adata.obs["in_tissue"].to_numpy(bool)
    observed = torch.as_tensor(counts, dtype=torch.float32)
    _, kernel, bleed, distal = kernels[0]
    likelihoods = []
    for weights, programmes in itertools.islice(
        low_rank_updates(counts, start[tissue], kernels, geometry.tissue, 3), 12
    ):
        mu = expected_counts(weights @ programmes, kernel, bleed, distal).clamp_min(1e-30)
        likelihoods.append(float((observed * torch.log(mu) - mu).sum(dtype=torch.float64)))
    gains = np.diff(likelihoods)
    # An EM: a whole Poisson NMF of the expected sources as the M-step never lowers the likelihood.
    assert (gains > -1e-6 * abs(likelihoods[0])).all()
    assert likelihoods[-1] > likelihoods[1] > likelihoods[0]


def test_the_low_rank_field_may_be_written_over_its_start(low_counts):
    # ``correct`` passes its per-gene fields as both: the EM's expected sources live there meanwhile.
    adata, _, start = low_counts
    counts = adata.X.toarray().astype(np.float32)
    geometry, kernels = known_kernels(adata, [slice(0, 5), slice(5, 12)])
    tissue = adata.obs["in_tissue"].to_numpy(bool)
    fresh = deconvolve_programmes(counts, start[tissue], kernels, geometry.tissue, 3)
    buffer = start[tissue].astype(np.float32)
    written = deconvolve_programmes(counts, buffer, kernels, geometry.tissue, 3, out=buffer)
    assert written is buffer
    np.testing.assert_allclose(written, fresh, rtol=1e-5, atol=1e-6 * fresh.max())


def test_low_rank_em_does_not_depend_on_how_genes_are_batched(low_counts):
    adata, _, start = low_counts
    counts = adata.X.toarray()
    geometry, whole = known_kernels(adata, [slice(0, 12)])
    _, split = known_kernels(adata, [slice(0, 5), slice(5, 12)])
    tissue = adata.obs["in_tissue"].to_numpy(bool)
    together = deconvolve_programmes(counts, start[tissue], whole, geometry.tissue, 3)
    batched = deconvolve_programmes(counts, start[tissue], split, geometry.tissue, 3)
    np.testing.assert_allclose(batched, together, rtol=1e-4, atol=1e-4 * together.max())


def test_count_splitting_halves_are_thinned_counts():
    counts = np.random.default_rng(0).poisson(6.0, size=(4000, 3)).astype(np.float32)
    train = split_counts(counts, np.random.default_rng(1))
    assert train.dtype == np.float32 and (train == np.round(train)).all()
    assert (train >= 0).all() and (train <= counts).all()
    np.testing.assert_allclose(train.sum(axis=0) / counts.sum(axis=0), 0.5, atol=0.02)
    np.testing.assert_array_equal(split_counts(counts, np.random.default_rng(1)), train)


def test_count_splitting_chooses_the_true_rank(low_counts):
    adata, _, _ = low_counts
    counts = adata.X.toarray()
    tissue = adata.obs["in_tissue"].to_numpy(bool)
    train = split_counts(counts, np.random.default_rng(0))
    halved = adata.copy()
    halved.X = train
    config = CorrectionConfig(progress=False)
    genes = list(adata.var_names)
    start = deconvolve_known_kernel(
        halved, genes=genes, scale=np.full(len(genes), SCALE), bleed=BLEED, distal=DISTAL, config=config
    )
    geometry, kernels = known_kernels(adata, [slice(0, 6), slice(6, 12)])
    # The truth holds two domain patterns: one programme cannot hold them, eight fit the counting noise.
    checkpoints = (5, 30, 60)
    rank, updates, deviance, _ = choose_rank(
        counts, train, start[tissue], kernels, geometry.tissue, [1, 2, 8], updates=checkpoints
    )
    assert rank == 2, deviance
    assert deviance[rank, updates] == min(deviance.values()) and all(np.isfinite(list(deviance.values())))
    # Each rank's fit stops once its held-out deviance rises.
    for k in (1, 2, 8):
        scored = [deviance[k, n] for n in checkpoints if (k, n) in deviance]
        assert set(deviance) >= {(k, n) for n in checkpoints[: len(scored)]}
        assert all(later < earlier for earlier, later in zip(scored[:-2], scored[1:-1], strict=True))
        assert len(scored) == len(checkpoints) or scored[-1] > scored[-2]
    assert len(deviance) < 3 * len(checkpoints), "eight programmes fit the noise: their deviance rises"


def test_a_gene_the_programmes_do_not_describe_keeps_its_own_field(low_counts):
    # One gene's truth is a spot of its own, in no domain: two programmes hold the domains but not it.
    adata, _, _ = low_counts
    tissue = adata.obs["in_tissue"].to_numpy(bool)
    geometry, kernels = known_kernels(adata, [slice(0, 12)])
    coords = geometry.coords
    centre = coords[tissue][np.argmin(((coords[tissue] - coords[tissue].mean(axis=0)) ** 2).sum(axis=1))]
    spot = tissue & (((coords - centre) ** 2).sum(axis=1) < 3.0**2)
    own_truth = torch.as_tensor(np.where(spot, 6.0, 0.1) * tissue, dtype=torch.float32)[:, None]
    _, kernel, bleed, distal = known_kernels(adata, [slice(0, 1)])[1][0]
    rng = np.random.default_rng(4)
    counts = adata.X.toarray()
    counts[:, 0] = rng.poisson(expected_counts(own_truth, kernel, bleed, distal)[:, 0].numpy())
    train = split_counts(counts, np.random.default_rng(0))
    halved = adata.copy()
    halved.X = train
    genes = list(adata.var_names)
    start = deconvolve_known_kernel(
        halved,
        genes=genes,
        scale=np.full(len(genes), SCALE),
        bleed=BLEED,
        distal=DISTAL,
        config=CorrectionConfig(progress=False),
    )
    choice = choose_rank(counts, train, start[tissue], kernels, geometry.tissue, [2], updates=(5, 30))
    assert choice.own_field.shape == (12,) and choice.own_field.dtype == bool
    assert choice.own_field[0], choice
    assert choice.own_field[1:].sum() <= 2, (
        "the domain genes' held-out halves are better predicted by the model"
    )


def test_each_choice_is_scored_on_the_fit_of_that_rank_after_that_many_updates(low_counts):
    # The candidates' numbers of updates are checkpoints of one fit per rank: each must score exactly the fit
    # that deconvolve_programmes gives with that many updates.
    adata, _, start = low_counts
    counts = adata.X.toarray()
    tissue = adata.obs["in_tissue"].to_numpy(bool)
    train = split_counts(counts, np.random.default_rng(0))
    geometry, kernels = known_kernels(adata, [slice(0, 5), slice(5, 12)])
    deviance = choose_rank(
        counts, train, start[tissue], kernels, geometry.tissue, [2, 3], updates=(0, 4, 11)
    ).deviance
    held_out = torch.as_tensor(counts - train)
    rows = geometry.tissue_rows
    for (rank, n_iter), value in deviance.items():
        field = torch.zeros(counts.shape)
        field[rows] = torch.as_tensor(
            deconvolve_programmes(train, start[tissue], kernels, geometry.tissue, rank, n_iter=n_iter)
        )
        expected = torch.cat(
            [expected_counts(field[:, genes], kernel, b, d) for genes, kernel, b, d in kernels], dim=1
        )
        mu, x = expected.double(), held_out.double()
        direct = 2.0 * float((mu - x + torch.xlogy(x, x) - torch.xlogy(x, mu)).sum())
        assert value == pytest.approx(direct, rel=1e-4), (rank, n_iter)
    assert len(set(deviance.values())) == len(deviance)


def test_correct_with_programmes_records_the_rank_it_used(low_counts):
    adata, _, _ = low_counts
    out = correct(adata, programmes=2, epochs=3, em_iterations=10, progress=False, copy=True)
    assert out.uns[KEY]["correction"]["config"]["programmes"] == 2
    assert out.uns[KEY]["correction"]["config"]["programme_updates"] == PROGRAMME_ITERATIONS
    corrected = out.layers["corrected"].toarray()
    assert np.isfinite(corrected).all()
    np.testing.assert_allclose(corrected.sum(axis=0), adata.X.toarray().sum(axis=0), rtol=1e-4)
    # At most one programme per gene.
    few = correct(adata[:, :3].copy(), programmes=8, epochs=2, em_iterations=5, progress=False, copy=True)
    assert few.uns[KEY]["correction"]["config"]["programmes"] == 3
    assert few.uns[KEY]["correction"]["config"]["programmes_held_out_deviance"] == "none"


def test_held_out_programmes_choose_the_rank_by_count_splitting(low_counts):
    adata, _, _ = low_counts
    options = dict(
        programmes="held_out", epochs=3, em_iterations=10, batch_genes=5, progress=False, copy=True
    )
    out = correct(adata, **options)
    config = out.uns[KEY]["correction"]["config"]
    scores = {
        tuple(map(int, pair.split("x"))): float(value)
        for pair, value in (item.split(": ") for item in config["programmes_held_out_deviance"].split(", "))
    }
    ranks = [k for k in RANK_CANDIDATES if k <= 12]
    assert sorted({k for k, _ in scores}) == ranks
    for k in ranks:
        scored = [n for kk, n in scores if kk == k]
        assert scored == list(UPDATE_CANDIDATES[: len(scored)])
    assert (config["programmes"], config["programme_updates"]) == min(scores, key=scores.get)
    corrected = out.layers["corrected"].toarray()
    np.testing.assert_allclose(corrected.sum(axis=0), adata.X.toarray().sum(axis=0), rtol=1e-4)
    # The same seed splits the counts alike.
    np.testing.assert_array_equal(correct(adata, **options).layers["corrected"].toarray(), corrected)


def test_the_rank_is_chosen_on_a_window_of_the_slide_with_all_the_genes(low_counts, monkeypatch):
    # Each spot's programme weights are fitted to all its genes, so the rank is chosen with them all; a window
    # of the slide bounds the cost on Visium HD.
    adata, _, _ = low_counts
    seen = {}

    def spy(counts, train, start, kernels, tissue, candidates, **options):
        seen.update(spots=counts.shape[0], genes=train.shape[1], columns=[k[0] for k in kernels])
        seen.update(tissue=int(tissue.sum()), start_rows=start.shape[0])
        return choose_rank(counts, train, start, kernels, tissue, candidates, **options)

    correct_module = importlib.import_module("undiffuse.correct")
    monkeypatch.setattr(correct_module, "choose_rank", spy)
    monkeypatch.setattr(correct_module, "RANK_SELECTION_SPOTS", adata.n_obs // 2)
    correct(adata, programmes="held_out", epochs=2, em_iterations=5, batch_genes=5, progress=False, copy=True)
    assert seen["genes"] == adata.n_vars
    covered = np.concatenate([np.arange(adata.n_vars)[part] for part in seen["columns"]])
    np.testing.assert_array_equal(covered, np.arange(adata.n_vars))
    assert 0 < seen["spots"] < adata.n_obs
    assert seen["start_rows"] == seen["tissue"] > 0


def test_the_rank_is_chosen_on_a_window_that_holds_the_slides_kinds_of_tissue():
    # Tissue of one kind but for a strip of another along its left edge: a window of one kind scores nothing.
    adata, _ = hex_sample(n_rows=48, n_cols=48, n_genes=2)
    geometry = SampleGeometry.build(adata)
    tissue = geometry.tissue.numpy()
    left = tissue & (geometry.coords[:, 0] < np.quantile(geometry.coords[tissue, 0], 0.2))
    counts = np.stack([np.where(left, 10.0, 0.0), np.where(tissue & ~left, 10.0, 0.0)], axis=1)
    n_spots = adata.n_obs // 8
    window = geometry.varied_window(n_spots, counts.astype(np.float32))
    assert 0.5 * n_spots < window.sum() < 2 * n_spots
    assert (window & left).sum() > 0.2 * window.sum() and (window & tissue & ~left).sum() > 0.2 * window.sum()
    assert geometry.varied_window(adata.n_obs, counts).all()


def test_correct_keeps_the_own_field_of_a_gene_the_programmes_do_not_describe(low_counts, monkeypatch):
    adata, _, _ = low_counts
    correct_module = importlib.import_module("undiffuse.correct")

    def gene0_apart(*args, **options):
        choice = choose_rank(*args, **options)
        return choice._replace(own_field=np.arange(len(choice.own_field)) == 0)

    monkeypatch.setattr(correct_module, "choose_rank", gene0_apart)
    options = dict(epochs=3, batch_genes=5, progress=False, copy=True)
    out = correct(adata, programmes="held_out", em_iterations=10, **options)
    assert out.uns[KEY]["correction"]["config"]["programmes_own_field_genes"] == "gene0"
    # The per-gene field that started the low-rank model, not the model's.
    own = correct(adata, programmes=0, em_iterations=START_EM_ITERATIONS, **options)
    corrected, alone = out.layers["corrected"].toarray(), own.layers["corrected"].toarray()
    np.testing.assert_allclose(corrected[:, 0], alone[:, 0], rtol=1e-5, atol=1e-6 * alone[:, 0].max())
    assert not np.allclose(corrected[:, 1:], alone[:, 1:], rtol=1e-2)


def test_auto_programmes_are_chosen_from_the_data_on_visium_hd_calls_with_enough_genes(low_counts):
    visium = low_counts[0]
    hd = visium.copy()
    hd.uns[KEY] = {**visium.uns.get(KEY, {}), "platform": "visium_hd"}
    auto = CorrectionConfig(progress=False)
    assert auto.programmes == "auto"
    chosen_among = [k for k in RANK_CANDIDATES if k <= PROGRAMMES_MIN_GENES]
    assert len(chosen_among) > 1
    assert _programmes(auto, hd, PROGRAMMES_MIN_GENES) == chosen_among
    assert _programmes(auto, hd, 100) == list(RANK_CANDIDATES)
    assert _programmes(auto, hd, PROGRAMMES_MIN_GENES - 1) == []
    assert _programmes(auto, visium, 100) == []
    # ``held_out`` chooses, on either platform, among the candidates that do not exceed the genes.
    held_out = CorrectionConfig(programmes="held_out", progress=False)
    assert _programmes(held_out, visium, 100) == list(RANK_CANDIDATES)
    assert _programmes(held_out, hd, PROGRAMMES_MIN_GENES) == chosen_among
    assert _programmes(held_out, hd, PROGRAMMES_MIN_GENES - 1) == []
    # A number is used on either platform, at most one programme per gene.
    assert _programmes(CorrectionConfig(programmes=5, progress=False), visium, 100) == [5]
    assert _programmes(CorrectionConfig(programmes=5, progress=False), hd, 3) == [3]
    assert _programmes(CorrectionConfig(programmes=0, progress=False), hd, 100) == []


@pytest.mark.parametrize("value", [-1, 1.5, True, "all"])
def test_programmes_must_be_a_whole_number(value):
    with pytest.raises(ConfigError, match="programmes"):
        CorrectionConfig(programmes=value)
