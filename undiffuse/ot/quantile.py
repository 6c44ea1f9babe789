r"""Differentiable quantiles and the seed's soft threshold.

``torch.quantile`` passes no gradient to the quantile level ``q``, and on counts the empirical quantile
function is flat across ties, so that even an interpolating quantile has a zero derivative wherever ``q``
falls inside a run of equal counts (most of the range for sparse genes). We therefore use the quantile
function of the *dequantised* counts: the :math:`m` copies of a tied value :math:`v` are spread evenly over
:math:`[v - \tfrac12, v + \tfrac12]`, and the quantile interpolates linearly between these order statistics.
It equals the ordinary interpolated quantile up to half a count, is continuous and strictly increasing in
:math:`q`, and its derivative

.. math::

    \frac{\partial Q(q)}{\partial q} = (n - 1)\,(s_{\lceil p \rceil} - s_{\lfloor p \rfloor}),
    \qquad p = q\,(n - 1),

is positive everywhere.
"""

from __future__ import annotations

import torch


def dequantised_order_statistics(values: torch.Tensor) -> torch.Tensor:
    """Sorted columns, with tied integer counts spread evenly over a unit interval.

    Parameters
    ----------
    values
        ``(n, G)`` counts (any real values work; ties are spread by one unit).

    Returns
    -------
    ``(n, G)`` strictly increasing columns (for ``n > 1``).
    """
    ordered, _ = torch.sort(values.detach(), dim=0)
    n = ordered.shape[0]
    if n < 2:
        return ordered
    rank = torch.arange(n, device=values.device, dtype=values.dtype)[:, None].expand_as(ordered)
    # First and last rank of each tie group: a new group starts wherever the sorted value changes.
    new_group = torch.ones_like(ordered, dtype=torch.bool)
    new_group[1:] = ordered[1:] != ordered[:-1]
    first = torch.where(new_group, rank, torch.zeros_like(rank)).cummax(dim=0).values
    last_of_group = torch.ones_like(new_group)
    last_of_group[:-1] = new_group[1:]
    flipped = torch.where(last_of_group, rank, torch.full_like(rank, n)).flip(0)
    last = flipped.cummin(dim=0).values.flip(0)
    size = last - first + 1
    return ordered + (rank - first + 0.5) / size - 0.5


def quantile(
    values: torch.Tensor, q: torch.Tensor, *, order_statistics: torch.Tensor | None = None
) -> torch.Tensor:
    r"""Per-column quantile, differentiable in ``q``.

    Parameters
    ----------
    values
        ``(n, G)`` samples, one column per gene.
    q
        ``(G,)`` quantile levels in :math:`[0, 1]`.
    order_statistics
        Precomputed :func:`dequantised_order_statistics` of ``values`` (they do not depend on ``q``).

    Returns
    -------
    ``(G,)`` quantiles :math:`Q_g(q_g)`.
    """
    stats = dequantised_order_statistics(values) if order_statistics is None else order_statistics
    n = stats.shape[0]
    position = q.clamp(0.0, 1.0) * (n - 1)
    lower = position.detach().floor().clamp(max=max(n - 2, 0)).long()
    upper = (lower + 1).clamp(max=n - 1)
    fraction = position - lower.to(position.dtype)
    s_lower = stats.gather(0, lower[None, :]).squeeze(0)
    s_upper = stats.gather(0, upper[None, :]).squeeze(0)
    return s_lower + fraction * (s_upper - s_lower)


def soft_threshold(
    values: torch.Tensor,
    threshold: torch.Tensor,
    *,
    beta: float = 50.0,
    value_range: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""The seed's soft threshold (Eq. 2): :math:`b = \sigma(\beta (x - Q) / \mathrm{range}(x)) \odot x`.

    Parameters
    ----------
    values
        ``(N, G)`` counts :math:`x`.
    threshold
        ``(G,)`` cutoffs :math:`Q_g(q_g)`.
    beta
        Sharpness of the sigmoid.
    value_range
        ``(G,)`` :math:`\max x - \min x`; computed from ``values`` when omitted. Constant genes use 1.

    Returns
    -------
    ``(N, G)`` soft-thresholded counts :math:`b`.
    """
    if value_range is None:
        value_range = values.amax(dim=0) - values.amin(dim=0)
    scale = torch.where(value_range > 0, value_range, torch.ones_like(value_range))
    return torch.sigmoid(beta * (values - threshold[None, :]) / scale[None, :]) * values
