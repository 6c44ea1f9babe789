"""The batched solvers against POT on small dense problems, and the differentiable quantile."""

from __future__ import annotations

import numpy as np
import ot
import pytest
import torch

from undiffuse.diffusion import expected_counts
from undiffuse.operators import PairKernel
from undiffuse.ot.deconvolution import deconvolve_em, em_step
from undiffuse.ot.quantile import dequantised_order_statistics, quantile, soft_threshold
from undiffuse.ot.sinkhorn import sinkhorn_log
from undiffuse.sparse_ops import column_sums, row_sums

N_SPOTS, N_GENES = 14, 3
REGS = [0.3, 1.0, 2.5]


@pytest.fixture
def dense_problem():
    """All pairs of a small random point cloud, with three histograms per side."""
    rng = np.random.default_rng(0)
    coords = rng.random((N_SPOTS, 2)) * 4
    cost = ((coords[:, None] - coords[None]) ** 2).sum(-1)
    source, target = np.meshgrid(np.arange(N_SPOTS), np.arange(N_SPOTS), indexing="ij")
    pairs = (torch.as_tensor(source.ravel()), torch.as_tensor(target.ravel()))
    a = rng.random((N_SPOTS, N_GENES))
    b = rng.random((N_SPOTS, N_GENES))
    return cost, pairs, a / a.sum(0), b / b.sum(0)


def test_balanced_matches_pot_sinkhorn_stabilized(dense_problem):
    cost, pairs, a, b = dense_problem
    plan = sinkhorn_log(
        torch.as_tensor(a),
        torch.as_tensor(b),
        pairs,
        torch.as_tensor(cost.ravel()),
        torch.tensor(REGS),
        numItermax=5000,
        stopThr=1e-12,
    )
    for g, reg in enumerate(REGS):
        expected = ot.bregman.sinkhorn_stabilized(a[:, g], b[:, g], cost, reg, numItermax=5000, stopThr=1e-12)
        np.testing.assert_allclose(plan[:, g].numpy().reshape(N_SPOTS, N_SPOTS), expected, atol=1e-5)


def test_balanced_float32_matches_pot_and_keeps_marginals(dense_problem):
    cost, pairs, a, b = dense_problem
    plan = sinkhorn_log(
        torch.as_tensor(a, dtype=torch.float32),
        torch.as_tensor(b, dtype=torch.float32),
        pairs,
        torch.as_tensor(cost.ravel(), dtype=torch.float32),
        1.0,
        numItermax=3000,
    )
    expected = ot.bregman.sinkhorn_stabilized(a[:, 0], b[:, 0], cost, 1.0, numItermax=3000)
    np.testing.assert_allclose(plan[:, 0].numpy().reshape(N_SPOTS, N_SPOTS), expected, atol=1e-5)
    np.testing.assert_allclose(row_sums(plan, pairs, N_SPOTS).numpy(), a, atol=1e-5)
    np.testing.assert_allclose(column_sums(plan, pairs, N_SPOTS).numpy(), b, atol=1e-5)


def test_unbalanced_matches_pot(dense_problem):
    cost, pairs, a, b = dense_problem
    plan = sinkhorn_log(
        torch.as_tensor(a),
        torch.as_tensor(2 * b),
        pairs,
        torch.as_tensor(cost.ravel()),
        torch.tensor(REGS),
        reg_m=0.7,
        numItermax=5000,
        stopThr=1e-12,
    )
    for g, reg in enumerate(REGS):
        expected = ot.unbalanced.sinkhorn_unbalanced(
            a[:, g], 2 * b[:, g], cost, reg, 0.7, reg_type="entropy", numItermax=5000, stopThr=1e-12
        )
        np.testing.assert_allclose(plan[:, g].numpy().reshape(N_SPOTS, N_SPOTS), expected, atol=1e-5)


