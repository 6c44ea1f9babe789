r"""A spatial smoothness prior for the EM deconvolution: a Gamma Markov random field.

Maximum-likelihood EM (:mod:`undiffuse.ot.deconvolution`) fits counting noise as well as signal: where a
gene's counts are low, sharpening the blurred field amplifies Poisson noise, and the deconvolved field
correlates less with the truth than the blurred one does. Neighbouring spots hold similar tissue, so the prior
puts each tissue spot's true expression near the weighted mean of its tissue neighbours,

.. math::

    z_i \mid z_{\mathcal N(i)} \sim \mathrm{Gamma}\big(\alpha + 1,\ \mathrm{rate} = \alpha / m_i\big),
    \qquad m_i = \sum_{j \in \mathcal N(i)} w_{ij} z_j , \quad \sum_j w_{ij} = 1,

whose mode is :math:`m_i` and whose coefficient of variation is about :math:`1 / \sqrt\alpha`
(:math:`\mathcal N(i)`: the first ring of tissue neighbours). Equal weights pull expression across the border
between two tissue domains (a marker leaks into the next domain); bilateral weights
(:func:`bilateral_weights`) give little weight to a neighbour whose expression profile differs, so the prior
smooths within domains and keeps their borders. With :math:`m` taken from the current iterate
(Green's one-step-late EM), the M-step maximises
:math:`y_i \log z_i - z_i + \alpha \log z_i - \alpha z_i / m_i` over :math:`z_i`, where :math:`y` is the
maximum-likelihood update (the expected number of molecules that came from each spot):

.. math::

    z_i \leftarrow m_i \, \frac{y_i + \alpha}{m_i + \alpha} ,

a shrinkage of :math:`y_i` towards :math:`m_i` with weight :math:`\alpha / (m_i + \alpha)`: strong where a spot
holds few molecules compared with :math:`\alpha` (counting noise dominates), weak where it holds many. The field
is then rescaled to the gene's total. :math:`\alpha = 0` is maximum likelihood.

The strength is set per gene by empirical Bayes (method of moments, :func:`empirical_strength`): the variance
of a spot's counts around its neighbours' mean, minus the Poisson part, is the prior's
:math:`m^2 / \alpha` after the diffusion has damped it; the damping of such spot-to-spot variation by the
current forward model is measured by blurring a single spot (:func:`blur_attenuation`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..moran import SpatialWeights, spatial_weights
from ..sparse_ops import pull
from ..spatial import distance_to_mask

#: Bounds of the per-gene strength :math:`\alpha`. Above the upper one the field is, up to the data, the
#: neighbour mean; below the lower one the prior hardly acts.
MIN_STRENGTH = 0.1
MAX_STRENGTH = 1e4


@dataclass(frozen=True)
class TissueNeighbours:
    """The first ring of tissue neighbours of each tissue spot, row-normalised, and a central tissue spot.

    The weights are equal, or bilateral (:func:`bilateral_weights`): lower towards neighbours whose expression
    profile differs, so that the prior does not smooth across the border between two tissue domains.

    Attributes
    ----------
    weights
        Row-normalised first-ring weights between tissue spots (background spots have empty rows).
    degree
        ``(N,)`` effective number of tissue neighbours of each spot, :math:`1 / \\sum_j w_{ij}^2` (their number
        under equal weights; 0 off tissue).
    centre
        Index of the tissue spot farthest from the background, where the blur of spot-to-spot variation is
        measured.
    """

    weights: SpatialWeights
    degree: torch.Tensor
    centre: int

    @classmethod
    def build(
        cls,
        coords: np.ndarray,
        tissue: np.ndarray,
        *,
        profiles: np.ndarray | None = None,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> TissueNeighbours:
        """From ``(N, 2)`` coordinates in spot pitches and an ``(N,)`` tissue mask.

        ``profiles``: ``(N, K)`` expression profiles of the spots (:func:`bilateral_weights`); ``None`` weighs
        every neighbour alike.
        """
        tissue = np.asarray(tissue, dtype=bool)
        inside = torch.as_tensor(np.flatnonzero(tissue))
        # The row-normalised first ring of the tissue spots alone, written back in the sample's spot indices.
        ring = spatial_weights(coords[tissue], dtype=torch.float64)
        weight = ring.weight
        if profiles is not None:
            weight = bilateral_weights(ring, np.asarray(profiles, dtype=np.float64)[tissue])
        source = inside[ring.source]
        weights = SpatialWeights(source, inside[ring.target], weight.to(dtype), len(tissue)).to(device)
        # The effective number of neighbours, 1 / sum_j w_ij^2: the variance of the weighted mean of
        # independent neighbours is that of one divided by it (the count for equal weights, kept exact).
        per_edge = torch.ones_like(weight) if profiles is None else weight.square()
        degree = torch.zeros(len(tissue), dtype=torch.float64).index_add(0, source, per_edge)
        if profiles is not None:
            degree = torch.where(degree > 0, 1.0 / degree.clamp_min(1e-300), 0.0)
        degree = degree.to(dtype)
        if tissue.all():
            centre = int(np.argmin(((coords - coords.mean(axis=0)) ** 2).sum(axis=1)))
        else:
            centre = int(np.argmax(np.where(tissue, distance_to_mask(coords, ~tissue), -1.0)))
        return cls(weights, degree.to(device), centre)

    def mean(self, field: torch.Tensor) -> torch.Tensor:
        """``(N, G)`` mean of each spot's tissue neighbours (0 where it has none)."""
        w = self.weights
        return pull(w.weight.to(field.dtype)[:, None], (w.source, w.target), field)

    def deviation_energy(self, field: torch.Tensor) -> torch.Tensor:
        """``(G,)`` sum over tissue spots with neighbours of the squared deviation from the neighbour mean."""
        inner = (self.degree > 0)[:, None]
        return torch.where(inner, field - self.mean(field), torch.zeros_like(field)).square().sum(dim=0)


