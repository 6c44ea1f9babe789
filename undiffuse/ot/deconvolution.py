r"""Deconvolution of diffusion by EM, i.e. iterated semi-relaxed Sinkhorn.

The forward model (:mod:`undiffuse.diffusion`) is :math:`x \sim \mathrm{Poisson}(K^\top z)` with the mixture
kernel :math:`K = (1 - b - d) I + b P + d\,\mathbf 1 \mathbf 1^\top / N`, whose rows sum to one. Given the
current field :math:`z`, the plan

.. math::

    \gamma_{ji} = \frac{z_j K_{ji}}{(K^\top z)_i}\, x_i

says where the molecules observed at spot :math:`i` came from: its column sums are the observations
:math:`x` exactly, and its row sums are the next field,

.. math::

    z_j \leftarrow z_j \sum_i K_{ji} \frac{x_i}{(K^\top z)_i}
        = z_j \Big[(1 - b - d)\,\rho_j + b\,(P \rho)_j + d\,\bar\rho\Big], \qquad \rho = x / (K^\top z).

This is the EM (Richardson-Lucy) update for the Poisson likelihood, and :math:`\gamma` is the solution of the
semi-relaxed entropic OT problem whose target marginal is fixed to :math:`x`, whose source marginal is free
(:math:`\rho_1 = 0`), and whose entropy is taken relative to :math:`z \otimes \mathbf 1` — one Sinkhorn
half-step, which ``ot.unbalanced.sinkhorn_unbalanced(a, x, M, reg, reg_m=(0, inf), reg_type="kl")`` reproduces
(tested). Each update keeps the gene's total (:math:`\mathbf 1^\top z = \mathbf 1^\top x`), never moves mass
onto spots where :math:`z = 0` (the field stays confined to tissue), and never decreases the likelihood.

With a :class:`~undiffuse.ot.prior.GammaFieldPrior`, the update is followed by the prior's M-step (a shrinkage
towards the mean of the tissue neighbours, :mod:`undiffuse.ot.prior`) and a rescaling to the gene's total:
maximum a posteriori EM, which amplifies counting noise much less than maximum likelihood.
"""

from __future__ import annotations

import torch

from ..diffusion import expected_counts
from ..operators import Kernel
from .prior import GammaFieldPrior


def em_step(
    field: torch.Tensor,
    counts: torch.Tensor,
    kernel: Kernel,
    bleed: torch.Tensor,
    distal: torch.Tensor,
    prior: GammaFieldPrior | None = None,
) -> torch.Tensor:
    """One EM update of the field: ``(N, G)`` -> ``(N, G)``.

    Parameters
    ----------
    field
        ``(N, G)`` current field :math:`z` (zero off tissue).
    counts
        ``(N, G)`` observations :math:`x` on all spots.
    kernel
        Row-normalised local kernel :math:`P`, bound to its parameters (:mod:`undiffuse.operators`).
    bleed, distal
        ``(G,)`` shares :math:`b`, :math:`d`.
    prior
        Smoothness prior (maximum a posteriori EM); ``None`` is maximum likelihood.
    """
    return _em_update(field, counts, kernel, bleed, distal, prior, with_likelihood=False)[0]


