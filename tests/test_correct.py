"""The correction engine: gradients, conservation, robustness, chunk invariance, the seed baseline, direction of
accuracy."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from conftest import hex_sample, mean_pearson, tissue_rmse

from undiffuse.correct import CorrectionConfig, _geometry, correct, rediffuse
from undiffuse.errors import ConfigError, InputError
from undiffuse.merge import PARAMETER_COLUMNS
from undiffuse.ot.baseline import balanced_ot_baseline
from undiffuse.trainer import KernelTrainer

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


@pytest.mark.slow
def test_image_loss_gradient_reaches_q(toy):
    adata, _ = toy
    batch = trainer(adata, CorrectionConfig(**FAST))
    assert batch.geometry.raster is not None
    model, soft = batch.model(), batch.soft()
    field = model.deconvolve(batch.counts, batch.start(soft), n_iter=3, n_grad_iterations=1)
    batch.losses(field, soft, model)["image"].sum().backward()
    assert torch.isfinite(batch.q_logit.grad).all() and batch.q_logit.grad.abs().sum() > 0


@pytest.mark.slow
def test_deconvolve_improves_on_raw_and_keeps_totals(toy):
    adata, truth = toy
    result = correct(adata, epochs=30, progress=False)
    counts = adata.X.toarray()
    tissue = adata.obs["in_tissue"].to_numpy()
    assert tissue_rmse(result.corrected, truth, tissue) < 0.8 * tissue_rmse(counts, truth, tissue)
    assert mean_pearson(result.corrected, truth, tissue) >= mean_pearson(counts, truth, tissue) - 0.01
    np.testing.assert_allclose(result.corrected.sum(0), counts.sum(0), rtol=1e-4)
    assert result.corrected[~tissue].sum() == 0
    assert np.isfinite(result.corrected).all()
    assert set(result.loss_history.columns) == {
        "epoch",
        "total",
        "image",
        "out_of_tissue",
        "moran",
        "poisson",
    }
    assert len(result.loss_history) == 30
    assert result.loss_history["poisson"].iloc[-1] < result.loss_history["poisson"].iloc[0]


@pytest.mark.slow
def test_result_does_not_depend_on_batching(toy):
    adata, _ = toy
    together = correct(adata, **FAST, batch_genes=6)
    split = correct(adata, **FAST, batch_genes=4)
    np.testing.assert_allclose(together.corrected, split.corrected, rtol=1e-4, atol=1e-3)
    alone = correct(adata, genes=["gene3"], **FAST)
    np.testing.assert_allclose(alone.corrected[:, 0], together.corrected[:, 3], rtol=1e-4, atol=1e-3)


@pytest.mark.slow
def test_training_on_a_window_deconvolves_the_whole_slide(toy):
    """A kernel learned on a window around the tissue boundary corrects every spot, keeps totals and
    confinement, and improves on the raw counts."""
    adata, truth = toy
    result = correct(adata, **FAST, train_spots=150)
    assert result.config["trained_on_spots"] < adata.n_obs
    counts = adata.X.toarray()
    tissue = adata.obs["in_tissue"].to_numpy()
    np.testing.assert_allclose(result.corrected.sum(0), counts.sum(0), rtol=1e-4)
    assert result.corrected[~tissue].sum() == 0
    assert tissue_rmse(result.corrected, truth, tissue) < tissue_rmse(counts, truth, tissue)


@pytest.mark.slow
def test_same_seed_same_result(toy):
    adata, _ = toy
    first = correct(adata, **FAST)
    second = correct(adata, **FAST)
    np.testing.assert_array_equal(first.corrected, second.corrected)


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
    result = correct(adata, **FAST, r_init=1e-6)
    assert np.isfinite(result.corrected).all()
    assert np.isfinite(result.params.to_numpy(dtype=float)).all()
    assert result.corrected[:, 0].sum() == 0
    np.testing.assert_allclose(result.corrected[:, 1].sum(), counts[:, 1].sum(), rtol=1e-3)


@pytest.mark.slow
def test_to_anndata_and_rediffuse(toy):
    adata, _ = toy
    result = correct(adata, **FAST)
    out = result.to_anndata(adata)
    assert out.shape == (adata.n_obs, adata.n_vars)
    np.testing.assert_array_equal(out.layers["counts"], adata.X.toarray())
    np.testing.assert_array_equal(out.layers["corrected"], result.corrected)
    assert set(PARAMETER_COLUMNS) <= set(out.var.columns)
    again = rediffuse(out)
    assert again.shape == out.shape
    np.testing.assert_allclose(again.sum(0), out.X.sum(0), rtol=1e-5)
    # Re-applying the learned diffusion explains the observations better than the corrected field does.
    observed = adata.X.toarray()
    assert np.abs(again - observed).sum() < np.abs(out.X - observed).sum()


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
    """`undiffuse correct` accepts a Space Ranger folder and writes counts and corrected layers."""
    import anndata as ad

    from undiffuse.cli import main

    out = tmp_path / "corrected.h5ad"
    status = main(["correct", str(tiny_sample / "outs"), str(out), "--epochs", "2", "--quiet"])
    assert status == 0
    corrected = ad.read_h5ad(out)
    assert {"counts", "corrected"} <= set(corrected.layers)
    values, counts = np.asarray(corrected.layers["corrected"]), np.asarray(corrected.layers["counts"])
    assert np.isfinite(values).all()
    # Every gene keeps its total, and molecules move from background spots back into the tissue.
    np.testing.assert_allclose(values.sum(axis=0), counts.sum(axis=0), rtol=1e-3)
    background = ~corrected.obs["in_tissue"].to_numpy()
    assert values[background].sum() < 0.5 * counts[background].sum()
    assert main(["correct", str(tmp_path / "missing"), str(tmp_path / "x.h5ad")]) == 2
    assert not (tmp_path / "x.h5ad").exists()
