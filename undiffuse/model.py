r"""The diffusion model of a batch of genes: start field, kernel, forward model and deconvolution.

A :class:`DiffusionModel` holds a kernel's log weights and the bleeding shares of each gene, on a
:class:`~undiffuse.geometry.SampleGeometry`. It has no optimiser: :mod:`undiffuse.trainer` learns its
parameters, and :func:`undiffuse.correct.rediffuse` and :func:`undiffuse.correct.deconvolve_known_kernel`
use it with given ones.

Shapes: ``N`` spots, ``G`` genes, ``M`` distances, ``K + 1`` cost features.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from .diffusion import expected_counts
from .geometry import SampleGeometry
from .operators import Kernel, LogWeights
from .ot.cost import cost_weights
from .ot.deconvolution import deconvolve_em
from .ot.prior import (
    CentredPrior,
    GammaFieldPrior,
    blur_attenuation,
    centred_strength,
    empirical_strength,
    local_excess_variation,
)
from .ot.quantile import dequantised_order_statistics, quantile, soft_threshold

#: Share of each gene's total that the EM start spreads evenly over the tissue (:meth:`SoftStart.start`).
START_FLOOR = 0.01


def gibbs_log_weights(geometry: SampleGeometry, phi: torch.Tensor, reg: torch.Tensor) -> LogWeights:
    r"""Log weights :math:`-f_\phi(d, c)\, d^2 / r` of the Gibbs kernel of the learned transport cost.

    Parameters
    ----------
    geometry
        Gives f_phi's features (radial basis over the sample's diffusion range, boundary-crossing flag).
    phi
        ``(G, K + 1)`` cost coefficients.
    reg
        ``(G,)`` entropic regularisation :math:`r`.
    """

    def log_weights(distance: torch.Tensor, crosses: torch.Tensor) -> torch.Tensor:
        weights = cost_weights(geometry.features(distance, crosses), phi)
        return -weights * distance[:, None] ** 2 / reg[None, :]

    return log_weights


class SoftStart:
    """The seed's soft threshold of a batch's counts, and the EM start built from it.

    Parameters
    ----------
    counts
        ``(N, G)`` observed counts on all spots.
    tissue
        ``(N,)`` boolean tissue mask.
    beta
        Sharpness of the soft threshold.
    """

    def __init__(self, counts: torch.Tensor, tissue: torch.Tensor, beta: float) -> None:
        self.counts, self.tissue, self.beta = counts, tissue, beta
        # Quantiles are taken over tissue spots: background counts are diffused molecules.
        self.order_statistics = dequantised_order_statistics(counts[tissue])
        self.value_range = counts.amax(dim=0) - counts.amin(dim=0)
        self.totals = counts.sum(dim=0)

    def threshold(self, q: torch.Tensor) -> torch.Tensor:
        """``(G,)`` the counts at quantile level ``q`` of each gene's tissue spots (differentiable in ``q``)."""
        return quantile(self.counts, q, order_statistics=self.order_statistics)

    def soft(self, q: torch.Tensor) -> torch.Tensor:
        """``(N, G)`` the soft-thresholded counts :math:`b`, on all spots."""
        return soft_threshold(self.counts, self.threshold(q), beta=self.beta, value_range=self.value_range)

    def start(self, soft: torch.Tensor) -> torch.Tensor:
        """``(N, G)`` ``soft`` confined to tissue and rescaled to each gene's total, with :data:`START_FLOOR` of
        the total spread evenly over the tissue; a gene with no counts in tissue starts uniform over the tissue.

        EM updates are multiplicative, so a spot the threshold empties could regrow only through the
        smoothness prior's pull towards its neighbours, which is slow where they are emptied too: the floor
        leaves every tissue spot a value from which the counts can raise it again."""
        inside = soft * self.tissue[:, None]
        mass = inside.sum(dim=0)
        uniform = self.tissue[:, None].to(soft.dtype).expand_as(soft) / self.tissue.sum()
        shape = torch.where(mass > 0, inside / torch.where(mass > 0, mass, 1.0), uniform)
        return torch.lerp(shape, uniform, START_FLOOR) * self.totals


