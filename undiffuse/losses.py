r"""Losses of the correction, each a ``(G,)`` vector with one term per gene.

Per-gene terms keep every gene's optimisation independent of the others in its chunk; the correction
minimises their sum

.. math::

    \mathcal L = \lambda_1 \mathcal L_\text{image} + \lambda_2 \mathcal L_\text{out} + \lambda_3
    \mathcal L_\text{Moran} + \lambda_4 \mathcal L_\text{Poisson}.

Shapes: ``N`` spots, ``G`` genes, ``H x W`` image grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import kornia
import torch

from .moran import morans_i


def _filter_matrix(size: int, taps: torch.Tensor, border: str) -> torch.Tensor:
    """``(size, size)`` matrix ``M`` with ``v @ M`` the correlation of a vector with ``taps`` under the torch
    padding mode ``border``: separable image filters become two small matrix products."""
    half = taps.shape[-1] // 2
    impulses = torch.eye(size, dtype=taps.dtype)[:, None, :]
    padded = torch.nn.functional.pad(impulses, (half, half), mode=border)
    return torch.nn.functional.conv1d(padded, taps.reshape(1, 1, -1)).reshape(size, size)


@dataclass(frozen=True)
class ImageTarget:
    """The H&E intensity and everything of the image loss that depends on it alone, computed once per sample.

    The filters are kornia's, written as separable matrices (``rows.T @ image @ cols``): the Gaussian window of
    :func:`kornia.metrics.ssim` (sigma 1.5, reflected border) and the normalised Sobel kernels of
    :func:`kornia.filters.spatial_gradient` (replicated border). The test suite checks the loss against kornia's
    functions to float32 rounding.
    """

    intensity: torch.Tensor
    blur: tuple[torch.Tensor, torch.Tensor]
    smooth: tuple[torch.Tensor, torch.Tensor]
    difference: tuple[torch.Tensor, torch.Tensor]
    mean: torch.Tensor
    variance: torch.Tensor
    gradient: torch.Tensor
    total_variation: torch.Tensor

    @classmethod
    def build(cls, intensity: torch.Tensor, *, window_size: int = 7) -> ImageTarget:
        """From a ``(1, 1, H, W)`` intensity in :math:`[0, 1]`."""
        height, width = intensity.shape[-2:]
        gaussian = kornia.filters.get_gaussian_kernel1d(window_size, 1.5, dtype=intensity.dtype).reshape(-1)
        smoothing = torch.tensor([0.25, 0.5, 0.25], dtype=intensity.dtype)
        derivative = torch.tensor([-0.5, 0.0, 0.5], dtype=intensity.dtype)
        pairs = [
            tuple(_filter_matrix(n, taps, border).to(intensity.device) for n in (height, width))
            for taps, border in ((gaussian, "reflect"), (smoothing, "replicate"), (derivative, "replicate"))
        ]
        blur, smooth, difference = pairs
        mean = _separable(intensity, blur)
        return cls(
            intensity,
            blur,
            smooth,
            difference,
            mean=mean,
            variance=_separable(intensity.square(), blur) - mean.square(),
            gradient=_gradient(intensity, smooth, difference),
            total_variation=_total_variation(intensity),
        )


def _separable(image: torch.Tensor, filters: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Filter ``(..., H, W)`` images along their height and width with :func:`_filter_matrix` matrices."""
    rows, cols = filters
    height, width = image.shape[-2:]
    # Two plain matrix products over the flattened batch (a broadcast matmul would copy the filter per image).
    across = (image.reshape(-1, width) @ cols).reshape(image.shape)
    down = across.transpose(-1, -2).reshape(-1, height) @ rows
    return down.reshape(*image.shape[:-2], width, height).transpose(-1, -2)


def _gradient(image: torch.Tensor, smooth, difference) -> torch.Tensor:
    """``(..., 2, H, W)`` normalised Sobel derivatives along x (width) and y (height)."""
    along_x = _separable(image, (smooth[0], difference[1]))
    along_y = _separable(image, (difference[0], smooth[1]))
    return torch.stack([along_x, along_y], dim=-3)


def _total_variation(image: torch.Tensor) -> torch.Tensor:
    """kornia's total variation (sum of absolute neighbour differences) per image, divided by the pixels."""
    down = (image[..., 1:, :] - image[..., :-1, :]).abs().sum(dim=(-2, -1))
    across = (image[..., :, 1:] - image[..., :, :-1]).abs().sum(dim=(-2, -1))
    return (down + across).reshape(-1) / (image.shape[-1] * image.shape[-2])


