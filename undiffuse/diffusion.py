r"""The forward model of lateral diffusion, batched over genes on sparse neighbour pairs.

For gene :math:`g`, a true field :math:`z_g` on the tissue spots is observed on all :math:`N` spots as

.. math::

    \mu_g = (1 - b_g - d_g)\, z_g + b_g\, P_g^\top z_g + d_g\, \frac{\mathbf 1^\top z_g}{N}\,\mathbf 1,
    \qquad x_g \sim \mathrm{Poisson}(\mu_g),

where :math:`b_g` is the share of molecules that bleed locally, :math:`d_g` the share spread uniformly over
the slide (distal bleeding, as SpotClean models it), and :math:`P_g` is a row-stochastic kernel on the
neighbour pairs within a cutoff radius:

.. math::

    (P_g)_{ij} = \frac{\exp(\ell_{ij,g})}{\sum_{k:\,|r_i - r_k| \le R} \exp(\ell_{ik,g})}.

For the Gibbs kernel of a transport cost, :math:`\ell_{ij,g} = -M_{ij} / r_g`. Every row of the full operator
sums to one, so diffusion keeps each gene's total. The simulator and the correction share this module, so the
correction's model family contains the simulator's truth.

Shapes: ``E`` neighbour pairs, ``N`` spots, ``G`` genes.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from .sparse_ops import push, segment_logsumexp
from .spatial import NeighbourPairs, neighbour_pairs

KernelKind = Literal["gaussian", "heavy_tailed"]

#: Degrees of freedom of the Student-t profile used for heavy-tailed kernels.
HEAVY_TAIL_DOF = 2.0


def profile_log_weights(distance: torch.Tensor, scale: torch.Tensor, kind: KernelKind) -> torch.Tensor:
    r"""Unnormalised log kernel weights of a radial profile.

    ``gaussian``: :math:`-d^2 / (2 s^2)`; ``heavy_tailed``: a Student-t profile
    :math:`-\frac{\nu + 2}{2}\log(1 + d^2 / (\nu s^2))` with :math:`\nu = 2`.

    Parameters
    ----------
    distance
        ``(E,)`` pair distances in spot pitches.
    scale
        ``(G,)`` kernel scales in spot pitches.

    Returns
    -------
    ``(E, G)`` log weights.
    """
    sq = (distance[:, None] / scale[None, :]) ** 2
    if kind == "gaussian":
        return -0.5 * sq
    if kind == "heavy_tailed":
        return -0.5 * (HEAVY_TAIL_DOF + 2.0) * torch.log1p(sq / HEAVY_TAIL_DOF)
    raise ValueError(f"unknown kernel kind {kind!r}; expected 'gaussian' or 'heavy_tailed'")


def normalise_rows(log_weights: torch.Tensor, source: torch.Tensor, n_spots: int) -> torch.Tensor:
    """Row-normalise log weights per source spot, in the log domain (no overflow for any scale).

    Parameters
    ----------
    log_weights
        ``(E, G)``.
    source
        ``(E,)`` int64 source index of each pair.

    Returns
    -------
    ``(E, G)`` kernel values :math:`P_{ij}` whose rows sum to one.
    """
    return torch.exp(log_weights - segment_logsumexp(log_weights, source, n_spots)[source])


def expected_counts(
    field: torch.Tensor,
    kernel: torch.Tensor,
    pairs: tuple[torch.Tensor, torch.Tensor],
    bleed: torch.Tensor,
    distal: torch.Tensor,
) -> torch.Tensor:
    r"""The forward model :math:`\mu = (1 - b - d) z + b P^\top z + d \bar z`.

    Parameters
    ----------
    field
        ``(N, G)`` true field :math:`z` (zero off tissue).
    kernel
        ``(E, G)`` row-normalised kernel values on ``pairs``.
    bleed, distal
        ``(G,)`` shares :math:`b` and :math:`d`, with :math:`b + d \le 1`.
    """
    n_spots = field.shape[0]
    uniform = field.sum(dim=0, keepdim=True) / n_spots
    return (1.0 - bleed - distal) * field + bleed * push(kernel, pairs, field) + distal * uniform


def diffuse(
    field: np.ndarray,
    coords: np.ndarray,
    tissue: np.ndarray,
    *,
    scale: np.ndarray,
    bleed: float | np.ndarray,
    distal: float | np.ndarray,
    kind: KernelKind = "gaussian",
    cutoff: float | None = None,
) -> np.ndarray:
    """Diffuse a true field with the forward model (float64, NumPy in and out); keeps each gene's total.

    Parameters
    ----------
    field
        ``(N, G)`` true expected counts; only tissue spots may hold mass.
    coords
        ``(N, 2)`` spot centres in spot pitches.
    tissue
        ``(N,)`` boolean tissue mask.
    scale
        ``(G,)`` kernel scale per gene, in spot pitches.
    bleed, distal
        Local and uniform bleeding shares (scalars or ``(G,)``).
    kind
        Radial profile of the local kernel.
    cutoff
        Neighbour radius in pitches; by default wide enough to hold all but a negligible tail.

    Returns
    -------
    ``(N, G)`` expected observed counts.
    """
    field = np.asarray(field, dtype=np.float64)
    scale = np.broadcast_to(np.asarray(scale, dtype=np.float64), (field.shape[1],))
    if cutoff is None:
        cutoff = float(scale.max()) * (4.0 if kind == "gaussian" else 8.0)
    pairs = neighbour_pairs(coords, cutoff, sources=np.asarray(tissue, dtype=bool))
    source, target = torch.from_numpy(pairs.source), torch.from_numpy(pairs.target)
    log_w = profile_log_weights(torch.from_numpy(pairs.distance), torch.from_numpy(scale.copy()), kind)
    kernel = normalise_rows(log_w, source, pairs.n_spots)
    as_gene_vector = lambda v: torch.as_tensor(np.broadcast_to(v, (field.shape[1],)).copy())  # noqa: E731
    mu = expected_counts(
        torch.from_numpy(field), kernel, (source, target), as_gene_vector(bleed), as_gene_vector(distal)
    )
    return mu.numpy()


def pair_tensors(
    pairs: NeighbourPairs, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(source, target)`` index tensors of ``pairs`` on ``device``."""
    return (
        torch.as_tensor(pairs.source, device=device),
        torch.as_tensor(pairs.target, device=device),
    )