def test_em_step_is_pot_semi_relaxed_sinkhorn(dense_problem):
    """One EM update = row sums of POT's unbalanced plan with a free source and a fixed target marginal."""
    cost, pairs, field, counts = dense_problem
    counts = counts * 50
    field = field * counts.sum(0)
    reg = 1.3
    kernel = PairKernel.from_log_weights(
        -torch.as_tensor(cost.ravel())[:, None].expand(-1, N_GENES) / reg, pairs, N_SPOTS
    )
    ones = torch.ones(N_GENES, dtype=torch.float64)
    updated = em_step(torch.as_tensor(field), torch.as_tensor(counts), kernel, ones, 0 * ones)
    row_mass = np.exp(-cost / reg).sum(1)
    for g in range(N_GENES):
        plan = ot.unbalanced.sinkhorn_unbalanced(
            field[:, g] / row_mass, counts[:, g], cost, reg, (0.0, np.inf), reg_type="kl", numItermax=10
        )
        np.testing.assert_allclose(updated[:, g].numpy(), plan.sum(1), rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(plan.sum(0), counts[:, g], rtol=1e-5)


def test_em_keeps_totals_and_confinement():
    rng = np.random.default_rng(1)
    n = 30
    coords = rng.random((n, 2)) * 6
    cost = ((coords[:, None] - coords[None]) ** 2).sum(-1)
    source, target = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    inside = coords[:, 0] < 3
    keep = inside[source.ravel()]
    pairs = (torch.as_tensor(source.ravel()[keep]), torch.as_tensor(target.ravel()[keep]))
    kernel = PairKernel.from_log_weights(-torch.as_tensor(cost.ravel()[keep])[:, None].repeat(1, 2), pairs, n)
    counts = torch.as_tensor(rng.poisson(5, (n, 2)), dtype=torch.float64)
    start = counts * torch.as_tensor(inside)[:, None]
    start = start / start.sum(0) * counts.sum(0)
    shares = torch.tensor([0.4, 0.4], dtype=torch.float64)
    field = deconvolve_em(counts, start, kernel, shares, 0.05 * shares, n_iter=50)
    np.testing.assert_allclose(field.sum(0).numpy(), counts.sum(0).numpy(), rtol=1e-10)
    assert torch.all(field[~torch.as_tensor(inside)] == 0)
    mu = expected_counts(field, kernel, shares, 0.05 * shares)
    np.testing.assert_allclose(mu.sum(0).numpy(), counts.sum(0).numpy(), rtol=1e-10)


def test_truncated_em_gradient_reaches_start_and_matches_value():
    rng = np.random.default_rng(2)
    n = 20
    coords = rng.random((n, 2)) * 4
    cost = ((coords[:, None] - coords[None]) ** 2).sum(-1)
    source, target = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    pairs = (torch.as_tensor(source.ravel()), torch.as_tensor(target.ravel()))
    kernel = PairKernel.from_log_weights(-torch.as_tensor(cost.ravel())[:, None], pairs, n)
    counts = torch.as_tensor(rng.poisson(5, (n, 1)), dtype=torch.float64)
    start = (counts + 1).requires_grad_(True)
    shares = torch.tensor([0.5], dtype=torch.float64)
    full = deconvolve_em(counts, start, kernel, shares, 0 * shares, n_iter=12)
    tail = deconvolve_em(counts, start, kernel, shares, 0 * shares, n_iter=12, n_grad_iterations=2)
    np.testing.assert_allclose(tail.detach().numpy(), full.detach().numpy(), rtol=1e-12)
    (tail[:5].sum()).backward()
    assert torch.isfinite(start.grad).all() and start.grad.abs().sum() > 0


def test_quantile_interpolates_order_statistics_and_has_gradient():
    values = torch.tensor([[0.0, 0, 0, 1, 1, 3, 5, 5, 5, 9]]).T
    q = torch.tensor([0.3], requires_grad=True)
    level = quantile(values, q)
    level.backward()
    assert q.grad.item() > 0
    # Within half a count of numpy's interpolated quantile.
    assert abs(level.item() - np.quantile(values.numpy(), 0.3)) <= 0.5
    distinct = torch.arange(10.0)[:, None]
    np.testing.assert_allclose(
        quantile(distinct, torch.tensor([0.37])).numpy(), np.quantile(np.arange(10), 0.37)
    )
    stats = dequantised_order_statistics(values)
    assert torch.all(stats[1:] > stats[:-1])


def test_torch_quantile_gives_no_gradient_but_ours_does():
    """The seed's problem: torch.quantile passes no gradient to the level."""
    values = torch.arange(10.0)
    q = torch.tensor(0.4, requires_grad=True)
    assert torch.quantile(values, q.detach()).grad_fn is None
    assert quantile(values[:, None], q[None]).grad_fn is not None


def test_soft_threshold_keeps_high_and_drops_low_values():
    values = torch.tensor([[0.0, 1, 2, 50, 100]]).T
    out = soft_threshold(values, torch.tensor([10.0]), beta=50.0)
    assert out[-1].item() == pytest.approx(100.0, rel=1e-6)
    # sigmoid(50 * (1 - 10) / 100) = sigmoid(-4.5): a count well below the cutoff keeps about 1% of itself.
    assert out[1].item() == pytest.approx(torch.sigmoid(torch.tensor(-4.5)).item(), rel=1e-5)
    assert out[0].item() == 0.0
    constant = soft_threshold(torch.full((4, 1), 3.0), torch.tensor([3.0]))
    assert torch.isfinite(constant).all()
