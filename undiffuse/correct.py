r"""Correct lateral diffusion: learn the diffusion kernel per gene, then undo it.

For each gene :math:`g` with counts :math:`x_g` on all :math:`N` spots, the correction learns, end to end in
PyTorch,

- the cost weights :math:`W = f_{\phi_g}(d, \text{tissue})` of :mod:`undiffuse.ot.cost` (initialised to 1),
  giving the cost :math:`M = W \odot D^2` on neighbour pairs within the cutoff radius;
- the quantile level :math:`q_g` of the soft threshold
  :math:`b_g = \sigma(\beta (x_g - Q_g(q_g)) / \mathrm{range}(x_g)) \odot x_g` (initialised from the Moran's I
  scan; :mod:`undiffuse.ot.quantile` makes :math:`Q_g` differentiable in :math:`q_g`);
- the entropic regularisation :math:`r_g > 0` (initialised to 1): the Gibbs kernel
  :math:`P_g = \mathrm{normalise}(\exp(-M / r_g))` is a heat kernel whose variance is :math:`r_g / 2`;
- in ``deconvolve`` mode, the shares of molecules that stay, bleed locally (:math:`b_g`) and spread uniformly
  (:math:`d_g`), as SpotClean models bleeding.

In ``deconvolve`` mode a spatial smoothness prior (:mod:`undiffuse.ot.prior`, a Gamma Markov random field whose
strength is set per gene by empirical Bayes) turns the final EM into maximum a posteriori estimation, which
keeps counting noise from being amplified. Training fits the kernel to the maximum-likelihood field: a prior
that smooths the field would stand in for part of the blur and shrink the learned bleeding.

Two modes:

``deconvolve`` (default)
    :math:`P_g` is the forward diffusion model :math:`x_g \sim \mathrm{Poisson}(K_g^\top z_g)`
    (:mod:`undiffuse.diffusion`). The true field :math:`z_g` is recovered by EM (iterated semi-relaxed
    Sinkhorn, :mod:`undiffuse.ot.deconvolution`), started from :math:`b_g` restricted to tissue and rescaled to
    the gene's total; every update keeps the total and the confinement to tissue. A Poisson data-fidelity term
    identifies the kernel: background spots hold no true expression, so their counts must be explained by
    molecules that diffused out of the tissue.
``balanced``
    The seed's formulation: per gene, balanced entropic OT between :math:`a = x_g / \sum x_g` and
    :math:`b = b_g / \sum b_g` with cost :math:`M` (:func:`undiffuse.ot.sinkhorn.sinkhorn_log`, which matches
    ``ot.bregman.sinkhorn_stabilized``), and the output :math:`(\sum x_g)\, \gamma^\top \mathbf 1`. Because the
    target marginal is fixed, this output **equals the normalised soft-thresholded input** up to the solver's
    tolerance, whatever :math:`W` and :math:`r`: only :math:`q` changes the result. The mode is kept because
    it is faithful to the seed design; use ``deconvolve`` to correct diffusion.

The loss is a sum of per-gene terms (:mod:`undiffuse.losses`), so each gene's result is independent of the
other genes processed with it. Training differentiates a bounded tail of solver iterations per epoch (EM
state is carried across epochs), so autograd memory does not grow with the number of iterations; the output
is then computed afresh with the learned parameters.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData
from tqdm.auto import tqdm

from .diffusion import expected_counts, normalise_rows
from .errors import ConfigError, InputError
from .losses import image_loss, moran_loss, out_of_tissue_loss, poisson_loss
from .memory import heap_reuse
from .moran import SpatialWeights, spatial_weights
from .ot.cost import N_RADIAL_BASIS, cost_weights, gibbs_log_weights, pair_features
from .ot.deconvolution import deconvolve_em, through_start
from .ot.prior import (
    GammaFieldPrior,
    TissueNeighbours,
    blur_attenuation,
    empirical_strength,
    local_excess_variation,
)
from .ot.quantile import dequantised_order_statistics, quantile, soft_threshold
from .ot.sinkhorn import sinkhorn_log
from .raster import Raster, build_raster, image_intensity, working_grid
from .sparse_ops import column_sums
from .spatial import neighbour_pairs, pitch_coordinates
from .tissue import pick_image

logger = logging.getLogger(__name__)

Mode = Literal["deconvolve", "balanced"]
LOSS_TERMS = ("image", "out_of_tissue", "moran", "poisson")
#: The seed's weights (all 1) and the Poisson fidelity's.
DEFAULT_WEIGHTS = {"image": 1.0, "out_of_tissue": 1.0, "moran": 1.0, "poisson": 10.0}

#: Neighbour radius (spot pitches) when neither the config nor the QC gives one.
DEFAULT_CUTOFF = 8.0
#: A Gaussian kernel keeps 99% of its mass within this many scales (2-D: sqrt(2 ln 100)).
SCALES_PER_CUTOFF = 3.0
#: Genes optimised together; results do not depend on it, memory does.
DEFAULT_BATCH = 16


@dataclass
class CorrectionConfig:
    """Options of :func:`correct`; the workflow config's ``correct`` section maps onto these fields.

    Attributes
    ----------
    mode
        ``deconvolve`` (default) or ``balanced`` (the seed's formulation; does not move mass, see module doc).
    epochs
        Optimisation steps (Adam) of the per-gene parameters.
    lr
        Adam learning rate.
    em_iterations
        EM updates of the final deconvolution.
    tail_iterations
        Solver iterations differentiated per epoch.
    sinkhorn_iterations
        Iterations of the balanced Sinkhorn solver.
    beta
        Sharpness of the soft threshold.
    weights
        Loss weights ``image``, ``out_of_tissue``, ``moran`` (the seed's, all 1) and ``poisson``.
    cutoff
        Neighbour radius in spot pitches. ``None`` derives it from the QC's background decay
        (``adata.uns['undiffuse']``): the larger of its ``diffusion_cutoff`` and 3 ``diffusion_scale`` (where a
        Gaussian kernel holds 99% of its mass), at most ``max_cutoff``; 8 without QC.
    max_cutoff
        Upper bound of the derived cutoff: memory and time grow with its square.
    r_init
        Initial entropic regularisation: ``"qc"`` (default) takes :math:`2 s^2` from the QC's diffusion scale
        :math:`s`, so that the initial heat kernel has the measured width, and falls back to the seed's 1
        without QC; or a positive number.
    bleed_init, distal_init
        Initial local and uniform bleeding shares (``deconvolve``).
    prior_strength
        Strength :math:`\alpha` of the smoothness prior of ``deconvolve`` (:mod:`undiffuse.ot.prior`):
        ``"auto"`` (default) estimates it per gene by empirical Bayes; a number sets it for every gene; 0 is
        maximum-likelihood EM without a prior.
    image_size
        Longer side of the grid the image loss works on, in pixels.
    batch_genes
        Genes optimised together (memory only; results do not depend on it).
    device
        ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
    seed
        Seed of PyTorch's generators.
    progress
        Show a progress bar.
    """

    mode: Mode = "deconvolve"
    epochs: int = 40
    lr: float = 0.05
    em_iterations: int = 60
    tail_iterations: int = 3
    sinkhorn_iterations: int = 200
    beta: float = 50.0
    weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    cutoff: float | None = None
    r_init: float | str = "qc"
    max_cutoff: float = 10.0
    bleed_init: float = 0.3
    distal_init: float = 0.02
    prior_strength: float | str = "auto"
    image_size: int = 64
    batch_genes: int = DEFAULT_BATCH
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        self.weights = {**DEFAULT_WEIGHTS, **self.weights}
        problems = []
        if self.mode not in ("deconvolve", "balanced"):
            problems.append(f"mode must be 'deconvolve' or 'balanced', not {self.mode!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            problems.append(f"device must be 'auto', 'cpu' or 'cuda', not {self.device!r}")
        for name in ("epochs", "em_iterations", "sinkhorn_iterations", "image_size", "batch_genes"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be at least 1")
        if self.tail_iterations < 1:
            problems.append("tail_iterations must be at least 1")
        if not (self.lr > 0 and self.beta > 0):
            problems.append("lr and beta must be positive")
        if not (0 <= self.bleed_init and 0 <= self.distal_init and self.bleed_init + self.distal_init < 1):
            problems.append("bleed_init and distal_init must be non-negative with a sum below 1")
        if not self.max_cutoff > 0:
            problems.append("max_cutoff must be positive (spot pitches)")
        if self.cutoff is not None and not self.cutoff > 0:
            problems.append("cutoff must be positive (spot pitches)")
        if not (self.r_init == "qc" or (isinstance(self.r_init, int | float) and self.r_init > 0)):
            problems.append("r_init must be a positive number or 'qc'")
        if not (
            self.prior_strength == "auto"
            or (isinstance(self.prior_strength, int | float) and 0 <= self.prior_strength < math.inf)
        ):
            problems.append("prior_strength must be 'auto' or a non-negative number")
        unknown = set(self.weights) - set(LOSS_TERMS)
        if unknown:
            problems.append(f"unknown loss weights {sorted(unknown)}; expected {list(LOSS_TERMS)}")
        if any(w < 0 for w in self.weights.values()):
            problems.append("loss weights must be non-negative")
        if problems:
            raise ConfigError("invalid correction config: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> CorrectionConfig:
        """Build from a mapping (e.g. the workflow config's ``correct`` section), ignoring ``None`` values
        and workflow-only keys (``chunk_size``, ``gpu``, ``resources``)."""
        known = {f.name for f in fields(cls)}
        workflow_only = {"chunk_size", "gpu", "resources", "threads"}
        unknown = set(values) - known - workflow_only
        if unknown:
            raise ConfigError(f"unknown correction options {sorted(unknown)}; known: {sorted(known)}")
        return cls(**{k: v for k, v in values.items() if k in known and v is not None})


@dataclass
class CorrectionResult:
    """What :func:`correct` returns.

    Attributes
    ----------
    corrected
        ``(N, G)`` float32 corrected counts on all spots, genes in ``genes`` order.
    genes
        Corrected gene names.
    params
        Per-gene learned parameters, indexed by gene: ``q_init``, ``q``, ``threshold`` (counts), ``r``,
        ``diffusion_length`` (per-axis RMS displacement of the local kernel, spot pitches), ``bleed``,
        ``distal``, ``phi_0`` ... ``phi_K`` (cost-function coefficients).
    kernel_profile
        Unnormalised Gibbs weight :math:`\\exp(-W(d) d^2 / r)` against distance (pitches), inside tissue:
        median and quartiles over genes.
    loss_history
        Per epoch: the total and each term, averaged over genes.
    config
        The resolved configuration, with the cutoff used.
    """

    corrected: np.ndarray
    genes: list[str]
    params: pd.DataFrame
    kernel_profile: pd.DataFrame
    loss_history: pd.DataFrame
    config: dict[str, Any]

    def to_anndata(self, adata: AnnData) -> AnnData:
        """AnnData of the corrected genes on all spots of ``adata``.

        ``X`` and ``layers['corrected']`` hold the correction, ``layers['counts']`` the raw counts, ``var`` the
        learned parameters, ``uns`` the loss history, kernel profile and configuration; ``obs``, ``obsm`` and
        ``uns['spatial']`` are those of ``adata``.
        """
        raw = _dense_counts(adata, self.genes)
        out = AnnData(
            X=self.corrected.copy(),
            obs=adata.obs.copy(),
            var=self.params.loc[self.genes].copy(),
            obsm={k: np.asarray(v).copy() for k, v in adata.obsm.items()},
            layers={"counts": raw, "corrected": self.corrected.copy()},
        )
        out.uns["spatial"] = adata.uns.get("spatial", {})
        out.uns["undiffuse"] = dict(adata.uns.get("undiffuse", {}))
        out.uns["correction"] = _jsonable(self.config)
        out.uns["loss_history"] = {k: self.loss_history[k].to_numpy() for k in self.loss_history.columns}
        out.uns["kernel_profile"] = {
            k: self.kernel_profile[k].to_numpy() for k in self.kernel_profile.columns
        }
        return out


def correct(
    adata: AnnData,
    *,
    genes: Sequence[str] | None = None,
    image: np.ndarray | None = None,
    mode: Mode | None = None,
    q_init: Mapping[str, float] | pd.Series | float | None = None,
    config: CorrectionConfig | None = None,
    **overrides: Any,
) -> CorrectionResult:
    r"""Correct lateral diffusion of the selected genes of a sample.

    Parameters
    ----------
    adata
        Canonical AnnData (``undiffuse.read_sample`` / ``prepared.h5ad``): raw counts on **all** spots,
        ``obs['tissue']`` (or ``obs['in_tissue']``), ``obsm['spatial']``.
    genes
        Genes to correct; default ``var['selected']`` when present, else all genes.
    image
        ``(H, W[, 3])`` H&E image aligned with ``obsm['spatial']`` at full resolution; default: the hires, else
        the lowres image of ``uns['spatial']``. Without an image the image loss is left out.
    mode
        ``deconvolve`` (default) or ``balanced``; overrides ``config.mode``.
    q_init
        Initial quantile levels: a mapping gene -> level (from the Moran's I scan), or one level for all genes;
        default 0.5.
    config
        Options; keyword ``overrides`` replace its fields (e.g. ``epochs=20``).

    Returns
    -------
    CorrectionResult

    Notes
    -----
    Every gene is optimised on its own (the loss is a sum of per-gene terms and Adam acts element-wise), so
    results do not depend on how genes are grouped into chunks or batches.
    """
    config = replace(config or CorrectionConfig(), **overrides)
    if mode is not None:
        config = replace(config, mode=mode)
    genes = _resolve_genes(adata, genes)
    device = _resolve_device(config.device)
    torch.manual_seed(config.seed)
    dtype = torch.float32

    problem = _SampleProblem.build(adata, config, image=image, device=device, dtype=dtype)
    counts_all = _dense_counts(adata, genes)
    levels = _resolve_q_init(q_init, genes)

    corrected = np.zeros_like(counts_all)
    param_tables, histories, profiles = [], [], []
    batches = [slice(i, i + config.batch_genes) for i in range(0, len(genes), config.batch_genes)]
    bar = tqdm(
        total=len(batches) * config.epochs,
        desc=f"correct [{config.mode}]",
        unit="epoch",
        disable=not config.progress or None,
        leave=False,
    )
    started = time.perf_counter()
    with _deterministic_algorithms(), heap_reuse():
        for batch in batches:
            counts = torch.as_tensor(counts_all[:, batch], dtype=dtype, device=device)
            solver = _GeneBatch(problem, counts, levels[batch], config)
            history = solver.fit(bar)
            corrected[:, batch] = solver.final_field().cpu().numpy()
            table = solver.parameter_table()
            table.index = genes[batch]
            param_tables.append(table)
            histories.append(history * (counts.shape[1] / len(genes)))
            profiles.append(solver.kernel_profile_samples())
    bar.close()
    elapsed = time.perf_counter() - started

    corrected = np.nan_to_num(corrected, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)
    params = pd.concat(param_tables)
    loss_history = sum(histories[1:], histories[0]).reset_index().rename(columns={"index": "epoch"})
    profile_samples = np.concatenate(profiles, axis=1)
    kernel_profile = pd.DataFrame(
        {
            "distance": problem.profile_distance.cpu().numpy(),
            "weight": np.median(profile_samples, axis=1),
            "q25": np.quantile(profile_samples, 0.25, axis=1),
            "q75": np.quantile(profile_samples, 0.75, axis=1),
        }
    )
    resolved = asdict(config) | {"cutoff": problem.cutoff, "n_basis": N_RADIAL_BASIS, "device": str(device)}
    resolved["wall_time_s"] = elapsed
    resolved["image_loss_used"] = problem.raster is not None
    logger.info("corrected %d genes in %.1f s on %s", len(genes), elapsed, device)
    return CorrectionResult(corrected, list(genes), params, kernel_profile, loss_history, resolved)


def rediffuse(corrected: AnnData, *, layer: str = "corrected") -> np.ndarray:
    """Apply each gene's learned diffusion to its corrected field: the expected observed counts.

    Parameters
    ----------
    corrected
        Output of :meth:`CorrectionResult.to_anndata` (or the merged ``corrected.h5ad``, restricted to corrected
        genes): needs ``var`` columns ``r``, ``bleed``, ``distal``, ``phi_*`` and ``uns['correction']['cutoff']``.
    layer
        Layer holding the corrected field.

    Returns
    -------
    ``(N, G)`` float64 expected counts under the learned forward model; for ``balanced`` corrections, which
    learn no forward model, the corrected field itself.
    """
    settings = corrected.uns["correction"]
    stored = corrected.layers[layer]
    field = np.asarray(stored.toarray() if sp.issparse(stored) else stored, dtype=np.float64)
    if settings.get("mode") == "balanced":
        return field
    config = CorrectionConfig(cutoff=float(settings["cutoff"]), device="cpu", progress=False)
    problem = _SampleProblem.build(
        corrected, config, image=None, device=torch.device("cpu"), dtype=torch.float64
    )
    var = corrected.var
    phi = torch.as_tensor(var[[c for c in var.columns if c.startswith("phi_")]].to_numpy(np.float64))
    kernel = problem.kernel(phi, torch.as_tensor(var["r"].to_numpy(np.float64)))
    mu = expected_counts(
        torch.as_tensor(field),
        kernel,
        problem.pairs,
        torch.as_tensor(var["bleed"].to_numpy(np.float64)),
        torch.as_tensor(var["distal"].to_numpy(np.float64)),
    )
    return mu.numpy()


def deconvolve_known_kernel(
    adata: AnnData,
    *,
    genes: Sequence[str],
    scale: np.ndarray,
    bleed: float | np.ndarray,
    distal: float | np.ndarray,
    kind: str = "gaussian",
    cutoff: float | np.ndarray,
    q_init: Mapping[str, float] | pd.Series | float | None = None,
    config: CorrectionConfig | None = None,
) -> np.ndarray:
    """EM deconvolution with a given diffusion kernel instead of a learned one.

    With the simulator's true kernel and ``config.prior_strength = 0`` this is maximum likelihood with the
    answer known: the reference the learned correction is measured against; with the default prior it is the
    maximum a posteriori estimate with the answer known. It uses the same start (soft threshold at ``q_init``),
    the same confinement to tissue, the same prior and the same number of EM updates as :func:`correct`.

    Parameters
    ----------
    adata
        As for :func:`correct`.
    genes
        Genes to deconvolve.
    scale
        ``(G,)`` kernel scales in spot pitches.
    bleed, distal
        Local and uniform bleeding shares, scalars or ``(G,)``.
    kind
        Radial profile (see :func:`undiffuse.diffusion.profile_log_weights`).
    cutoff
        Neighbour radius in pitches, scalar or ``(G,)`` (genes are then processed per distinct radius).
    q_init, config
        As for :func:`correct` (only ``beta``, ``prior_strength`` and ``em_iterations`` matter).

    Returns
    -------
    ``(N, G)`` float32 deconvolved counts.
    """
    from .diffusion import profile_log_weights

    config = config or CorrectionConfig(progress=False)
    genes = _resolve_genes(adata, genes)
    n_genes = len(genes)
    as_vector = lambda v: np.broadcast_to(np.asarray(v, dtype=np.float64), (n_genes,))  # noqa: E731
    scale, bleed, distal, cutoff = (as_vector(v) for v in (scale, bleed, distal, cutoff))
    counts_all = _dense_counts(adata, genes)
    levels = _resolve_q_init(q_init, genes)
    out = np.zeros_like(counts_all)
    with _deterministic_algorithms(), torch.no_grad():
        for radius in np.unique(cutoff):
            columns = np.flatnonzero(cutoff == radius)
            run = replace(config, cutoff=float(radius), mode="deconvolve", device="cpu")
            problem = _SampleProblem.build(
                adata, run, image=None, device=torch.device("cpu"), dtype=torch.float32
            )
            counts = torch.as_tensor(counts_all[:, columns])
            batch = _GeneBatch(problem, counts, levels[columns], run)
            distance = torch.sqrt(problem.sq_distance)
            log_w = profile_log_weights(distance, torch.as_tensor(scale[columns], dtype=distance.dtype), kind)
            kernel = normalise_rows(log_w, problem.pairs[0], problem.n_spots)
            bleed_g = torch.as_tensor(bleed[columns], dtype=counts.dtype)
            distal_g = torch.as_tensor(distal[columns], dtype=counts.dtype)
            field = deconvolve_em(
                counts,
                batch.start(),
                kernel,
                problem.pairs,
                bleed_g,
                distal_g,
                n_iter=config.em_iterations,
                prior=batch.prior(kernel, bleed_g, distal_g),
            )
            out[:, columns] = field.numpy()
    return np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)


# --------------------------------------------------------------------------------------------------------------
# Sample-level geometry shared by all genes


@dataclass
class _SampleProblem:
    """Everything about a sample that does not depend on the genes: pairs, features, raster, weights."""

    n_spots: int
    tissue: torch.Tensor
    pairs: tuple[torch.Tensor, torch.Tensor]
    sq_distance: torch.Tensor
    features: torch.Tensor
    cutoff: float
    moran_weights: SpatialWeights
    neighbours: TissueNeighbours
    diffusion_scale: float | None
    raster: Raster | None
    intensity: torch.Tensor | None
    profile_distance: torch.Tensor
    profile_features: torch.Tensor
    reference_distance: torch.Tensor
    reference_features: torch.Tensor
    mode: Mode

    @classmethod
    def build(
        cls, adata: AnnData, config: CorrectionConfig, *, image, device: torch.device, dtype: torch.dtype
    ) -> _SampleProblem:
        coords = pitch_coordinates(adata)
        tissue = _tissue_mask(adata)
        info = adata.uns.get("undiffuse", {})
        cutoff = float(config.cutoff or _qc_cutoff(info, config.max_cutoff))
        sources = tissue if config.mode == "deconvolve" else None
        pairs = neighbour_pairs(coords, cutoff, sources=sources)
        source = torch.as_tensor(pairs.source, device=device)
        target = torch.as_tensor(pairs.target, device=device)
        distance = torch.as_tensor(pairs.distance, dtype=dtype, device=device)
        tissue_t = torch.as_tensor(tissue, device=device)
        crosses = tissue_t[source] != tissue_t[target]
        features = pair_features(distance, crosses, cutoff)

        moran_weights = spatial_weights(coords, dtype=dtype, device=device)
        neighbours = TissueNeighbours.build(coords, tissue, dtype=dtype, device=device)

        raster, intensity = _image_raster(adata, image, config.image_size, dtype, device)

        profile_distance = torch.linspace(0.0, cutoff, 49, dtype=dtype, device=device)
        profile_features = pair_features(
            profile_distance, torch.zeros_like(profile_distance, dtype=torch.bool), cutoff
        )
        reference = _reference_neighbourhood(coords, cutoff)
        reference_distance = torch.as_tensor(reference, dtype=dtype, device=device)
        reference_features = pair_features(
            reference_distance, torch.zeros_like(reference_distance, dtype=torch.bool), cutoff
        )
        return cls(
            n_spots=coords.shape[0],
            tissue=tissue_t,
            pairs=(source, target),
            sq_distance=distance**2,
            features=features,
            cutoff=cutoff,
            moran_weights=moran_weights,
            neighbours=neighbours,
            diffusion_scale=info.get("diffusion_scale"),
            raster=raster,
            intensity=intensity,
            profile_distance=profile_distance,
            profile_features=profile_features,
            reference_distance=reference_distance,
            reference_features=reference_features,
            mode=config.mode,
        )

    def kernel(self, phi: torch.Tensor, reg: torch.Tensor) -> torch.Tensor:
        """``(E, G)`` row-normalised Gibbs kernel ``normalise(exp(-W D^2 / r))``."""
        log_w = gibbs_log_weights(self.sq_distance, cost_weights(self.features, phi), reg)
        return normalise_rows(log_w, self.pairs[0], self.n_spots)

    def cost(self, phi: torch.Tensor) -> torch.Tensor:
        """``(E, G)`` transport cost ``W D^2``."""
        return cost_weights(self.features, phi) * self.sq_distance[:, None]


def _reference_neighbourhood(coords: np.ndarray, cutoff: float) -> np.ndarray:
    """Distances from the most central spot to its neighbours within ``cutoff``: a full lattice neighbourhood
    on which diffusion lengths are measured independently of tissue edges."""
    centre = np.argmin(((coords - coords.mean(axis=0)) ** 2).sum(axis=1))
    distance = np.sqrt(((coords - coords[centre]) ** 2).sum(axis=1))
    return distance[distance <= cutoff * (1 + 1e-9)]


def _image_raster(
    adata: AnnData, image: np.ndarray | None, max_side: int, dtype: torch.dtype, device: torch.device
) -> tuple[Raster | None, torch.Tensor | None]:
    """The rasteriser and target intensity of the image loss, or ``(None, None)`` without an image."""
    coords_full = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    sample_id = adata.uns.get("undiffuse", {}).get("sample_id")
    library = adata.uns.get("spatial", {}).get(sample_id, {})
    scalefactors = library.get("scalefactors", {})
    if image is not None:
        scale = 1.0
    else:
        picked = pick_image(adata) if library else None
        if picked is None:
            return None, None
        _, image, scale = picked
    small, zoom = working_grid(image_intensity(image), max_side)
    diameter = scalefactors.get("spot_diameter_fullres")
    if diameter is None:
        diameter = 0.55 * float(adata.uns.get("undiffuse", {}).get("spot_pitch_px") or 1.0)
    raster = build_raster(
        coords_full * scale * zoom, float(diameter) * scale * zoom, small.shape, dtype=dtype
    )
    intensity = torch.as_tensor(small, dtype=dtype)[None, None]
    return Raster(raster.matrix.to(device), raster.shape), intensity.to(device)


# --------------------------------------------------------------------------------------------------------------
# Per-gene optimisation


class _GeneBatch:
    """The learnable parameters and the training loop of a batch of genes.

    Parameters are unconstrained tensors mapped into range: ``q = sigmoid(q_logit)``,
    ``r = R_MIN + exp(log_r)`` (a scale learns in relative steps), ``(stay, bleed, distal) = softmax(share_logits)``, ``W = exp(features @ phi)``.
    """

    R_MIN = 1e-3

    def __init__(
        self, problem: _SampleProblem, counts: torch.Tensor, q_init: np.ndarray, config: CorrectionConfig
    ) -> None:
        self.problem = problem
        self.counts = counts
        self.config = config
        n_genes = counts.shape[1]
        dtype, device = counts.dtype, counts.device
        tissue_counts = counts[problem.tissue]
        self.order_statistics = dequantised_order_statistics(tissue_counts)
        self.value_range = counts.amax(dim=0) - counts.amin(dim=0)
        self.totals = counts.sum(dim=0)
        self.q_init = torch.as_tensor(q_init, dtype=dtype, device=device)

        r0 = _initial_reg(config, problem)
        shares0 = torch.tensor(
            [1.0 - config.bleed_init - config.distal_init, config.bleed_init, config.distal_init], dtype=dtype
        ).clamp_min(1e-4)
        self.q_logit = torch.logit(self.q_init.clamp(0.01, 0.99)).clone().requires_grad_(True)
        self.log_r = torch.full((n_genes,), math.log(max(r0 - self.R_MIN, 1e-12)), dtype=dtype, device=device)
        self.log_r.requires_grad_(True)
        self.phi = torch.zeros(
            (n_genes, problem.features.shape[1]), dtype=dtype, device=device, requires_grad=True
        )
        self.share_logits = torch.log(shares0).to(device).repeat(n_genes, 1).requires_grad_(True)
        learnable = [self.q_logit, self.log_r, self.phi]
        if config.mode == "deconvolve":
            learnable.append(self.share_logits)
        self.optimizer = torch.optim.Adam(learnable, lr=config.lr)
        weights = dict(config.weights)
        if problem.raster is None:
            weights["image"] = 0.0
        if config.mode == "balanced":
            weights["poisson"] = 0.0  # balanced OT has no forward model to hold the data against
        self.weights = weights
        self.excess, self.energy = local_excess_variation(counts, problem.neighbours)

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
    def start(self) -> torch.Tensor:
        """``(N, G)`` soft-thresholded counts, confined to tissue and rescaled to each gene's total."""
        threshold = quantile(self.counts, self.q, order_statistics=self.order_statistics)
        soft = soft_threshold(self.counts, threshold, beta=self.config.beta, value_range=self.value_range)
        if self.config.mode == "balanced":
            return soft
        inside = soft * self.problem.tissue[:, None]
        mass = inside.sum(dim=0)
        # A gene with no counts in tissue starts uniform over the tissue.
        uniform = self.problem.tissue[:, None].to(soft.dtype).expand_as(soft) / self.problem.tissue.sum()
        shape = torch.where(mass > 0, inside / torch.where(mass > 0, mass, 1.0), uniform)
        return shape * self.totals

    def prior(
        self, kernel: torch.Tensor, bleed: torch.Tensor, distal: torch.Tensor
    ) -> GammaFieldPrior | None:
        """The smoothness prior of ``deconvolve`` under the current forward model (``None`` without one)."""
        setting = self.config.prior_strength
        if self.config.mode != "deconvolve" or setting == 0:
            return None
        problem = self.problem
        if setting != "auto":
            return GammaFieldPrior(problem.neighbours, torch.full_like(self.excess, float(setting)))
        with torch.no_grad():
            kernel, bleed, distal = kernel.detach(), bleed.detach(), distal.detach()
            attenuation = blur_attenuation(
                lambda field: expected_counts(field, kernel, problem.pairs, bleed, distal),
                problem.neighbours,
                self.counts,
            )
            return GammaFieldPrior(
                problem.neighbours, empirical_strength(self.excess, self.energy, attenuation)
            )

    def transport(
        self, start: torch.Tensor, warm, n_iter: int, n_grad: int | None, kernel=None, *, prior: bool = False
    ):
        """Run the mode's solver; returns the field and the state to carry to the next epoch.

        ``prior`` applies the smoothness prior (``deconvolve``): only to the output. Training fits the kernel to
        the maximum-likelihood field, since a prior that smooths the field would otherwise stand in for part of
        the blur and the learned bleeding would shrink."""
        problem = self.problem
        if self.config.mode == "balanced":
            a = self.counts / torch.where(self.totals > 0, self.totals, 1.0)
            mass = start.sum(dim=0)
            b = start / torch.where(mass > 0, mass, 1.0)
            plan, log = sinkhorn_log(
                a,
                b,
                problem.pairs,
                problem.cost(self.phi),
                self.reg,
                numItermax=n_iter,
                n_grad_iterations=n_grad,
                warmstart=warm,
                log=True,
            )
            return self.totals * column_sums(plan, problem.pairs, problem.n_spots), (log["f"], log["g"])
        shares = self.shares
        kernel = problem.kernel(self.phi, self.reg) if kernel is None else kernel
        initial = start if warm is None else through_start(start, warm)
        field = deconvolve_em(
            self.counts,
            initial,
            kernel,
            problem.pairs,
            shares[:, 1],
            shares[:, 2],
            n_iter=n_iter,
            n_grad_iterations=n_grad,
            prior=self.prior(kernel, shares[:, 1], shares[:, 2]) if prior else None,
        )
        return field, field.detach()

    def losses(self, field: torch.Tensor, kernel=None) -> dict[str, torch.Tensor]:
        problem = self.problem
        terms: dict[str, torch.Tensor] = {}
        zeros = torch.zeros(field.shape[1], dtype=field.dtype, device=field.device)
        terms["image"] = (
            image_loss(problem.raster.draw(field), problem.intensity) if self.weights["image"] > 0 else zeros
        )
        terms["out_of_tissue"] = out_of_tissue_loss(field, problem.tissue)
        terms["moran"] = moran_loss(field, problem.moran_weights)
        if self.weights["poisson"] > 0:
            shares = self.shares
            kernel = problem.kernel(self.phi, self.reg) if kernel is None else kernel
            mu = expected_counts(field, kernel, problem.pairs, shares[:, 1], shares[:, 2])
            terms["poisson"] = poisson_loss(self.counts, mu)
        else:
            terms["poisson"] = zeros
        return terms

    def fit(self, bar: tqdm) -> pd.DataFrame:
        """Train for ``config.epochs`` epochs; returns the loss history (means over the batch's genes)."""
        rows, warm = [], None
        # Solver state is carried across epochs, so each epoch only needs the differentiated tail.
        n_iter = self.config.tail_iterations
        for _ in range(self.config.epochs):
            self.optimizer.zero_grad(set_to_none=True)
            kernel = self.problem.kernel(self.phi, self.reg) if self.config.mode == "deconvolve" else None
            field, warm = self.transport(self.start(), warm, n_iter, self.config.tail_iterations, kernel)
            terms = self.losses(field, kernel)
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
    def final_field(self) -> torch.Tensor:
        n_iter = (
            self.config.em_iterations if self.config.mode == "deconvolve" else self.config.sinkhorn_iterations
        )
        field, _ = self.transport(self.start(), None, n_iter, None, prior=True)
        return torch.nan_to_num(field, nan=0.0, posinf=0.0, neginf=0.0)

    @torch.no_grad()
    def parameter_table(self) -> pd.DataFrame:
        shares = self.shares if self.config.mode == "deconvolve" else torch.zeros((self.counts.shape[1], 3))
        threshold = quantile(self.counts, self.q, order_statistics=self.order_statistics)
        prior = (
            self.prior(self.problem.kernel(self.phi, self.reg), shares[:, 1], shares[:, 2])
            if self.config.mode == "deconvolve"
            else None
        )
        strength = prior.strength if prior is not None else torch.zeros_like(self.excess)
        table = pd.DataFrame(
            {
                "q_init": self.q_init.cpu().numpy(),
                "q": self.q.cpu().numpy(),
                "threshold": threshold.cpu().numpy(),
                "r": self.reg.cpu().numpy(),
                "diffusion_length": self.diffusion_length().cpu().numpy(),
                "bleed": shares[:, 1].cpu().numpy(),
                "distal": shares[:, 2].cpu().numpy(),
                "prior_strength": strength.cpu().numpy(),
            }
        )
        for k in range(self.phi.shape[1]):
            table[f"phi_{k}"] = self.phi[:, k].cpu().numpy()
        return table

    @torch.no_grad()
    def diffusion_length(self) -> torch.Tensor:
        """Per-axis RMS displacement of the local kernel on a full lattice neighbourhood (pitches)."""
        problem = self.problem
        log_w = gibbs_log_weights(
            problem.reference_distance**2, cost_weights(problem.reference_features, self.phi), self.reg
        )
        weights = torch.softmax(log_w, dim=0)
        return torch.sqrt((weights * problem.reference_distance[:, None] ** 2).sum(dim=0) / 2.0)

    @torch.no_grad()
    def kernel_profile_samples(self) -> np.ndarray:
        """``(n_distances, G)`` unnormalised Gibbs weights against distance."""
        problem = self.problem
        log_w = gibbs_log_weights(
            problem.profile_distance**2, cost_weights(problem.profile_features, self.phi), self.reg
        )
        return torch.exp(log_w).cpu().numpy()


@contextmanager
def _deterministic_algorithms() -> Iterator[None]:
    """Same seed, same device, same result: scatter-add backward passes are otherwise reduced in a
    thread-dependent order."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


# --------------------------------------------------------------------------------------------------------------
# Input handling


def _resolve_genes(adata: AnnData, genes: Sequence[str] | None) -> list[str]:
    if genes is None:
        if "selected" in adata.var:
            genes = adata.var_names[adata.var["selected"].to_numpy(bool)].tolist()
        else:
            genes = adata.var_names.tolist()
    genes = list(genes)
    missing = [g for g in genes if g not in adata.var_names]
    if missing:
        raise InputError(
            adata.uns.get("undiffuse", {}).get("source"),
            f"{len(missing)} gene(s) to correct are not in the data: {', '.join(missing[:10])}",
        )
    if not genes:
        raise InputError(adata.uns.get("undiffuse", {}).get("source"), "no gene selected for correction")
    return genes


def _resolve_q_init(q_init, genes: list[str]) -> np.ndarray:
    if q_init is None:
        return np.full(len(genes), 0.5)
    if isinstance(q_init, int | float):
        return np.full(len(genes), float(q_init))
    series = pd.Series(q_init, dtype=float)
    missing = [g for g in genes if g not in series.index]
    if missing:
        raise ConfigError(f"q_init has no level for {len(missing)} gene(s): {', '.join(missing[:10])}")
    values = series.loc[genes].to_numpy()
    if not np.all((values >= 0) & (values <= 1)):
        raise ConfigError("q_init levels must lie in [0, 1]")
    return values


def _resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for, but PyTorch sees no CUDA device")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _tissue_mask(adata: AnnData) -> np.ndarray:
    key = "tissue" if "tissue" in adata.obs else "in_tissue"
    if key not in adata.obs:
        raise InputError(
            adata.uns.get("undiffuse", {}).get("source"), "obs has neither 'tissue' nor 'in_tissue'"
        )
    mask = adata.obs[key].to_numpy().astype(bool)
    if not mask.any():
        raise InputError(adata.uns.get("undiffuse", {}).get("source"), "no spot is in tissue")
    return mask


def _dense_counts(adata: AnnData, genes: Sequence[str]) -> np.ndarray:
    matrix = adata[:, list(genes)].X
    dense = matrix.toarray() if sp.issparse(matrix) else np.asarray(matrix)
    return dense.astype(np.float32)


def _qc_cutoff(info: Mapping[str, Any], max_cutoff: float) -> float:
    """Neighbour radius from the QC's background decay (see :class:`CorrectionConfig`)."""
    measured = [
        float(info[k]) * f
        for k, f in (("diffusion_cutoff", 1.0), ("diffusion_scale", SCALES_PER_CUTOFF))
        if info.get(k)
    ]
    return min(max(measured), max_cutoff) if measured else DEFAULT_CUTOFF


def _initial_reg(config: CorrectionConfig, problem: _SampleProblem) -> float:
    if config.r_init == "qc":
        # Without QC (e.g. an AnnData that did not go through `prepare`), the seed's initialisation.
        return 2.0 * float(problem.diffusion_scale) ** 2 if problem.diffusion_scale else 1.0
    return float(config.r_init)


def _jsonable(values: Mapping[str, Any]) -> dict[str, Any]:
    """Configuration values that h5ad can store (no ``None``)."""
    return {k: ("none" if v is None else dict(v) if isinstance(v, Mapping) else v) for k, v in values.items()}
