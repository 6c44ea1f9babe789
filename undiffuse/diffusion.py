r"""The forward model of lateral diffusion, batched over genes.

For gene :math:`g`, a true field :math:`z_g` on the tissue spots is observed on all :math:`N` spots as

.. math::

    \mu_g = (1 - b_g - d_g)\, z_g + b_g\, P_g^\top z_g + d_g\, \frac{\mathbf 1^\top z_g}{N}\,\mathbf 1,
    \qquad x_g \sim \mathrm{Poisson}(\mu_g),

where :math:`b_g` is the share of molecules that bleed locally, :math:`d_g` the share spread uniformly over
the slide (distal bleeding, as SpotClean models it), and :math:`P_g` is the row-stochastic kernel of a radial
profile (:mod:`undiffuse.operators`: by FFT on the spot lattice, or on neighbour pairs when the spots are not
on a lattice). For the Gibbs kernel of a transport cost the log weights are :math:`-M_{ij} / r_g`. Every row
of the full operator sums to one, so diffusion keeps each gene's total. The simulator and the correction share
this module, so the correction's model family contains the simulator's truth.

Shapes: ``M`` distances, ``N`` spots, ``G`` genes.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from .operators import Kernel, LogWeights, build_operator

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


def profile(scale: torch.Tensor, kind: KernelKind) -> LogWeights:
    """The radial profile :func:`profile_log_weights` as kernel log weights (the same on and off tissue)."""
    return lambda distance, crosses: profile_log_weights(distance, scale.to(distance.dtype), kind)


def expected_counts(
    field: torch.Tensor, kernel: Kernel, bleed: torch.Tensor, distal: torch.Tensor
) -> torch.Tensor:
    r"""The forward model :math:`\mu = (1 - b - d) z + b P^\top z + d \bar z`.

    Parameters
    ----------
    field
        ``(N, G)`` true field :math:`z` (zero off tissue).
    kernel
        The row-normalised local kernel, bound to its parameters (:mod:`undiffuse.operators`).
    bleed, distal
        ``(G,)`` shares :math:`b` and :math:`d`, with :math:`b + d \le 1`.
    """
    n_spots = field.shape[0]
    uniform = field.sum(dim=0, keepdim=True) / n_spots
    return (1.0 - bleed - distal) * field + bleed * kernel.push(field) + distal * uniform


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
        Truncation radius in pitches. By default none on a lattice (the kernel keeps all but 1e-6 of its
        mass); spots off a lattice use neighbour pairs within 4 scales (Gaussian) or 8 (heavy-tailed).

    Returns
    -------
    ``(N, G)`` expected observed counts.
    """
    field = np.asarray(field, dtype=np.float64)
    scale = np.broadcast_to(np.asarray(scale, dtype=np.float64), (field.shape[1],))
    # Neighbour pairs need a radius; the lattice keeps the kernel wherever it holds mass.
    pair_cutoff = float(scale.max()) * (4.0 if kind == "gaussian" else 8.0)
    operator = build_operator(coords, tissue, cutoff=cutoff, fallback_cutoff=pair_cutoff, dtype=torch.float64)
    kernel = operator.bind(profile(torch.from_numpy(scale.copy()), kind))
    as_gene_vector = lambda v: torch.as_tensor(np.broadcast_to(v, (field.shape[1],)).copy())  # noqa: E731
    mu = expected_counts(torch.from_numpy(field), kernel, as_gene_vector(bleed), as_gene_vector(distal))
    return mu.numpy()
