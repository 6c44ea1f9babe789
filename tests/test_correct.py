"""The correction engine: gradients, conservation, robustness, chunk invariance, the seed baseline, direction of
accuracy."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from conftest import hex_sample, mean_pearson, tissue_rmse

from undiffuse import __version__
from undiffuse.correct import (
    PARAMETER_COLUMNS,
    CorrectionConfig,
    _geometry,
    correct,
    parameter_table,
    rediffuse,
)
from undiffuse.errors import ConfigError, InputError
from undiffuse.model import START_FLOOR, SoftStart
from undiffuse.ot.baseline import balanced_ot_baseline
from undiffuse.ot.cost import N_RADIAL_BASIS
from undiffuse.trainer import DISTAL_FALLBACK, KernelTrainer

FAST = dict(epochs=8, em_iterations=30, progress=False)


def trainer(adata, config):
    geometry = _geometry(adata, config, image=None, device=torch.device("cpu"), dtype=torch.float32)
    counts = torch.as_tensor(adata.X.toarray())
    return KernelTrainer(geometry, counts, np.full(counts.shape[1], 0.4), config)


@pytest.fixture(scope="module")
def toy():
    return hex_sample()


@pytest.mark.slow
def test_gradients_reach_q_r_and_phi(toy):
    adata, _ = toy
    batch = trainer(adata, CorrectionConfig(**FAST))
    model, soft = batch.model(), batch.soft()
    field = model.deconvolve(batch.counts, batch.start(soft), n_iter=4, n_grad_iterations=2)
    terms = batch.losses(field, soft, model)
    sum(batch.weights[k] * v for k, v in terms.items()).sum().backward()
    for name in ("q_logit", "log_r", "phi", "share_logits"):
        grad = getattr(batch, name).grad
        assert torch.isfinite(grad).all(), name
        assert grad.abs().sum() > 0, f"dL/d{name} is zero"


@pytest.mark.parametrize("tissue_cost", [False, True])
def test_tissue_cost_is_learned_only_when_asked(toy, tissue_cost):
    """The boundary-crossing coefficient of f_phi gets a gradient from the start when ``tissue_cost`` is on,
    although the kernels towards tissue and background are still equal, and none when it is off."""
    adata, _ = toy
    batch = trainer(adata, CorrectionConfig(**FAST, tissue_cost=tissue_cost))
    model, soft = batch.model(), batch.soft()
    assert model.kernel.n_planes == (2 if tissue_cost else 1)
    field = model.deconvolve(batch.counts, batch.start(soft), n_iter=2, n_grad_iterations=1)
    terms = batch.losses(field, soft, model)
    sum(batch.weights[k] * v for k, v in terms.items()).sum().backward()
    crossing = batch.phi.grad[:, -1]
    assert bool((crossing.abs() > 0).any()) is tissue_cost


def test_the_em_start_leaves_every_tissue_spot_room_to_regrow(toy):
    """A threshold above most of a low-count gene's counts empties most of its tissue spots, and EM updates are
    multiplicative: the start keeps :data:`START_FLOOR` of each total spread over the tissue, so that the
    maximum a posteriori EM brings every spot of a uniform field back above a tenth of its truth (from the bare
    threshold, 4% of the spots stay below)."""
    adata, _ = toy
    batch = trainer(adata, CorrectionConfig(**FAST))
    model, tissue = batch.model(), batch.geometry.tissue
    n_genes = batch.counts.shape[1]
    truth = tissue[:, None].to(torch.float32).expand(-1, n_genes) * 2.0
    counts = torch.poisson(model.forward(truth), generator=torch.Generator().manual_seed(0))
    soft_start = SoftStart(counts, tissue, batch.config.beta)
    start = soft_start.start(soft_start.soft(torch.full((n_genes,), 0.9)))

    assert (start[~tissue] == 0).all()
    torch.testing.assert_close(start.sum(dim=0), counts.sum(dim=0))
    assert (start[tissue] >= 0.999 * START_FLOOR * counts.sum(dim=0) / tissue.sum()).all()
    field = model.deconvolve(
        counts, start, n_iter=60, prior=model.smoothness_prior(counts, "auto"), accelerate=True
    )
    assert (field[tissue] > 0.1 * truth[tissue]).all()


@pytest.mark.parametrize("poisson_spots", ["background", "all"])
def test_the_poisson_term_measures_the_spots_asked(toy, poisson_spots):
    """With ``poisson_spots: background`` the Poisson term is the deviance of the background spots alone (over
    all spots' number), where the field is zero and the counts are the kernel's; with ``all`` every spot's."""
    from undiffuse.losses import poisson_loss

    adata, _ = toy
    batch = trainer(adata, CorrectionConfig(**FAST, poisson_spots=poisson_spots))
    model, soft = batch.model(), batch.soft()
    field = model.deconvolve(batch.counts, batch.start(soft), n_iter=2)
    expected = model.forward(field)
    background = ~batch.geometry.tissue
    per_spot = expected - batch.counts + torch.xlogy(batch.counts, batch.counts / expected)
    kept = background[:, None] if poisson_spots == "background" else torch.ones_like(background)[:, None]
    torch.testing.assert_close(
        batch.losses(field, soft, model)["poisson"], (per_spot * kept).sum(0) / adata.n_obs
    )
    assert poisson_loss(batch.counts, expected, torch.zeros_like(background)).abs().max() == 0


def test_a_sample_without_background_measures_the_poisson_term_on_every_spot(toy):
    adata, _ = toy
    tissue_only = adata[adata.obs["in_tissue"].to_numpy(bool)].copy()
    batch = trainer(tissue_only, CorrectionConfig(**FAST))
    assert batch.poisson_spots is None


def test_poisson_spots_must_be_background_or_all():
    with pytest.raises(ValueError, match="poisson_spots must be 'background' or 'all'"):
        CorrectionConfig(poisson_spots="tissue")


def test_distal_share_starts_from_the_background_floor(toy):
    """The uniform share starts from each gene's background floor: the floor of the QC's decay fitted to all
    background spots when the QC fitted one, else the mean beyond the diffusion range, else a fixed share."""
    adata, _ = hex_sample(30, 30, n_genes=4, depth=400.0, scale=1.0, distal=0.1)
    adata.uns["undiffuse"]["diffusion_scale"] = 1.0  # a diffusion range of 3 pitches
    far = trainer(adata, CorrectionConfig(progress=False))
    assert int((far.geometry.background_distance > far.geometry.reach).sum()) >= 100
    assert torch.allclose(far.shares[:, 2], torch.tensor(0.1), rtol=0.1)
    adata.uns["undiffuse"]["qc"] = {
        "decay_fitted": True,
        "decay_kernel": "gaussian",
        "decay_kernel_scale": 1.0,
    }
    fitted = trainer(adata, CorrectionConfig(progress=False))
    assert torch.allclose(fitted.shares[:, 2], torch.tensor(0.1), rtol=0.1)
    assert not torch.equal(fitted.shares, far.shares)
    fixed = trainer(adata, CorrectionConfig(distal_init=0.05, progress=False)).shares[:, 2]
    assert torch.allclose(fixed, torch.tensor(0.05))
    # The toy's background lies within the default range of 8 pitches and it has no QC: nothing to measure on.
    fallback = trainer(toy[0], CorrectionConfig(progress=False))
    assert fallback.geometry.decay_kernel is None
    assert not (fallback.geometry.background_distance > fallback.geometry.reach).any()
    assert torch.allclose(fallback.shares[:, 2], torch.tensor(DISTAL_FALLBACK))


@pytest.mark.parametrize("kind", ["gaussian", "heavy_tailed"])
def test_kernel_starts_from_the_profile_the_qc_measured(toy, kind):
    """With a fitted background decay, every gene's kernel starts as the decay's family at its scale (f_phi's
    coefficients fitted to its shape), with r from the Gaussian-equivalent scale; without one, or with a
    configured r, as the seed's Gaussian heat kernel (coefficients 0)."""
    from undiffuse.diffusion import profile
    from undiffuse.model import DiffusionModel

    adata = toy[0].copy()
    adata.uns["undiffuse"]["diffusion_scale"] = 2.0
    adata.uns["undiffuse"]["qc"] = {"decay_fitted": True, "decay_kernel": kind, "decay_kernel_scale": 1.5}
    batch = trainer(adata, CorrectionConfig(progress=False))
    assert batch.geometry.decay_kernel == (kind, 1.5)
    torch.testing.assert_close(batch.reg, torch.full_like(batch.reg, 8.0))
    assert torch.equal(batch.phi, batch.phi[:1].expand_as(batch.phi)) and bool((batch.phi[:, -1] == 0).all())
    measured = DiffusionModel(batch.geometry, profile(torch.tensor([1.5]), kind), *torch.zeros(2, 1))
    torch.testing.assert_close(
        batch.model().diffusion_length(), measured.diffusion_length().expand(adata.n_vars), rtol=0.02, atol=0
    )
    # A Gaussian decay at the Gaussian-equivalent scale is the seed's kernel itself: W = 1.
    adata.uns["undiffuse"]["qc"]["decay_kernel_scale"] = 2.0
    if kind == "gaussian":
        assert trainer(adata, CorrectionConfig(progress=False)).phi.abs().max() < 0.02
    for unfitted in ({**adata.uns["undiffuse"]["qc"], "decay_fitted": False}, {}):
        adata.uns["undiffuse"]["qc"] = unfitted
        assert not trainer(adata, CorrectionConfig(progress=False)).phi.any()
    adata.uns["undiffuse"]["qc"] = {"decay_fitted": True, "decay_kernel": kind, "decay_kernel_scale": 1.5}
    fixed = trainer(adata, CorrectionConfig(r_init=3.0, progress=False))
    assert not fixed.phi.any()
    torch.testing.assert_close(fixed.reg, torch.full_like(fixed.reg, 3.0))


def test_kernel_prior_holds_each_gene_near_the_starting_kernel(toy):
    """The kernel prior is zero at the start, grows as (log r, phi) leave it, per spot as the Poisson term, and
    is switched off by its weight."""
    from undiffuse.trainer import KERNEL_PRIOR_SD

    adata, _ = toy
    batch = trainer(adata, CorrectionConfig(**FAST))
    model, soft = batch.model(), batch.soft()
    field = model.deconvolve(batch.counts, batch.start(soft), n_iter=2)
    assert torch.equal(batch.losses(field, soft, model)["kernel_prior"], torch.zeros(adata.n_vars))
    with torch.no_grad():
        batch.log_r[0] += 1.0  # r grows e-fold, nearly: r = R_MIN + exp(log_r)
        batch.phi[1, 0] -= 0.3
    prior = batch.losses(field, soft, model)["kernel_prior"]
    shift = torch.log(batch.reg[0]) - batch.kernel_centre[0, 0]
    expected = torch.tensor([shift**2, 0.3**2]) / (2 * KERNEL_PRIOR_SD**2 * adata.n_obs)
    torch.testing.assert_close(prior[:2], expected.to(prior.dtype))
    assert not prior[2:].any()
    off = trainer(adata, CorrectionConfig(**FAST, weights={"kernel_prior": 0.0}))
    assert not off.losses(field, soft, off.model())["kernel_prior"].any()


@pytest.mark.slow
def test_learned_local_share_tracks_the_truth():
    adata, _ = hex_sample(30, 30, n_genes=4, depth=400.0, scale=1.5, distal=0.1)
    adata.uns["undiffuse"]["diffusion_scale"] = 1.5
    out = correct(adata, copy=True, progress=False)
    params = parameter_table(out)
    assert np.allclose(params["bleed"], 0.3, rtol=0.2), params["bleed"]
    assert np.allclose(params["distal"], 0.1, rtol=0.2), params["distal"]
    assert np.allclose(params["diffusion_length"], 1.5, rtol=0.1), params["diffusion_length"]


@pytest.mark.slow
def test_image_loss_gradient_reaches_q(toy):
    adata, _ = toy
    batch = trainer(adata, CorrectionConfig(**FAST))
    assert batch.geometry.raster is not None
    model, soft = batch.model(), batch.soft()
    field = model.deconvolve(batch.counts, batch.start(soft), n_iter=3, n_grad_iterations=1)
    batch.losses(field, soft, model)["image"].sum().backward()
    assert torch.isfinite(batch.q_logit.grad).all() and batch.q_logit.grad.abs().sum() > 0


def corrected_values(adata, genes=None, layer="corrected"):
    """Dense ``(N, g)`` values of a layer that correct() wrote."""
    view = adata if genes is None else adata[:, list(genes)]
    values = view.layers[layer]
    return values.toarray() if sp.issparse(values) else np.asarray(values)


@pytest.mark.slow
def test_deconvolve_improves_on_raw_and_keeps_totals(toy):
    adata, truth = toy
    out = correct(adata, epochs=30, progress=False, copy=True)
    corrected = corrected_values(out)
    counts = adata.X.toarray()
    tissue = adata.obs["in_tissue"].to_numpy()
    assert tissue_rmse(corrected, truth, tissue) < 0.8 * tissue_rmse(counts, truth, tissue)
    assert mean_pearson(corrected, truth, tissue) >= mean_pearson(counts, truth, tissue) - 0.01
    np.testing.assert_allclose(corrected.sum(0), counts.sum(0), rtol=1e-4)
    assert corrected[~tissue].sum() == 0
    assert np.isfinite(corrected).all()
    history = out.uns["undiffuse"]["correction"]["loss_history"]
    assert set(history.columns) == {
        "epoch",
        "total",
        "image",
        "out_of_tissue",
        "moran",
        "poisson",
        "kernel_prior",
    }
    assert len(history) == 30
    assert history["poisson"].iloc[-1] < history["poisson"].iloc[0]


@pytest.mark.slow
def test_writes_into_adata_in_scanpy_conventions(toy):
    """layers[key_added] holds every gene (the uncorrected ones raw), var/varm/uns the parameters and the
    provenance; copy=True leaves the input as it was; layer= reads the counts from a layer."""
    adata, _ = toy
    given = adata.copy()
    genes = list(adata.var_names[:2])
    out = correct(given, genes=genes, key_added="fixed", copy=True, **FAST)
    assert "fixed" not in given.layers and "undiffuse_corrected" not in given.var
    assert out.shape == adata.shape
    fixed = corrected_values(out, layer="fixed")
    counts = adata.X.toarray()
    np.testing.assert_array_equal(fixed[:, 2:], counts[:, 2:])
    assert not np.allclose(fixed[:, :2], counts[:, :2])
    np.testing.assert_array_equal(out.X.toarray(), counts)  # X keeps the raw counts
    assert out.var["undiffuse_corrected"].tolist() == [True, True] + [False] * (adata.n_vars - 2)
    assert (out.var.loc[genes, "undiffuse_r"] > 0).all()
    assert (out.var.iloc[2:][[f"undiffuse_{name}" for name in PARAMETER_COLUMNS]] == 0).all().all()
    assert out.varm["undiffuse_phi"].shape == (adata.n_vars, N_RADIAL_BASIS + 1)
    provenance = out.uns["undiffuse"]["correction"]
    assert provenance["layer"] == "fixed" and provenance["counts"] == "X"
    assert provenance["version"] == __version__
    assert provenance["config"]["operator"] in ("lattice", "pairs")
    assert {"distance", "weight", "q25", "q75"} <= set(provenance["kernel_profile"].columns)
    table = parameter_table(out, genes)
    assert list(table.columns[: len(PARAMETER_COLUMNS)]) == list(PARAMETER_COLUMNS)
    assert table["corrected"].all()

    layered = adata.copy()
    layered.layers["raw"] = layered.X.copy()
    layered.X = sp.csr_matrix(layered.X.shape, dtype=np.float32)
    assert correct(layered, layer="raw", genes=genes, **FAST) is None
    np.testing.assert_array_equal(corrected_values(layered), fixed)
    assert layered.uns["undiffuse"]["correction"]["counts"] == "raw"


@pytest.mark.slow
def test_result_does_not_depend_on_batching(toy):
    """What each gene learns is the same whether it is trained with 5 other genes, 3 or none, to float32 round-off.
    The fields agree to 1%: the accelerated EM chooses per gene between its extrapolated and its plain step by
    comparing likelihoods, a choice that round-off can turn (with plain EM steps they agree to 1e-6 relative), and 30
    updates from the start do not converge."""
    adata, _ = toy
    together_out = correct(adata, **FAST, batch_genes=6, copy=True)
    split_out = correct(adata, **FAST, batch_genes=4, copy=True)
    learned = parameter_table(together_out).select_dtypes("number")
    np.testing.assert_allclose(learned, parameter_table(split_out)[learned.columns], rtol=1e-5, atol=1e-6)
    together, split = corrected_values(together_out), corrected_values(split_out)
    np.testing.assert_allclose(together, split, rtol=1e-2, atol=1e-3)
    alone_out = correct(adata, genes=["gene3"], **FAST, copy=True)
    np.testing.assert_allclose(
        parameter_table(alone_out, ["gene3"])[learned.columns], learned.loc[["gene3"]], rtol=1e-5, atol=1e-6
    )
    alone = corrected_values(alone_out, ["gene3"])
    np.testing.assert_allclose(alone[:, 0], together[:, 3], rtol=1e-2, atol=1e-3)


@pytest.mark.slow
def test_training_on_a_window_deconvolves_the_whole_slide(toy):
    """A kernel learned on a window around the tissue boundary corrects every spot, keeps totals and
    confinement, and improves on the raw counts."""
    adata, truth = toy
    out = correct(adata, **FAST, train_spots=150, copy=True)
    assert out.uns["undiffuse"]["correction"]["config"]["trained_on_spots"] < adata.n_obs
    corrected = corrected_values(out)
    counts = adata.X.toarray()
    tissue = adata.obs["in_tissue"].to_numpy()
    np.testing.assert_allclose(corrected.sum(0), counts.sum(0), rtol=1e-4)
    assert corrected[~tissue].sum() == 0
    assert tissue_rmse(corrected, truth, tissue) < tissue_rmse(counts, truth, tissue)


@pytest.mark.slow
def test_same_seed_same_result(toy):
    adata, _ = toy
    first = corrected_values(correct(adata, **FAST, copy=True))
    second = corrected_values(correct(adata, **FAST, copy=True))
    np.testing.assert_array_equal(first, second)


@pytest.mark.slow
def test_seed_balanced_ot_returns_the_normalised_soft_threshold(toy):
    """Balanced OT fixes the target marginal: the seed's output is b_g rescaled to the gene's total, whether POT
    solves the dense problem or the pair solver the sparse one."""
    adata, _ = toy
    genes = list(adata.var_names[:3])
    dense = balanced_ot_baseline(adata, genes=genes, q=0.4, reg=1.0)
    sparse = balanced_ot_baseline(adata, genes=genes, q=0.4, reg=1.0, max_dense_spots=0)
    counts = torch.as_tensor(adata[:, genes].X.toarray(), dtype=torch.float64)
    soft = trainer(adata[:, genes].copy(), CorrectionConfig(**FAST)).soft_start
    expected = soft.soft(torch.full((3,), 0.4, dtype=torch.float32)).double()
    expected = (expected / expected.sum(0) * counts.sum(0)).numpy()
    for result in (dense, sparse):
        np.testing.assert_allclose(result, expected, rtol=1e-3, atol=1e-3 * expected.max())


@pytest.mark.slow
def test_robust_to_zero_genes_huge_counts_and_tiny_r():
    adata, _ = hex_sample(n_genes=3)
    counts = adata.X.toarray()
    counts[:, 0] = 0
    counts[:, 1] *= 1e5
    adata.X = sp.csr_matrix(counts)
    correct(adata, **FAST, r_init=1e-6)
    corrected = corrected_values(adata)
    assert np.isfinite(corrected).all()
    assert np.isfinite(parameter_table(adata).drop(columns="corrected").to_numpy(dtype=float)).all()
    assert corrected[:, 0].sum() == 0
    np.testing.assert_allclose(corrected[:, 1].sum(), counts[:, 1].sum(), rtol=1e-3)


@pytest.mark.slow
def test_rediffuse_explains_the_observation(toy):
    adata, _ = toy
    out = correct(adata, **FAST, copy=True)
    again = rediffuse(out)
    corrected = corrected_values(out)
    assert again.shape == out.shape
    np.testing.assert_allclose(again.sum(0), corrected.sum(0), rtol=1e-5)
    # Re-applying the learned diffusion explains the observations better than the corrected field does.
    observed = adata.X.toarray()
    assert np.abs(again - observed).sum() < np.abs(corrected - observed).sum()
    # Genes are re-diffused batch_genes at a time; each on its own gives the same.
    out.uns["undiffuse"]["correction"]["config"]["batch_genes"] = 1
    np.testing.assert_allclose(rediffuse(out), again, rtol=1e-5, atol=1e-6 * again.max())


def test_bad_options_and_inputs(toy):
    adata, _ = toy
    with pytest.raises(ConfigError, match="operator"):
        CorrectionConfig(operator="sideways")
    with pytest.raises(ConfigError, match="unknown correction options"):
        CorrectionConfig.from_dict({"mode": "balanced"})
    with pytest.raises(ConfigError, match="prior_strength"):
        CorrectionConfig(prior_strength=-1.0)
    with pytest.raises(ConfigError, match="prior_strength"):
        CorrectionConfig(prior_strength="strong")
    with pytest.raises(ConfigError, match="distal_init"):
        CorrectionConfig(distal_init="far")
    with pytest.raises(ConfigError, match="unknown correction options"):
        CorrectionConfig.from_dict({"epoch": 3})
    with pytest.raises(InputError, match="not in the matrix"):
        correct(adata, genes=["nope"], **FAST)


def test_cuda_device_runs_where_there_is_one_and_is_refused_elsewhere(toy):
    adata, _ = toy
    if torch.cuda.is_available():
        assert np.isfinite(correct(adata, device="cuda", **FAST).corrected).all()
    else:
        with pytest.raises(ConfigError, match="cuda"):
            correct(adata, device="cuda", **FAST)


@pytest.mark.slow
def test_cli_prepares_raw_input_then_corrects(tiny_sample, tmp_path):
    """`undiffuse correct` accepts a Space Ranger folder and writes the prepared sample with its correction."""
    import anndata as ad

    from undiffuse.cli import main

    out = tmp_path / "corrected.h5ad"
    status = main(["correct", str(tiny_sample / "outs"), str(out), "--epochs", "2", "--quiet"])
    assert status == 0
    corrected = ad.read_h5ad(out)
    selected = corrected.var["selected"].to_numpy(bool)
    assert corrected.var["undiffuse_corrected"].to_numpy(bool).tolist() == selected.tolist()
    values = corrected_values(corrected)
    raw = corrected.X.toarray()
    assert np.isfinite(values).all()
    np.testing.assert_array_equal(values[:, ~selected], raw[:, ~selected])
    assert not np.allclose(values[:, selected], raw[:, selected])
    assert main(["correct", str(tmp_path / "missing"), str(tmp_path / "x.h5ad")]) == 2
    assert not (tmp_path / "x.h5ad").exists()