def bilateral_weights(ring: SpatialWeights, profiles: np.ndarray) -> torch.Tensor:
    r"""``(E,)`` row-normalised bilateral weights of the edges of ``ring`` (float64).

    .. math::

        w_{ij} \propto \exp\big(-d_{ij}^2 / (2 h^2)\big)

    with :math:`d_{ij}` the Euclidean distance between the profiles of spots :math:`i` and :math:`j` and
    :math:`h` the median of :math:`d` over the edges: a typical neighbour keeps a weight near the uniform one,
    a neighbour across a domain border (several :math:`h` away) almost none. Every spot keeps its closest
    neighbour (the exponent is taken relative to it), so no spot loses its neighbours. Equal profiles (or a
    median of 0) give equal weights, the limit :math:`h \to \infty`.

    Parameters
    ----------
    ring
        The first-ring graph (its own weights are ignored).
    profiles
        ``(N, K)`` expression profiles of the graph's spots (:func:`undiffuse.geometry.expression_profiles`).
    """
    source, target = ring.source.numpy(), ring.target.numpy()
    squared = ((profiles[source] - profiles[target]) ** 2).sum(axis=1)
    bandwidth2 = float(np.median(squared)) if len(squared) else 0.0
    if not bandwidth2 > 0:
        logit = np.zeros_like(squared)
    else:
        closest = np.full(ring.n_spots, np.inf)
        np.minimum.at(closest, source, squared)
        logit = -(squared - closest[source]) / (2.0 * bandwidth2)
    weight = np.exp(logit)
    rows = np.bincount(source, weights=weight, minlength=ring.n_spots)
    return torch.as_tensor(weight / rows[source])


