"""The image loss against kornia's own SSIM, Sobel gradient and total variation."""

from __future__ import annotations

import kornia
import pytest
import torch

from undiffuse.losses import ImageTarget, image_loss


def kornia_image_loss(expression: torch.Tensor, intensity: torch.Tensor) -> torch.Tensor:
    """The seed's image term written with kornia's functions, as the loss defines it."""
    peak = expression.amax(dim=(1, 2, 3), keepdim=True)
    scaled = expression / torch.where(peak > 0, peak, torch.ones_like(peak))
    target = intensity.expand_as(scaled)
    ssim = kornia.metrics.ssim(scaled, target, 7).mean(dim=(1, 2, 3))
    gradient = (kornia.filters.spatial_gradient(scaled) - kornia.filters.spatial_gradient(target)).abs()
    n_pixels = scaled.shape[-1] * scaled.shape[-2]
    tv = kornia.losses.total_variation(scaled).reshape(-1) / n_pixels
    tv_target = kornia.losses.total_variation(intensity).reshape(-1) / n_pixels
    return (1.0 - ssim) + gradient.mean(dim=(1, 2, 3, 4)) + (tv - tv_target).abs()


@pytest.mark.slow
def test_image_loss_matches_kornia_and_has_its_gradient():
    generator = torch.Generator().manual_seed(0)
    intensity = torch.rand((1, 1, 23, 31), generator=generator, dtype=torch.float64)
    expression = (torch.rand((4, 1, 23, 31), generator=generator, dtype=torch.float64) * 50).requires_grad_(
        True
    )
    ours = image_loss(expression, ImageTarget.build(intensity))
    reference = kornia_image_loss(expression, intensity)
    torch.testing.assert_close(ours, reference, rtol=1e-9, atol=1e-9)
    (grad_ours,) = torch.autograd.grad(ours.sum(), expression)
    (grad_reference,) = torch.autograd.grad(reference.sum(), expression)
    torch.testing.assert_close(grad_ours, grad_reference, rtol=1e-7, atol=1e-9)
    empty = image_loss(torch.zeros((1, 1, 23, 31), dtype=torch.float64), ImageTarget.build(intensity))
    assert torch.isfinite(empty).all()