def back_projected_ratio(
    field: torch.Tensor, counts: torch.Tensor, kernel: Kernel, bleed: torch.Tensor, distal: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``(N, G)`` :math:`K \rho` with :math:`\rho = x / (K^\top z)`, the EM's multiplicative factor, and
    ``(N, G)`` the expected counts :math:`K^\top z`.

    On tissue, where :math:`K \mathbf 1 = \mathbf 1`, the factor minus one is the gradient of the Poisson
    log-likelihood with respect to :math:`z`, which the low-rank model (:mod:`undiffuse.ot.programmes`) uses.
    """
    mu = expected_counts(field, kernel, bleed, distal)
    tiny = torch.finfo(mu.dtype).tiny
    # 0/0 where a spot neither holds nor receives mass: nothing to explain there.
    ratio = torch.where(mu > 0, counts / mu.clamp_min(tiny), torch.zeros((), dtype=mu.dtype))
    return (1.0 - bleed - distal) * ratio + bleed * kernel.pull(ratio) + distal * ratio.mean(0), mu


def _em_update(field, counts, kernel, bleed, distal, prior, *, with_likelihood=True):
    """:func:`em_step`, and the ``(G,)`` Poisson log-likelihood of the field it started from (``None`` without
    ``with_likelihood``)."""
    back, mu = back_projected_ratio(field, counts, kernel, bleed, distal)
    tiny = torch.finfo(mu.dtype).tiny
    expected_sources = field * back
    log_likelihood = (counts * torch.log(mu.clamp_min(tiny)) - mu).sum(dim=0) if with_likelihood else None
    if prior is None:
        return expected_sources, log_likelihood
    updated = prior.update(expected_sources, field)
    mass = updated.sum(dim=0)
    return updated * (counts.sum(dim=0) / torch.where(mass > 0, mass, 1.0)), log_likelihood


def squarem(step, start: torch.Tensor, n_updates: int) -> torch.Tensor:
    r"""SQUAREM acceleration of a fixed-point iteration, per gene (Varadhan & Roland 2008, scheme S3).

    From :math:`z_0`, two updates give :math:`z_1, z_2`; with :math:`r = z_1 - z_0`, :math:`v = z_2 - 2 z_1 +
    z_0` and step length :math:`\alpha = -\|r\| / \|v\|` (at most :math:`-1`), the extrapolated point
    :math:`z' = z_0 - 2 \alpha r + \alpha^2 v` is stabilised by one more update. A gene falls back to
    :math:`z_2` where :math:`z'` has a negative value or explains its counts worse than :math:`z_1` does.
    :math:`r` and :math:`v` sum to zero and vanish where the field does, so totals and the confinement to
    tissue are kept.

    Parameters
    ----------
    step
        ``(N, G)`` field -> (next field, ``(G,)`` log-likelihood of the given field).
    start
        ``(N, G)`` initial field.
    n_updates
        Budget of calls to ``step``; each cycle uses three.

    References
    ----------
    Varadhan, R. & Roland, C. (2008). Simple and globally convergent methods for accelerating the convergence
    of any EM algorithm. Scandinavian Journal of Statistics 35, 335-353.
    """
    field, used = start, 0
    while used + 3 <= n_updates:
        first, _ = step(field)
        second, fit_first = step(first)
        r, v = first - field, second - 2.0 * first + field
        r_norm, v_norm = r.square().sum(dim=0).sqrt(), v.square().sum(dim=0).sqrt()
        alpha = torch.where(v_norm > 0, -r_norm / v_norm.clamp_min(torch.finfo(v.dtype).tiny), -1.0)
        alpha = alpha.clamp_max(-1.0)
        jumped = field - 2.0 * alpha * r + alpha.square() * v
        feasible = ((jumped >= 0) & torch.isfinite(jumped)).all(dim=0)
        jumped = torch.where(feasible, jumped, second)
        stabilised, fit_jumped = step(jumped)
        field = torch.where(feasible & (fit_jumped >= fit_first), stabilised, second)
        used += 3
    for _ in range(n_updates - used):
        field, _ = step(field)
    return field


def through_start(start: torch.Tensor, field: torch.Tensor) -> torch.Tensor:
    """``field`` written as ``start`` times a fixed factor: the same values, with gradients reaching ``start``.

    EM updates are multiplicative, so a field reached from ``start`` is ``start * (field / start)``; holding
    the accumulated factor fixed differentiates through earlier updates without keeping their graph. Where
    ``start`` is zero the field is taken as it is.
    """
    fixed = start.detach()
    tiny = torch.finfo(start.dtype).tiny
    factor = torch.where(fixed > 0, field.detach() / fixed.clamp_min(tiny), torch.zeros_like(fixed))
    return torch.where(fixed > 0, start * factor, field.detach())


def with_totals(field: torch.Tensor, totals: torch.Tensor) -> torch.Tensor:
    """``(N, G)`` ``field`` rescaled to the ``(G,)`` gene totals (a gene with no mass stays zero): EM keeps them
    in exact arithmetic, FFT round-off moves them by ~1e-7."""
    mass = field.sum(dim=0)
    return field * torch.where(mass > 0, totals / torch.where(mass > 0, mass, 1.0), 0.0)


def deconvolve_em(
    counts: torch.Tensor,
    start: torch.Tensor,
    kernel: Kernel,
    bleed: torch.Tensor,
    distal: torch.Tensor,
    *,
    n_iter: int,
    n_grad_iterations: int | None = None,
    prior: GammaFieldPrior | None = None,
    accelerate: bool = False,
) -> torch.Tensor:
    """Run ``n_iter`` EM updates from ``start``.

    Parameters
    ----------
    counts, start
        ``(N, G)`` observations and initial field (zero off tissue; its column sums should equal those of
        ``counts``).
    kernel, bleed, distal
        The forward model, as in :func:`em_step`.
    n_iter
        Number of updates.
    n_grad_iterations
        Differentiate only the last this many updates. The earlier ones run without a graph, and their
        result enters the differentiated tail as ``start * (z / start)`` with the accumulated multiplicative
        factor ``z / start`` held fixed, so that gradients still reach ``start`` while autograd memory stays
        bounded by the tail. ``None`` differentiates every update.
    prior
        Smoothness prior, as in :func:`em_step`.
    accelerate
        Spend the updates that are not differentiated on :func:`squarem` cycles.

    Returns
    -------
    ``(N, G)`` deconvolved field.
    """
    if n_grad_iterations is None and not torch.is_grad_enabled():
        n_grad_iterations = 0
    if n_grad_iterations is None or n_grad_iterations >= n_iter:
        field = start
        for _ in range(n_iter):
            field = em_step(field, counts, kernel, bleed, distal, prior)
        return field
    with torch.no_grad():
        fixed = (bleed.detach(), distal.detach())
        update = lambda z: _em_update(z, counts, kernel, *fixed, prior)  # noqa: E731
        n_free = n_iter - n_grad_iterations
        if accelerate:
            field = squarem(update, start, n_free)
        else:
            field = start
            for _ in range(n_free):
                field = em_step(field, counts, kernel, *fixed, prior)
    if n_grad_iterations == 0:
        return field
    field = through_start(start, field)
    for _ in range(n_grad_iterations):
        field = em_step(field, counts, kernel, bleed, distal, prior)
    return field