@dataclass(frozen=True)
class GammaFieldPrior:
    r"""The prior of a batch of genes: the neighbour graph and the per-gene strengths.

    Attributes
    ----------
    neighbours
        The tissue neighbour graph.
    strength
        ``(G,)`` :math:`\alpha \ge 0` (detached: it is estimated, not learned).
    """

    neighbours: TissueNeighbours
    strength: torch.Tensor

    def update(self, expected_sources: torch.Tensor, field: torch.Tensor) -> torch.Tensor:
        r"""The M-step with the prior, :math:`z_i \leftarrow m_i (y_i + \alpha) / (m_i + \alpha)`.

        Parameters
        ----------
        expected_sources
            ``(N, G)`` the maximum-likelihood update :math:`y`.
        field
            ``(N, G)`` the current iterate, whose neighbour means :math:`m` centre the prior.

        Returns
        -------
        ``(N, G)`` the updated field (not yet rescaled to the totals). Spots whose neighbours hold nothing keep
        :math:`y`: an isolated spot is not pulled to zero.
        """
        return shrink(expected_sources, self.neighbours.mean(field), self.strength)


def shrink(expected_sources: torch.Tensor, centre: torch.Tensor, strength: torch.Tensor) -> torch.Tensor:
    r"""``(N, G)`` the M-step under a Gamma prior of mode ``centre``, :math:`m (y + \alpha) / (m + \alpha)`;
    spots whose centre is zero keep :math:`y`."""
    strength = strength.to(expected_sources.dtype)
    tiny = torch.finfo(expected_sources.dtype).tiny
    shrunk = centre * (expected_sources + strength) / (centre + strength).clamp_min(tiny)
    return torch.where(centre > 0, shrunk, expected_sources)


@dataclass(frozen=True)
class CentredPrior:
    r"""A Gamma prior of fixed mode: :math:`z_i \sim \mathrm{Gamma}(\alpha + 1, \mathrm{rate} = \alpha / m_i)`
    with :math:`m` the part of the field that a reference's cell types explain
    (:func:`undiffuse.ot.programmes.reference_centre`), instead of the neighbours' mean. It pulls no spot
    towards its neighbours, so it keeps domain borders, and it keeps the share of expression that the
    reference's profiles explain high while leaving each spot :math:`1 / \sqrt\alpha` relative freedom.

    Attributes
    ----------
    centre
        ``(N, G)`` the mode :math:`m` (zero off tissue).
    strength
        ``(G,)`` :math:`\alpha` (:func:`centred_strength`).
    """

    centre: torch.Tensor
    strength: torch.Tensor

    def update(self, expected_sources: torch.Tensor, field: torch.Tensor) -> torch.Tensor:
        """The M-step, as :meth:`GammaFieldPrior.update` with the fixed centre."""
        return shrink(expected_sources, self.centre, self.strength)


def centred_strength(
    counts: torch.Tensor,
    centre: torch.Tensor,
    forward: Callable[[torch.Tensor], torch.Tensor],
    impulse_spot: int,
) -> torch.Tensor:
    r"""``(G,)`` strength :math:`\alpha` of a :class:`CentredPrior` by the method of moments.

    The counts deviate from the blurred centre by the blurred deviation of the field plus Poisson noise,
    :math:`x - K^\top m = K^\top (z - m) + \eta`. With :math:`\mathrm{Var}(z_i - m_i) = m_i^2 / \alpha`,
    independent between spots, and the blur of a single spot :math:`a = \|K^\top e_c\|^2` alike everywhere,

    .. math::

        \frac{1}{\alpha} = \frac{\sum_i (x_i - (K^\top m)_i)^2 - \sum_i x_i}{a \sum_i m_i^2},

    clipped to [:data:`MIN_STRENGTH`, :data:`MAX_STRENGTH`].

    Parameters
    ----------
    counts
        ``(N, G)`` observations.
    centre
        ``(N, G)`` the prior's mode.
    forward
        The forward model, ``(N, G)`` field -> ``(N, G)`` expected counts.
    impulse_spot
        A tissue spot away from the border, where the blur of a single spot is measured.
    """
    tiny = torch.finfo(counts.dtype).tiny
    excess = (counts - forward(centre)).square().sum(dim=0) - counts.sum(dim=0)
    impulse = torch.zeros_like(counts)
    impulse[impulse_spot] = 1.0
    attenuation = forward(impulse).square().sum(dim=0)
    relative = excess.clamp_min(0.0) / (attenuation * centre.square().sum(dim=0)).clamp_min(tiny)
    return (1.0 / relative.clamp_min(tiny)).clamp(MIN_STRENGTH, MAX_STRENGTH)


