r"""Learning the per-gene diffusion model of a batch of genes end to end.

Parameters are unconstrained tensors mapped into range: :math:`q = \sigma(\text{q\_logit})`,
:math:`r = r_\min + \exp(\log r)` (a scale learns in relative steps), :math:`(1 - b - d, b, d) =
\mathrm{softmax}(\text{share\_logits})`, :math:`W = \exp(F \phi)`. Each epoch runs a few differentiated EM
updates from the soft-thresholded start (the EM state is carried across epochs as the start times a fixed
factor, so gradients reach :math:`q` while autograd memory stays bounded) and takes one Adam step on

.. math::

    \mathcal L = \lambda_1 \mathcal L_\text{image}(z) + \lambda_2 \mathcal L_\text{out}(b)
    + \lambda_3 \mathcal L_\text{Moran}(z) + \lambda_4 \mathcal L_\text{Poisson}(x, K^\top z)
    + \lambda_5 \mathcal L_\text{prior}(\log r, \phi),

each a sum of per-gene terms (:mod:`undiffuse.losses`), so that a gene's result does not depend on the other
genes of its batch. The out-of-tissue term is taken on the soft-thresholded counts :math:`b` before they are
confined to tissue, where it can be non-zero: it is the share of a gene's thresholded mass that the threshold
leaves on background spots. The last term is a Gaussian prior on each gene's kernel parameters around the kernel
the QC measured (:data:`KERNEL_PRIOR_SD`; :func:`undiffuse.losses.gaussian_prior_loss`), weighted as the Poisson
term so that the two are a posterior: a gene whose background counts say little about its kernel (a marker of
a domain far from the tissue edge, a gene of a few hundred counts) keeps the sample's instead of drifting to a
degenerate one. The kernel is trained against the maximum-likelihood field; the smoothness prior
shapes only the output (a prior inside training would stand in for part of the blur).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import pandas as pd
import torch
from tqdm.auto import tqdm

from .diffusion import profile_log_weights
from .geometry import SampleGeometry
from .losses import gaussian_prior_loss, image_loss, moran_loss, out_of_tissue_loss, poisson_loss
from .model import DiffusionModel, SoftStart, gibbs_log_weights
from .ot.cost import matching_coefficients
from .ot.deconvolution import through_start, with_totals
from .qc import decay_floors

if TYPE_CHECKING:
    from .correct import CorrectionConfig

LOSS_TERMS = ("image", "out_of_tissue", "moran", "poisson", "kernel_prior")
#: Standard deviation of the prior on each gene's kernel parameters (log r and f_phi's coefficients) around the
#: kernel training starts from (:func:`initial_cost`): a length within about 30% of the sample's costs little.
KERNEL_PRIOR_SD = 0.5
#: Fewest background spots from which the distal share is measured (:func:`initial_distal`), the share taken
#: without them, and the range a measured share is clipped to.
DISTAL_MIN_SPOTS = 20
DISTAL_FALLBACK = 0.02
DISTAL_INIT_RANGE = (1e-3, 0.5)


class KernelTrainer:
    """The learnable parameters of a batch of genes and their training loop.

    Parameters
    ----------
    geometry
        The sample.
    counts
        ``(N, G)`` observed counts on all spots.
    q_init
        ``(G,)`` initial quantile levels (from the Moran's I scan).
    config
        The correction's options.
    """

    R_MIN = 1e-3

    def __init__(
        self, geometry: SampleGeometry, counts: torch.Tensor, q_init, config: CorrectionConfig
    ) -> None:
        self.geometry = geometry
        self.counts = counts
        self.config = config
        n_genes = counts.shape[1]
        dtype, device = counts.dtype, counts.device
        self.soft_start = SoftStart(counts, geometry.tissue, config.beta)
        self.totals = self.soft_start.totals
        self.q_init = torch.as_tensor(q_init, dtype=dtype, device=device)

        r0, phi0 = initial_cost(config, geometry)
        self.q_logit = torch.logit(self.q_init.clamp(0.01, 0.99)).clone().requires_grad_(True)
        self.log_r = torch.full((n_genes,), math.log(max(r0 - self.R_MIN, 1e-12)), dtype=dtype, device=device)
        self.log_r.requires_grad_(True)
        self.phi = phi0.to(dtype).expand(n_genes, -1).clone().requires_grad_(True)
        #: The kernel prior's centre: log r and f_phi's coefficients at the start.
        self.kernel_centre = self._kernel_parameters().detach()
        distal0 = initial_distal(config, geometry, counts)
        bleed0 = torch.full_like(distal0, config.bleed_init)
        shares0 = torch.stack([1.0 - bleed0 - distal0, bleed0, distal0], dim=1).clamp_min(1e-4)
        self.share_logits = torch.log(shares0).requires_grad_(True)
        self.optimizer = Adam([self.q_logit, self.log_r, self.phi, self.share_logits], lr=config.lr)
        background = ~geometry.tissue
        #: Spots of the Poisson term (``None``: all): see ``CorrectionConfig.poisson_spots``.
        self.poisson_spots = background if config.poisson_spots == "background" and background.any() else None
        self.weights = dict(config.weights)
        if self.weights["image"] > 0 and geometry.raster is None:
            self.weights["image"] = 0.0

    # parameters in range ---------------------------------------------------------------------------------
    @property
    def q(self) -> torch.Tensor:
        return torch.sigmoid(self.q_logit)

    @property
    def reg(self) -> torch.Tensor:
        return self.R_MIN + torch.exp(self.log_r.clamp(max=30.0))

    @property
    def shares(self) -> torch.Tensor:
        return torch.softmax(self.share_logits, dim=1)

    # model ----------------------------------------------------------------------------------------------------
    def model(self, geometry: SampleGeometry | None = None) -> DiffusionModel:
        """The diffusion model at the current parameters, on the training geometry or on ``geometry``."""
        geometry = self.geometry if geometry is None else geometry
        shares = self.shares
        log_weights = gibbs_log_weights(geometry, self.phi, self.reg)
        return DiffusionModel(
            geometry, log_weights, shares[:, 1], shares[:, 2], tissue_dependent=self.config.tissue_cost
        )

    def soft(self) -> torch.Tensor:
        """``(N, G)`` the seed's soft threshold of the counts at the quantile level ``q``, on all spots."""
        return self.soft_start.soft(self.q)

    def start(self, soft: torch.Tensor | None = None) -> torch.Tensor:
        """``(N, G)`` the EM start: the soft threshold confined to tissue, rescaled to each gene's total."""
        return self.soft_start.start(self.soft() if soft is None else soft)

    def losses(
        self, field: torch.Tensor, soft: torch.Tensor, model: DiffusionModel
    ) -> dict[str, torch.Tensor]:
        """The ``(G,)`` loss terms of a deconvolved field."""
        geometry = self.geometry
        zeros = torch.zeros(field.shape[1], dtype=field.dtype, device=field.device)
        terms = dict.fromkeys(LOSS_TERMS, zeros)
        if self.weights["image"] > 0:
            raster, target = geometry.raster
            terms["image"] = image_loss(raster.draw(field), target)
        if self.weights["out_of_tissue"] > 0:
            terms["out_of_tissue"] = out_of_tissue_loss(soft, geometry.tissue)
        if self.weights["moran"] > 0:
            terms["moran"] = moran_loss(field, geometry.moran_weights)
        if self.weights["poisson"] > 0:
            terms["poisson"] = poisson_loss(self.counts, model.forward(field), self.poisson_spots)
        if self.weights["kernel_prior"] > 0:
            terms["kernel_prior"] = gaussian_prior_loss(
                self._kernel_parameters(), self.kernel_centre, KERNEL_PRIOR_SD, self.counts.shape[0]
            )
        return terms

    def _kernel_parameters(self) -> torch.Tensor:
        """``(G, K + 2)`` each gene's kernel parameters: :math:`\\log r`, then f_phi's coefficients."""
        return torch.cat([torch.log(self.reg)[:, None], self.phi], dim=1)

    def fit(self, bar: tqdm) -> pd.DataFrame:
        """Train for ``config.epochs`` epochs; returns the loss history (means over the batch's genes)."""
        rows, carried = [], None
        n_tail = self.config.tail_iterations
        for _ in range(self.config.epochs):
            self.optimizer.zero_grad()
            model = self.model()
            soft = self.soft()
            start = self.start(soft)
            initial = start if carried is None else through_start(start, carried)
            field = model.deconvolve(self.counts, initial, n_iter=n_tail, n_grad_iterations=n_tail)
            carried = field.detach()
            terms = self.losses(field, soft, model)
            total = sum(self.weights[name] * value for name, value in terms.items())
            total.sum().backward()
            self._sanitise_gradients()
            self.optimizer.step()
            row = {name: float(value.detach().mean()) for name, value in terms.items()}
            row["total"] = float(total.detach().mean())
            rows.append(row)
            bar.set_postfix(loss=f"{row['total']:.4g}")
            bar.update()
        return pd.DataFrame(rows, columns=["total", *LOSS_TERMS])

    def _sanitise_gradients(self) -> None:
        # A gene whose counts are all zero has undefined gradients; it must not stall the others.
        for tensor in (self.q_logit, self.log_r, self.phi, self.share_logits):
            if tensor.grad is not None:
                torch.nan_to_num_(tensor.grad, nan=0.0, posinf=0.0, neginf=0.0)

    @torch.no_grad()
    def final(
        self,
        geometry: SampleGeometry | None = None,
        counts: torch.Tensor | None = None,
        *,
        n_iter: int | None = None,
    ) -> tuple[torch.Tensor, pd.DataFrame, torch.Tensor, DiffusionModel]:
        """The corrected field (``n_iter`` maximum a posteriori EM updates from the start, default
        ``config.em_iterations``), the parameter table, the kernel profile samples ``(distances, G)`` and the
        learned model; on the whole sample (``geometry``, ``counts``) when training saw a window of it."""
        geometry = self.geometry if geometry is None else geometry
        soft_start = (
            self.soft_start if counts is None else SoftStart(counts, geometry.tissue, self.config.beta)
        )
        model = self.model(geometry)
        prior = model.smoothness_prior(soft_start.counts, self.config.prior_strength)
        start = soft_start.start(soft_start.soft(self.q))
        field = model.deconvolve(
            soft_start.counts,
            start,
            n_iter=self.config.em_iterations if n_iter is None else n_iter,
            prior=prior,
            accelerate=True,
        )
        field = with_totals(field, soft_start.totals)
        strength = prior.strength if prior is not None else torch.zeros_like(soft_start.totals)
        table = self._parameter_table(model, strength, soft_start.threshold(self.q))
        return field, table, model.profile(geometry.profile_distance), model

    def _parameter_table(
        self, model: DiffusionModel, strength: torch.Tensor, threshold: torch.Tensor
    ) -> pd.DataFrame:
        shares = self.shares
        table = pd.DataFrame(
            {
                "q_init": self.q_init.cpu().numpy(),
                "q": self.q.cpu().numpy(),
                "threshold": threshold.cpu().numpy(),
                "r": self.reg.cpu().numpy(),
                "diffusion_length": model.diffusion_length().cpu().numpy(),
                "bleed": shares[:, 1].cpu().numpy(),
                "distal": shares[:, 2].cpu().numpy(),
                "prior_strength": strength.cpu().numpy(),
            }
        )
        for k in range(self.phi.shape[1]):
            table[f"phi_{k}"] = self.phi[:, k].cpu().numpy()
        return table


class Adam:
    r"""Adam (Kingma & Ba, 2015) with its usual defaults, element-wise, as ``torch.optim.Adam`` computes it.

    ``torch.optim`` imports the TorchDynamo compiler on first use, seconds in every correction process; the
    update itself is a few element-wise operations:

    .. math::

        m \leftarrow \beta_1 m + (1 - \beta_1) g, \quad v \leftarrow \beta_2 v + (1 - \beta_2) g^2, \quad
        \theta \leftarrow \theta - \frac{\eta}{1 - \beta_1^t}\,
        \frac{m}{\sqrt{v / (1 - \beta_2^t)} + \epsilon}.

    Parameters
    ----------
    params
        Leaf tensors to optimise.
    lr
        Learning rate :math:`\eta`.
    """

    def __init__(
        self,
        params: list[torch.Tensor],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        self.params, self.lr, self.betas, self.eps = params, lr, betas, eps
        self.moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
        self.steps = 0

    def zero_grad(self) -> None:
        for param in self.params:
            param.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self.steps += 1
        beta1, beta2 = self.betas
        step_size = self.lr / (1 - beta1**self.steps)
        bias_correction2 = math.sqrt(1 - beta2**self.steps)
        for param, (mean, square) in zip(self.params, self.moments, strict=True):
            if param.grad is None:
                continue
            mean.lerp_(param.grad, 1 - beta1)
            square.mul_(beta2).addcmul_(param.grad, param.grad, value=1 - beta2)
            param.addcdiv_(mean, (square.sqrt() / bias_correction2).add_(self.eps), value=-step_size)


def initial_distal(config: CorrectionConfig, geometry: SampleGeometry, counts: torch.Tensor) -> torch.Tensor:
    r"""``(G,)`` initial uniform (distal) shares :math:`d`.

    ``config.distal_init == "background"`` measures each gene's floor :math:`f`, the level its background counts
    keep far from the tissue, on which the forward model leaves :math:`d\, Z / N` per spot (:math:`Z` the
    gene's total, :math:`N` the spots): :math:`\hat d = (f + \tfrac{1}{2n}) N / Z` over :math:`n` spots (half
    a count keeps genes with no background counts off zero), clipped to :data:`DISTAL_INIT_RANGE` and to half of
    what the local share leaves.

    - With the QC's fit of the background decay (:attr:`~undiffuse.geometry.SampleGeometry.decay_kernel`),
      :math:`f` is the floor of the same half-plane decay fitted to the gene's counts on all background spots,
      its kernel family and scale those the QC fitted to the sample's total counts
      (:func:`undiffuse.qc.decay_floors`). A heavy tail still reaches the spots beyond the diffusion range,
      and a sample may have few of them.
    - Without it, :math:`f` is the mean of the background spots beyond the diffusion range
      (:attr:`~undiffuse.geometry.SampleGeometry.reach`), where a Gaussian-like kernel leaves nothing.

    With fewer than :data:`DISTAL_MIN_SPOTS` spots to measure on it falls back to :data:`DISTAL_FALLBACK`; a
    number is taken for every gene. Started from a share far from the truth, training first widens the local
    kernel to explain the background and needs many epochs to undo it.
    """
    n_genes, dtype, device = counts.shape[1], counts.dtype, counts.device
    if config.distal_init != "background":
        return torch.full((n_genes,), float(config.distal_init), dtype=dtype, device=device)
    observed, distance = counts[~geometry.tissue], geometry.background_distance
    if geometry.decay_kernel is None:
        far = distance > geometry.reach
        observed = observed[torch.as_tensor(far, device=device)]
    n_measured = observed.shape[0]
    if n_measured < DISTAL_MIN_SPOTS:
        return torch.full((n_genes,), DISTAL_FALLBACK, dtype=dtype, device=device)
    if geometry.decay_kernel is None:
        floors = observed.mean(dim=0).cpu().numpy()
    else:
        floors = decay_floors(distance, observed.cpu().numpy(), *geometry.decay_kernel)
    level = torch.as_tensor(floors, dtype=dtype, device=device).clamp_min(0.0) + 0.5 / n_measured
    share = level * counts.shape[0] / counts.sum(dim=0).clamp_min(1.0)
    low, high = DISTAL_INIT_RANGE
    return share.clamp(low, min(high, 0.5 * (1.0 - config.bleed_init)))


def initial_cost(config: CorrectionConfig, geometry: SampleGeometry) -> tuple[float, torch.Tensor]:
    r"""The kernel training starts from: :math:`r` and f_phi's ``(K + 1,)`` coefficients, the same for every gene.

    ``config.r_init == "qc"`` starts from the kernel the QC measured on the background decay:
    :math:`r = 2 s^2` from its Gaussian-equivalent scale :math:`s`, and the coefficients whose Gibbs kernel has
    the radial profile of the family that fits the decay best, at that family's scale
    (:func:`undiffuse.ot.cost.matching_coefficients`, on the lattice neighbourhood the diffusion length is
    measured on), so that a heavy-tailed kernel starts heavy-tailed. Without a fitted decay the coefficients are
    0 (the seed's Gaussian heat kernel :math:`W = 1`), with :math:`r = 1` without QC; a number sets :math:`r`,
    with coefficients 0. The boundary-crossing coefficient always starts at 0.
    """
    n_features = geometry.features(
        torch.zeros(1, dtype=geometry.dtype), torch.zeros(1, dtype=torch.bool)
    ).shape[1]
    phi = torch.zeros(n_features, dtype=geometry.dtype, device=geometry.device)
    if config.r_init != "qc":
        return float(config.r_init), phi
    if not geometry.diffusion_scale:
        return 1.0, phi
    reg = 2.0 * float(geometry.diffusion_scale) ** 2
    if geometry.decay_kernel is not None:
        kind, scale = geometry.decay_kernel
        distance = geometry.reference_distance
        distance = distance[distance > 0]
        log_weights = profile_log_weights(distance, distance.new_tensor([scale]), kind)[:, 0]
        basis = geometry.features(distance, torch.zeros_like(distance, dtype=torch.bool))[:, :-1]
        phi[:-1] = matching_coefficients(basis, distance, log_weights, reg)
    return reg, phi
