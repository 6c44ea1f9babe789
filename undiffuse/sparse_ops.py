"""Batched operations on sparse neighbour pairs: values live on ``(E, G)`` pair-by-gene arrays.

These are the only primitives the solvers need; none of them builds an ``N x N`` matrix.
Shapes: ``E`` pairs, ``N`` spots, ``G`` genes.
"""

from __future__ import annotations

import torch

Pairs = tuple[torch.Tensor, torch.Tensor]


def segment_logsumexp(values: torch.Tensor, index: torch.Tensor, n_segments: int) -> torch.Tensor:
    """Log-sum-exp of ``(E, G)`` values grouped by ``index`` ``(E,)``; empty groups give ``-inf``.

    Stable for any magnitude: each group is shifted by its (detached) maximum before the exponential.
    """
    n_genes = values.shape[1]
    expanded = index[:, None].expand(-1, n_genes)
    group_max = torch.full((n_segments, n_genes), -torch.inf, dtype=values.dtype, device=values.device)
    group_max = group_max.scatter_reduce(0, expanded, values.detach(), reduce="amax", include_self=True)
    finite_max = torch.where(torch.isfinite(group_max), group_max, torch.zeros_like(group_max))
    summed = torch.zeros_like(finite_max).index_add(0, index, torch.exp(values - finite_max[index]))
    return torch.log(summed) + finite_max


def push(values: torch.Tensor, pairs: Pairs, field: torch.Tensor) -> torch.Tensor:
    r""":math:`P^\top z`, moving each source's mass to its targets: ``(E, G), (N, G) -> (N, G)``."""
    source, target = pairs
    return torch.zeros_like(field).index_add(0, target, values * field.index_select(0, source))


def pull(values: torch.Tensor, pairs: Pairs, field: torch.Tensor) -> torch.Tensor:
    r""":math:`P y`, gathering each source's targets: ``(E, G), (N, G) -> (N, G)``."""
    source, target = pairs
    return torch.zeros_like(field).index_add(0, source, values * field.index_select(0, target))


def column_sums(plan: torch.Tensor, pairs: Pairs, n_spots: int) -> torch.Tensor:
    r"""Target marginal :math:`\gamma^\top \mathbf 1` of a plan on pairs: ``(E, G) -> (N, G)``."""
    return torch.zeros((n_spots, plan.shape[1]), dtype=plan.dtype, device=plan.device).index_add(
        0, pairs[1], plan
    )


def row_sums(plan: torch.Tensor, pairs: Pairs, n_spots: int) -> torch.Tensor:
    r"""Source marginal :math:`\gamma \mathbf 1` of a plan on pairs: ``(E, G) -> (N, G)``."""
    return torch.zeros((n_spots, plan.shape[1]), dtype=plan.dtype, device=plan.device).index_add(
        0, pairs[0], plan
    )