@dataclass
class DiffusionModel:
    """Per-gene diffusion :math:`\\mu = (1 - b - d) z + b P^\\top z + d \\bar z` on a sample.

    Attributes
    ----------
    geometry
        The sample.
    log_weights
        The local kernel's log weights (:data:`undiffuse.operators.LogWeights`).
    bleed, distal
        ``(G,)`` shares :math:`b` and :math:`d`.
    tissue_dependent
        Whether the kernel towards background spots is one of its own
        (:meth:`undiffuse.operators.DiffusionOperator.bind`).
    """

    geometry: SampleGeometry
    log_weights: LogWeights
    bleed: torch.Tensor
    distal: torch.Tensor
    tissue_dependent: bool | None = None

    @cached_property
    def kernel(self) -> Kernel:
        """The row-normalised kernel :math:`P`, bound once per model."""
        return self.geometry.operator.bind(self.log_weights, tissue_dependent=self.tissue_dependent)

    def forward(self, field: torch.Tensor) -> torch.Tensor:
        """``(N, G)`` expected counts of a field."""
        return expected_counts(field, self.kernel, self.bleed, self.distal)

    def deconvolve(
        self,
        counts: torch.Tensor,
        start: torch.Tensor,
        *,
        n_iter: int,
        n_grad_iterations: int | None = None,
        prior: GammaFieldPrior | None = None,
        accelerate: bool = False,
    ) -> torch.Tensor:
        """EM deconvolution from ``start`` (:func:`undiffuse.ot.deconvolution.deconvolve_em`)."""
        return deconvolve_em(
            counts,
            start,
            self.kernel,
            self.bleed,
            self.distal,
            n_iter=n_iter,
            n_grad_iterations=n_grad_iterations,
            prior=prior,
            accelerate=accelerate,
        )

    @torch.no_grad()
    def smoothness_prior(self, counts: torch.Tensor, strength: float | str) -> GammaFieldPrior | None:
        """The Gamma Markov random field prior of :mod:`undiffuse.ot.prior` for these genes.

        ``strength``: ``"auto"`` estimates it per gene by empirical Bayes under this model's blur; a number
        sets it for every gene; 0 gives ``None`` (maximum likelihood).
        """
        neighbours = self.geometry.neighbours
        if strength == 0:
            return None
        if strength != "auto":
            return GammaFieldPrior(
                neighbours, torch.full((counts.shape[1],), float(strength), dtype=counts.dtype)
            )
        excess, energy = local_excess_variation(counts, neighbours)
        attenuation = blur_attenuation(self.forward, neighbours, counts)
        return GammaFieldPrior(neighbours, empirical_strength(excess, energy, attenuation))

    @torch.no_grad()
    def reference_prior(self, counts: torch.Tensor, centre: torch.Tensor) -> CentredPrior:
        """The Gamma prior centred on the part of the field a reference explains
        (:class:`~undiffuse.ot.prior.CentredPrior`), its strength by empirical Bayes under this model's blur."""
        strength = centred_strength(counts, centre, self.forward, self.geometry.neighbours.centre)
        return CentredPrior(centre, strength)

    @torch.no_grad()
    def profile(self, distance: torch.Tensor) -> torch.Tensor:
        """``(M, G)`` unnormalised kernel weights against distance inside tissue."""
        flags = torch.zeros(distance.shape, dtype=torch.bool, device=distance.device)
        return torch.exp(self.log_weights(distance, flags))

    @torch.no_grad()
    def diffusion_length(self) -> torch.Tensor:
        """``(G,)`` per-axis RMS displacement of the local kernel on a full lattice neighbourhood (pitches)."""
        distance = self.geometry.reference_distance
        flags = torch.zeros(distance.shape, dtype=torch.bool, device=distance.device)
        weights = torch.softmax(self.log_weights(distance, flags), dim=0)
        return torch.sqrt((weights * distance[:, None] ** 2).sum(dim=0) / 2.0)
