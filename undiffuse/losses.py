r"""Losses of the correction, each a ``(G,)`` vector with one term per gene.

Per-gene terms keep every gene's optimisation independent of the others in its chunk; the correction
minimises their sum

.. math::

    \mathcal L = \lambda_1 \mathcal L_\text{image} + \lambda_2 \mathcal L_\text{out} + \lambda_3
    \mathcal L_\text{Moran} + \lambda_4 \mathcal L_\text{Poisson}.

Shapes: ``N`` spots, ``G`` genes, ``H x W`` image grid.
"""

from __future__ import annotations

import kornia
import torch

from .moran import morans_i


def image_loss(expression: torch.Tensor, intensity: torch.Tensor, *, window_size: int = 7) -> torch.Tensor:
    r"""The seed's image term (Eq. 4) per gene, between rasterised expression :math:`E` and image :math:`I`.

    .. math::

        \mathcal L_\text{image} = (1 - \mathrm{SSIM}(E, I)) + \|\nabla E - \nabla I\|_1
        + |\mathrm{TV}(E) - \mathrm{TV}(I)|,

    with :math:`E` scaled to :math:`[0, 1]` by its maximum, the gradient term averaged over pixels and the
    total variations divided by the number of pixels, so that the three terms are of order one.

    Parameters
    ----------
    expression
        ``(G, 1, H, W)`` rasterised expression.
    intensity
        ``(1, 1, H, W)`` image intensity in :math:`[0, 1]`.

    Returns
    -------
    ``(G,)`` losses.
    """
    peak = expression.amax(dim=(1, 2, 3), keepdim=True)
    scaled = expression / torch.where(peak > 0, peak, torch.ones_like(peak))
    target = intensity.expand_as(scaled)
    ssim = kornia.metrics.ssim(scaled, target, window_size).mean(dim=(1, 2, 3))
    gradient = (kornia.filters.spatial_gradient(scaled) - kornia.filters.spatial_gradient(target)).abs()
    n_pixels = scaled.shape[-1] * scaled.shape[-2]
    tv = kornia.losses.total_variation(scaled).reshape(-1) / n_pixels
    tv_target = kornia.losses.total_variation(intensity).reshape(-1) / n_pixels
    return (1.0 - ssim) + gradient.mean(dim=(1, 2, 3, 4)) + (tv - tv_target).abs()


def out_of_tissue_loss(field: torch.Tensor, tissue: torch.Tensor) -> torch.Tensor:
    r"""Share of each gene's corrected mass outside tissue (Eq. 5, divided by the gene's total).

    Parameters
    ----------
    field
        ``(N, G)`` corrected expression.
    tissue
        ``(N,)`` boolean mask.
    """
    total = field.sum(dim=0)
    outside = field[~tissue].sum(dim=0)
    return outside / torch.where(total > 0, total, torch.ones_like(total))


def moran_loss(field: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    r""":math:`-I_g`, Moran's I of each gene (Eq. 6-7) with sparse spatial weights ``(N, N)``."""
    return -morans_i(field, weights)


def poisson_loss(counts: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    r"""Mean Poisson deviance per spot of the observations under the forward model.

    .. math::

        \mathcal L_\text{Poisson} = \frac{1}{N} \sum_i \Big(\mu_i - x_i + x_i \log\frac{x_i}{\mu_i}\Big)

    It is zero when :math:`\mu = x`, identifies the diffusion kernel (background spots must be explained by
    molecules from the tissue), and is finite wherever :math:`\mu > 0` or :math:`x = 0`.

    Parameters
    ----------
    counts, expected
        ``(N, G)`` observations :math:`x` and expected counts :math:`\mu = K^\top z`.
    """
    tiny = torch.finfo(expected.dtype).tiny
    log_ratio = torch.where(
        counts > 0,
        torch.log(counts.clamp_min(tiny)) - torch.log(expected.clamp_min(tiny)),
        torch.zeros_like(counts),
    )
    return (expected - counts + counts * log_ratio).mean(dim=0)