def local_excess_variation(
    counts: torch.Tensor, neighbours: TissueNeighbours
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Spot-to-spot variation of the counts beyond Poisson noise, and the squared neighbour means.

    Over tissue spots with tissue neighbours, :math:`x_i - \bar x_{\mathcal N(i)}` has variance
    :math:`\mathrm{Var}_\text{signal} + \mu_i + \bar\mu_{\mathcal N(i)} / |\mathcal N(i)|` under Poisson noise;
    the noise part is estimated by :math:`x_i + \bar x_{\mathcal N(i)} / |\mathcal N(i)|`.

    Returns
    -------
    excess, energy
        ``(G,)`` :math:`\sum_i (x_i - \bar x_i)^2 - \text{noise}` and :math:`\sum_i \bar x_i^2 - \text{noise of}
        \ \bar x`.
    """
    inner = (neighbours.degree > 0)[:, None]
    centre = neighbours.mean(counts)
    per_neighbour = centre / neighbours.degree.clamp_min(1.0)[:, None]
    zero = torch.zeros_like(counts)
    noise = torch.where(inner, counts + per_neighbour, zero).sum(dim=0)
    excess = neighbours.deviation_energy(counts) - noise
    energy = torch.where(inner, centre.square() - per_neighbour, zero).sum(dim=0)
    return excess, energy


def blur_attenuation(
    forward: Callable[[torch.Tensor], torch.Tensor], neighbours: TissueNeighbours, like: torch.Tensor
) -> torch.Tensor:
    r"""``(G,)`` share of spot-to-spot variance that survives the forward model.

    For white variation :math:`\varepsilon` of the field and a forward operator :math:`K^\top` that is the same
    everywhere, :math:`\mathbb E \|D K^\top \varepsilon\|^2 / \mathbb E \|D \varepsilon\|^2 =
    \|D K^\top e_c\|^2 / \|D e_c\|^2` with :math:`D` the deviation from the neighbour mean and :math:`e_c` a
    single spot at the centre of the tissue.

    Parameters
    ----------
    forward
        The forward model, ``(N, G)`` field -> ``(N, G)`` expected counts.
    neighbours
        The tissue neighbour graph (its ``centre`` receives the impulse).
    like
        ``(N, G)`` any field of the batch: the impulse takes its shape, type and device.
    """
    impulse = torch.zeros_like(like)
    impulse[neighbours.centre] = 1.0
    blurred = neighbours.deviation_energy(forward(impulse))
    return blurred / neighbours.deviation_energy(impulse).clamp_min(torch.finfo(like.dtype).tiny)


def empirical_strength(excess: torch.Tensor, energy: torch.Tensor, attenuation: torch.Tensor) -> torch.Tensor:
    r"""``(G,)`` prior strength :math:`\alpha` by the method of moments.

    .. math::

        \frac{1}{\alpha} = \frac{\text{excess} / a}{\text{energy}}

    with :math:`a` the :func:`blur_attenuation`, clipped to [:data:`MIN_STRENGTH`, :data:`MAX_STRENGTH`]: a gene
    whose counts vary no more than Poisson noise gets the strongest prior.
    """
    tiny = torch.finfo(excess.dtype).tiny
    relative = excess.clamp_min(0.0) / attenuation.clamp_min(tiny) / energy.clamp_min(tiny)
    return (1.0 / relative.clamp_min(tiny)).clamp(MIN_STRENGTH, MAX_STRENGTH)
