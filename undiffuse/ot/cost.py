r"""The learnable transport cost :math:`M = W \odot D^2` on neighbour pairs.

The cost weights are a small function of distance and tissue membership,

.. math::

    W_{e,g} = f_{\phi_g}(d_e, c_e) = \exp\Big(\sum_{k=1}^{K} \phi_{g,k}\, B_k(d_e) + \phi_{g,0}\, c_e\Big),

where :math:`d_e` is the distance of pair :math:`e` in spot pitches, :math:`c_e = 1` when the pair crosses the
tissue boundary, and :math:`B_k` are Gaussian radial basis functions spread over :math:`[0, R]`. With
:math:`\phi = 0` it is the seed's initialisation :math:`W = 1`; the exponential keeps :math:`W > 0`. Training
starts instead from the coefficients whose kernel has the radial profile the QC measured on the background
(:func:`matching_coefficients`; :func:`undiffuse.trainer.initial_cost`) when it measured one. Each gene
has its own coefficients, so that a gene's result does not depend on the other genes of its chunk. A pair's
Gibbs weight is :math:`\exp(-W_{e,g} d_e^2 / r_g)`: with :math:`W = 1` a Gaussian heat kernel whose variance
is :math:`r_g / 2` pitches squared.
"""

from __future__ import annotations

import torch

#: Number of radial basis functions of f_phi.
N_RADIAL_BASIS = 4


def radial_basis(distance: torch.Tensor, cutoff: float, n_basis: int = N_RADIAL_BASIS) -> torch.Tensor:
    """``(E,)`` distances -> ``(E, K)`` Gaussian bumps centred evenly on ``[0, cutoff]``."""
    centres = torch.linspace(0.0, cutoff, n_basis, dtype=distance.dtype, device=distance.device)
    width = cutoff / max(n_basis - 1, 1)
    return torch.exp(-0.5 * ((distance[:, None] - centres[None, :]) / width) ** 2)


def cost_weights(features: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
    r""":math:`W = \exp(F \phi^\top)`.

    Parameters
    ----------
    features
        ``(E, K + 1)`` pair features: radial basis values, then the boundary-crossing flag.
    phi
        ``(G, K + 1)`` coefficients.

    Returns
    -------
    ``(E, G)`` cost weights.
    """
    return torch.exp(features @ phi.T)


def matching_coefficients(
    basis: torch.Tensor, distance: torch.Tensor, log_weights: torch.Tensor, reg: float
) -> torch.Tensor:
    r"""``(K,)`` radial coefficients whose Gibbs kernel has the given radial profile.

    Solves, by least squares over the distances :math:`d > 0`,

    .. math::

        \sum_k \phi_k B_k(d) = \log \frac{-\ell(d)\, r}{d^2},

    so that :math:`-W d^2 / r` with :math:`W = \exp(\sum_k \phi_k B_k)` matches the profile's log weights
    :math:`\ell(d)` (0 at :math:`d = 0`, negative beyond), up to the basis' resolution.

    Parameters
    ----------
    basis
        ``(M, K)`` radial basis at the distances (:func:`radial_basis`).
    distance
        ``(M,)`` distances in spot pitches, all positive.
    log_weights
        ``(M,)`` the profile's log weights :math:`\ell(d)`.
    reg
        The entropic regularisation :math:`r` the coefficients pair with.
    """
    target = torch.log(-log_weights * reg / distance**2)
    return torch.linalg.lstsq(basis, target[:, None]).solution[:, 0]


def pair_features(
    distance: torch.Tensor, crosses_boundary: torch.Tensor, cutoff: float, n_basis: int = N_RADIAL_BASIS
) -> torch.Tensor:
    """``(E, K + 1)`` inputs of f_phi: radial basis of the distance, then the boundary-crossing flag."""
    basis = radial_basis(distance, cutoff, n_basis)
    return torch.cat([basis, crosses_boundary.to(basis.dtype)[:, None]], dim=1)