def image_loss(expression: torch.Tensor, target: ImageTarget) -> torch.Tensor:
    r"""The seed's image term (Eq. 4) per gene, between rasterised expression :math:`E` and image :math:`I`.

    .. math::

        \mathcal L_\text{image} = (1 - \mathrm{SSIM}(E, I)) + \|\nabla E - \nabla I\|_1
        + |\mathrm{TV}(E) - \mathrm{TV}(I)|,

    with :math:`E` scaled to :math:`[0, 1]` by its maximum, SSIM and the gradient term averaged over pixels and
    the total variations divided by the number of pixels, so that the three terms are of order one.

    Parameters
    ----------
    expression
        ``(G, 1, H, W)`` rasterised expression.
    target
        The image's side of the loss (:class:`ImageTarget`).

    Returns
    -------
    ``(G,)`` losses.
    """
    peak = expression.amax(dim=(1, 2, 3), keepdim=True)
    scaled = expression / torch.where(peak > 0, peak, torch.ones_like(peak))
    c1, c2 = 0.01**2, 0.03**2
    mean = _separable(scaled, target.blur)
    variance = _separable(scaled.square(), target.blur) - mean.square()
    covariance = _separable(scaled * target.intensity, target.blur) - mean * target.mean
    ssim = ((2 * mean * target.mean + c1) * (2 * covariance + c2)) / (
        (mean.square() + target.mean.square() + c1) * (variance + target.variance + c2) + 1e-12
    )
    gradient = (
        (_gradient(scaled, target.smooth, target.difference) - target.gradient).abs().mean(dim=(1, 2, 3, 4))
    )
    tv = (_total_variation(scaled) - target.total_variation).abs()
    return (1.0 - ssim.mean(dim=(1, 2, 3))) + gradient + tv


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
    outside = torch.where(tissue[:, None], 0.0, field).sum(dim=0)
    return outside / torch.where(total > 0, total, torch.ones_like(total))


def moran_loss(field: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    r""":math:`-I_g`, Moran's I of each gene (Eq. 6-7) with sparse spatial weights ``(N, N)``."""
    return -morans_i(field, weights)


def poisson_loss(
    counts: torch.Tensor, expected: torch.Tensor, spots: torch.Tensor | None = None
) -> torch.Tensor:
    r"""Mean Poisson deviance per spot of the observations under the forward model.

    .. math::

        \mathcal L_\text{Poisson} = \frac{1}{N} \sum_{i \in S} \Big(\mu_i - x_i + x_i \log\frac{x_i}{\mu_i}\Big)

    It is zero when :math:`\mu = x`, identifies the diffusion kernel (background spots must be explained by
    molecules from the tissue), and is finite wherever :math:`\mu > 0` or :math:`x = 0`.

    Parameters
    ----------
    counts, expected
        ``(N, G)`` observations :math:`x` and expected counts :math:`\mu = K^\top z`.
    spots
        ``(N,)`` boolean :math:`S`, the spots measured (default: all); the sum is still divided by :math:`N`.
    """
    if spots is not None:
        counts, expected = counts[spots], expected[spots]
    tiny = torch.finfo(expected.dtype).tiny
    log_ratio = torch.where(
        counts > 0,
        torch.log(counts.clamp_min(tiny)) - torch.log(expected.clamp_min(tiny)),
        torch.zeros_like(counts),
    )
    n_spots = counts.shape[0] if spots is None else spots.shape[0]
    return (expected - counts + counts * log_ratio).sum(dim=0) / n_spots


def gaussian_prior_loss(params: torch.Tensor, centre: torch.Tensor, sd: float, n_spots: int) -> torch.Tensor:
    r"""Negative log density of an isotropic Gaussian prior, per spot as :func:`poisson_loss` is.

    .. math::

        \mathcal L_\text{prior} = \frac{1}{N} \sum_p \frac{(\theta_{g,p} - \theta^0_{g,p})^2}{2 \sigma^2}

    Weighted as the Poisson term is, the two are a log posterior: the prior's pull is that of :math:`1 /
    \sigma^2` observations, so a gene whose counts say much about its parameters moves them freely, and one
    whose counts say little keeps them near :math:`\theta^0`.

    Parameters
    ----------
    params, centre
        ``(G, P)`` parameters :math:`\theta` and the prior's centres :math:`\theta^0`.
    sd
        The prior's standard deviation :math:`\sigma`, in the parameters' units.
    n_spots
        :math:`N`, the spots the Poisson term divides by.
    """
    return ((params - centre) ** 2).sum(dim=1) / (2.0 * sd**2 * n_spots)
