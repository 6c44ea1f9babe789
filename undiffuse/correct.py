r"""Correct lateral diffusion: learn the diffusion kernel per gene, then undo it.

For each gene :math:`g` with counts :math:`x_g` on all :math:`N` spots, the correction learns, end to end in
PyTorch,

- the cost weights :math:`W = f_{\phi_g}(d, \text{tissue})` of :mod:`undiffuse.ot.cost` (initialised to 1),
  giving the transport cost :math:`M = W \odot D^2`;
- the quantile level :math:`q_g` of the soft threshold
  :math:`b_g = \sigma(\beta (x_g - Q_g(q_g)) / \mathrm{range}(x_g)) \odot x_g` (initialised from the Moran's I
  scan; :mod:`undiffuse.ot.quantile` makes :math:`Q_g` differentiable in :math:`q_g`);
- the entropic regularisation :math:`r_g > 0`: the Gibbs kernel :math:`P_g = \mathrm{normalise}(\exp(-M /
  r_g))` is a heat kernel whose variance is :math:`r_g / 2` (where :math:`W = 1`);
- the shares of molecules that stay, bleed locally (:math:`b_g`) and spread uniformly (:math:`d_g`), as
  SpotClean models bleeding.

:math:`P_g` is the forward diffusion model :math:`x_g \sim \mathrm{Poisson}(K_g^\top z_g)`
(:mod:`undiffuse.diffusion`), applied by FFT on the spot lattice with no cutoff radius, or on neighbour pairs
when the spots are not on a lattice (:mod:`undiffuse.operators`). The true field :math:`z_g` is recovered by EM
(iterated semi-relaxed Sinkhorn, :mod:`undiffuse.ot.deconvolution`, accelerated by SQUAREM), started from
:math:`b_g` restricted to tissue and rescaled to the gene's total; every update keeps the total and the
confinement to tissue. A Poisson data-fidelity term identifies the kernel: background spots hold no true
expression, so their counts must be explained by molecules that diffused out of the tissue. A spatial
smoothness prior (:mod:`undiffuse.ot.prior`, a Gamma Markov random field whose strength is set per gene by
empirical Bayes) makes the final EM maximum a posteriori, which keeps counting noise from being amplified.

The parts: :class:`~undiffuse.geometry.SampleGeometry` (built once per sample),
:class:`~undiffuse.model.DiffusionModel` (start field, kernel, forward model, deconvolution) and
:class:`~undiffuse.trainer.KernelTrainer` (the per-gene parameters and their training). The seed's balanced-OT
formulation, whose output equals the normalised soft threshold whatever the kernel, is a documented baseline in
:mod:`undiffuse.ot.baseline`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from os import PathLike
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData
from tqdm.auto import tqdm

from .arrays import as_dense, dense_to_csr
from .diffusion import KernelKind, profile
from .errors import ConfigError, InputError
from .genes import selected_genes
from .geometry import PriorWeights, SampleGeometry
from .memory import heap_reuse, release_free_memory
from .model import DiffusionModel, SoftStart, gibbs_log_weights
from .operators import DEFAULT_TOLERANCE, OperatorKind
from .ot.cost import N_RADIAL_BASIS
from .ot.deconvolution import with_totals
from .ot.programmes import (
    PROGRAMME_ITERATIONS,
    RANK_CANDIDATES,
    RANK_SELECTION_SPOTS,
    START_EM_ITERATIONS,
    choose_rank,
    deconvolve_programmes,
    reference_centre,
    split_counts,
)
from .qc import is_visium_hd
from .reference import profiles_for, read_profiles, read_reference, reference_profiles
from .trainer import LOSS_TERMS, KernelTrainer
from .validate import check_correct_input, failed_genes

logger = logging.getLogger(__name__)

#: The seed's weights (all 1), the Poisson fidelity's, and the kernel prior's (the Poisson term's: a posterior).
DEFAULT_WEIGHTS = {"image": 1.0, "out_of_tissue": 1.0, "moran": 1.0, "poisson": 100.0, "kernel_prior": 100.0}
#: Genes optimised together on the CPU; results do not depend on it, memory does.
DEFAULT_BATCH = 32
#: Share of free GPU memory that ``batch_genes: auto`` plans to use.
GPU_MEMORY_SHARE = 0.5
#: The fewest genes a call must hold for the low-rank model to be chosen from the data (``programmes`` "auto"
#: or "held_out"): with fewer, the programmes pool too few genes to carry any gene's borders.
PROGRAMMES_MIN_GENES = 12


@dataclass
class CorrectionConfig:
    """Options of :func:`correct`; the workflow config's ``correct`` section maps onto these fields.

    Attributes
    ----------
    epochs
        Optimisation steps (Adam) of the per-gene parameters.
    lr
        Adam learning rate.
    em_iterations
        EM updates of the final deconvolution (SQUAREM-accelerated); where the low-rank model follows
        (``programmes``, without a reference), at most
        :data:`~undiffuse.ot.programmes.START_EM_ITERATIONS`, as its field only starts that model.
    tail_iterations
        EM updates differentiated per epoch.
    beta
        Sharpness of the soft threshold.
    weights
        Loss weights ``image``, ``out_of_tissue``, ``moran`` (the seed's, all 1) and ``poisson`` (100).
    poisson_spots
        Where the Poisson fidelity that trains the kernel is measured: ``background`` (default) or ``all``
        spots. Inside tissue the field is free, and a joint fit of field and kernel favours kernels close to the
        identity (less local bleed, spread wider), the trivial solution of blind deconvolution (Levin et al.,
        CVPR 2009); off tissue the field is zero and the counts there are the kernel's alone. On the HD
        simulator the learned local share and diffusion length are then 0.33 and 21 um against the true 0.4
        and 21 um (``all``: 0.12 and 41 um). A sample without background spots uses all of them.
    operator
        How kernels are applied: ``auto`` (default: by FFT on the spot lattice, with no cutoff, when the spots
        sit on one; else on neighbour pairs), ``lattice`` or ``pairs``.
    cutoff
        Truncation radius of the kernel in spot pitches, and the range of f_phi's radial basis. ``None``
        (default): no truncation on the lattice; the pair operator uses the QC's diffusion range (the larger of
        its ``diffusion_cutoff`` and 3 ``diffusion_scale``), at most ``max_cutoff``; 8 without QC.
    max_cutoff
        Upper bound of the pair operator's derived radius: its memory and time grow with the square.
    kernel_tolerance
        Share of a kernel's mass the lattice operator may drop beyond the radius it keeps it to.
    r_init
        Initial kernel: ``"qc"`` (default) starts from the one the QC measured on the background decay, with
        :math:`r = 2 s^2` from its Gaussian-equivalent scale :math:`s` and f_phi's coefficients fitted so that
        the kernel has the radial profile of the decay's best-fitting family at its scale (heavy-tailed where the
        tail is heavy; :func:`undiffuse.trainer.initial_cost`); without the QC's fit the seed's Gaussian heat
        kernel of that width, and :math:`r = 1` without QC. A positive number: that :math:`r` with the seed's
        Gaussian heat kernel.
    bleed_init
        Initial local bleeding share.
    distal_init
        Initial uniform (distal) bleeding share: ``"background"`` (default) measures it per gene as the floor
        of the QC's background decay fitted to the gene's counts on all background spots (without the QC's fit:
        their mean beyond the diffusion range; :func:`undiffuse.trainer.initial_distal`), or a number for every
        gene. Started from a share far from the truth, training first widens the local kernel to explain the far
        background and needs several times the default epochs to undo it: on ``benchmarks/accuracy.py``'s sample
        (true local share 0.3), 25 epochs from 0.02 learn a local share of 0.23 and a diffusion length 1.4x the
        truth's; from the measured share, 0.30 and 0.97x (``benchmarks/results/accuracy_full_stride5_engine.md``).
    prior_strength
        Strength :math:`\alpha` of the smoothness prior (:mod:`undiffuse.ot.prior`): ``"auto"`` (default)
        estimates it per gene by empirical Bayes; a number sets it for every gene; 0 is maximum-likelihood EM.
    prior_weights
        How the prior weighs a spot's tissue neighbours: ``"bilateral"`` (default) by the similarity of their
        expression profiles (computed once per sample from the selected genes' raw counts,
        :func:`undiffuse.geometry.expression_profiles`), so that the prior does not smooth across tissue domain
        borders; ``"uniform"`` alike.
    programmes
        Number :math:`k` of expression programmes of the low-rank model (:mod:`undiffuse.ot.programmes`): the
        genes of a call (a chunk, in the workflow) are deconvolved together as :math:`z = W H`, each with its
        own kernel, starting from their maximum a posteriori fields; a gene with few counts borrows its shape
        and borders from the others. 0 deconvolves each gene on its own under the smoothness prior. At most
        the number of genes. ``"held_out"`` chooses the rank and the number of low-rank updates from the
        data, on either platform, when the call holds at least :data:`PROGRAMMES_MIN_GENES` genes: the pair
        among :data:`~undiffuse.ot.programmes.RANK_CANDIDATES` and
        :data:`~undiffuse.ot.programmes.UPDATE_CANDIDATES` whose fit to a binomial half of the counts best
        predicts the other half (:func:`~undiffuse.ot.programmes.choose_rank`), on a window of about
        :data:`~undiffuse.ot.programmes.RANK_SELECTION_SPOTS` spots of the slide with all the call's genes
        (:meth:`~undiffuse.geometry.SampleGeometry.varied_window`); a gene whose own field predicts its
        held-out half better than the chosen fit keeps its own field (``programmes_own_field_genes``).
        ``"auto"`` (default) is ``"held_out"`` on Visium HD and 0 on Visium. The model pays where genes are
        many more than :math:`k` and bins hold cells of a few types (Visium HD): on ``benchmarks/hd.py``'s
        2 mm slide the chosen pair (4 programmes, 40 updates) gives RMSE 0.43 where 8 fixed programmes give
        0.66; on the HD simulator's 2 mm slide it chose 8 programmes and 5 updates, RMSE 1.32. On the Visium
        simulator, whose genes vary smoothly and each in its own way, the model raises the RMSE (by a third
        with 8 programmes, and above raw with 4). A fixed rank makes
        :data:`~undiffuse.ot.programmes.PROGRAMME_ITERATIONS` updates.
        With a reference (:func:`correct`'s ``reference``) the
        programmes are its cell types, and this option must stay ``"auto"``.
    reference_key
        ``obs`` column of a reference ``.h5ad``'s cell types (:mod:`undiffuse.reference`).
    tissue_cost
        Learn the tissue term of the cost f_phi (the coefficient of the boundary-crossing flag), so that
        diffusion from tissue into background may differ from diffusion within tissue. Off by default (the
        coefficient stays 0): on the simulations of ``benchmarks/accuracy.py`` the kernel then explains the
        background counts by the crossing term instead of the blur within tissue, and the correction is less
        accurate (RMSE 4.93 against 4.63 under long heavy-tailed diffusion), and training is slower.
    image_size
        Longer side of the grid the image loss works on, in pixels.
    batch_genes
        Genes optimised together (memory only; results do not depend on it). ``"auto"``: sized from free GPU
        memory on CUDA, 32 on the CPU.
    train_spots
        On samples with more spots (Visium HD), the kernel is learned on a square window of about this many
        spots around the tissue boundary nearest the tissue's centre, where it is identified, and the learned
        model then deconvolves the whole slide. ``None`` trains on every spot.
    device
        ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
    seed
        Seed of PyTorch's generators.
    progress
        Show a progress bar.
    """

    epochs: int = 25
    lr: float = 0.05
    em_iterations: int = 60
    tail_iterations: int = 1
    beta: float = 50.0
    weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    poisson_spots: Literal["background", "all"] = "background"
    operator: OperatorKind = "auto"
    cutoff: float | None = None
    max_cutoff: float = 10.0
    kernel_tolerance: float = DEFAULT_TOLERANCE
    r_init: float | str = "qc"
    bleed_init: float = 0.3
    distal_init: float | Literal["background"] = "background"
    prior_strength: float | str = "auto"
    prior_weights: PriorWeights = "bilateral"
    programmes: int | Literal["auto", "held_out"] = "auto"
    reference_key: str = "cell_type"
    tissue_cost: bool = False
    image_size: int = 64
    batch_genes: int | str = "auto"
    train_spots: int | None = 50_000
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        self.weights = {**DEFAULT_WEIGHTS, **self.weights}
        problems = []
        if self.device not in ("auto", "cpu", "cuda"):
            problems.append(f"device must be 'auto', 'cpu' or 'cuda', not {self.device!r}")
        if self.poisson_spots not in ("background", "all"):
            problems.append(f"poisson_spots must be 'background' or 'all', not {self.poisson_spots!r}")
        if self.operator not in ("auto", "lattice", "pairs"):
            problems.append(f"operator must be 'auto', 'lattice' or 'pairs', not {self.operator!r}")
        for name in ("epochs", "em_iterations", "image_size"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be at least 1")
        if not (self.batch_genes == "auto" or (isinstance(self.batch_genes, int) and self.batch_genes >= 1)):
            problems.append("batch_genes must be 'auto' or at least 1")
        if self.train_spots is not None and not (
            isinstance(self.train_spots, int) and self.train_spots >= 100
        ):
            problems.append("train_spots must be at least 100, or none")
        if self.tail_iterations < 1:
            problems.append("tail_iterations must be at least 1")
        if not (self.lr > 0 and self.beta > 0):
            problems.append("lr and beta must be positive")
        if self.distal_init == "background":
            if not 0 <= self.bleed_init < 1:
                problems.append("bleed_init must be in [0, 1)")
        elif isinstance(self.distal_init, str):
            problems.append(f"distal_init must be 'background' or a number, not {self.distal_init!r}")
        elif not (0 <= self.bleed_init and 0 <= self.distal_init and self.bleed_init + self.distal_init < 1):
            problems.append("bleed_init and distal_init must be non-negative with a sum below 1")
        if not self.max_cutoff > 0:
            problems.append("max_cutoff must be positive (spot pitches)")
        if self.cutoff is not None and not self.cutoff > 0:
            problems.append("cutoff must be positive (spot pitches)")
        if not 0 < self.kernel_tolerance < 1:
            problems.append("kernel_tolerance must lie between 0 and 1")
        if not (self.r_init == "qc" or (isinstance(self.r_init, int | float) and self.r_init > 0)):
            problems.append("r_init must be a positive number or 'qc'")
        if not (
            self.prior_strength == "auto"
            or (isinstance(self.prior_strength, int | float) and 0 <= self.prior_strength < math.inf)
        ):
            problems.append("prior_strength must be 'auto' or a non-negative number")
        if not (
            self.programmes in ("auto", "held_out")
            or (
                isinstance(self.programmes, int)
                and not isinstance(self.programmes, bool)
                and self.programmes >= 0
            )
        ):
            problems.append(
                f"programmes must be 'auto', 'held_out' or a whole number, 0 or more, not {self.programmes!r}"
            )
        if self.prior_weights not in ("uniform", "bilateral"):
            problems.append(f"prior_weights must be 'uniform' or 'bilateral', not {self.prior_weights!r}")
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
        and workflow-only keys (``chunk_size``, ``gpu``, ``resources``, ``reference``: the workflow passes the
        reference's profiles to :func:`correct` itself)."""
        known = {f.name for f in fields(cls)}
        workflow_only = {"chunk_size", "gpu", "resources", "threads", "reference"}
        unknown = set(values) - known - workflow_only
        if unknown:
            raise ConfigError(f"unknown correction options {sorted(unknown)}; known: {sorted(known)}")
        return cls(**{k: v for k, v in values.items() if k in known and v is not None})


#: Prefix of everything :func:`correct` writes: ``var`` columns, the ``varm`` key and the ``uns`` key.
KEY = "undiffuse"

#: Learned per-gene parameters, stored as ``var[f"undiffuse_{name}"]``.
PARAMETER_COLUMNS = ("q_init", "q", "threshold", "r", "diffusion_length", "bleed", "distal", "prior_strength")

#: ``varm`` key of the coefficients of the cost function f_phi, ``(G, K + 1)``.
PHI_KEY = f"{KEY}_phi"

#: ``var`` column saying which genes were corrected (False: raw values kept).
CORRECTED_COLUMN = f"{KEY}_corrected"

#: Learned values of a gene that is not corrected: 0, the identity model (nothing bleeds, no threshold).
NOT_CORRECTED_VALUE = 0.0


def parameter_column(name: str) -> str:
    """The ``var`` column of a learned parameter (:data:`PARAMETER_COLUMNS`)."""
    return f"{KEY}_{name}"


def correct(
    adata: AnnData,
    *,
    layer: str | None = None,
    genes: Sequence[str] | None = None,
    key_added: str = "corrected",
    copy: bool = False,
    image: np.ndarray | None = None,
    q_init: Mapping[str, float] | pd.Series | float | None = None,
    reference: AnnData | pd.DataFrame | str | PathLike[str] | None = None,
    config: CorrectionConfig | None = None,
    allow_degenerate_tissue: bool = False,
    **overrides: Any,
) -> AnnData | None:
    r"""Correct lateral diffusion of the selected genes of a sample, in scanpy's conventions.

    Parameters
    ----------
    adata
        ``(N, G)`` canonical AnnData (``undiffuse.read_sample`` and ``undiffuse.prepare``, or
        ``prepared.h5ad``): raw counts on **all** spots, ``obs['tissue']`` (or ``obs['in_tissue']``),
        ``obsm['spatial']``.
    layer
        Layer holding the raw counts; default ``X``.
    genes
        Genes to correct; default ``var['selected']`` when present, else all genes.
    key_added
        Layer to write the corrected values to.
    copy
        Return a corrected copy instead of writing into ``adata``.
    image
        ``(H, W[, 3])`` H&E image aligned with ``obsm['spatial']`` at full resolution; default: the hires, else
        the lowres image of ``uns['spatial']``. Without an image the image loss is left out.
    q_init
        Initial quantile levels: a mapping gene -> level (from the Moran's I scan), or one level for all genes;
        default 0.5.
    reference
        Cell types whose profiles guide the correction (:mod:`undiffuse.reference`): an AnnData of single
        cells (or of a less-diffused spatial sample) with the types in ``obs[config.reference_key]``, its
        ``.h5ad`` file, or a table of profiles (genes by types, :func:`undiffuse.reference.reference_profiles`,
        or its ``.tsv``). After the per-gene maximum a posteriori EM, the genes of the call are deconvolved
        again under a Gamma prior centred on the part of their fields that a mixture of the types explains
        (each gene keeping its profile's shape across the types and learning its own scale; genes the
        reference lacks learn theirs freely): where the low-rank model runs (``programmes``), its programmes
        are the types, and its field is that centre; elsewhere the mixture is fitted to the per-gene fields
        (:func:`undiffuse.ot.programmes.reference_centre`). The prior's strength is set per gene by empirical
        Bayes, and a gene takes the result only where that strength exceeds the smoothness prior's (the mixture
        describes its spot-to-spot variation more tightly than its neighbours do); the others keep their maximum
        a posteriori fields, so a reference that does not describe the tissue changes nothing. Default: none.
    config
        Options; keyword ``overrides`` replace its fields (e.g. ``epochs=20``).
    allow_degenerate_tissue
        Correct even when the tissue holds very few spots or UMIs (:mod:`undiffuse.validate`), which is
        otherwise an error.

    Returns
    -------
    None, or the corrected copy when ``copy`` is true. Either way the AnnData gains

    - ``layers[key_added]``: ``(N, G)`` float32 corrected values of all genes (CSR when the counts are
      sparse); genes that are not corrected keep their raw counts;
    - ``var['undiffuse_corrected']``: whether each gene was corrected;
    - ``var['undiffuse_{name}']`` for the learned parameters :data:`PARAMETER_COLUMNS` (``q_init``, ``q``,
      ``threshold`` in counts, ``r``, ``diffusion_length`` in spot pitches, ``bleed``, ``distal``,
      ``prior_strength``); 0 for genes that are not corrected, the identity model;
    - ``varm['undiffuse_phi']``: ``(G, K + 1)`` coefficients of the cost function :math:`f_\phi`;
    - ``uns['undiffuse']['correction']``: provenance: ``layer`` (``key_added``), ``counts`` (``layer`` or
      ``X``), ``version``, ``config`` (the resolved options, with the operator and diffusion range used),
      ``kernel_profile`` (unnormalised Gibbs weight against distance in pitches, inside tissue: median and
      quartiles over genes) and ``loss_history`` (per epoch, the total and each term, averaged over genes).

    Raises
    ------
    InputError
        When the counts are not raw counts (NaN, Inf, negative or non-integer values), the tissue is degenerate,
        or a gene is unknown: the checks of :func:`undiffuse.validate.check_correct_input`, before any work.

    Notes
    -----
    Every gene is optimised on its own (the loss is a sum of per-gene terms and Adam acts element-wise), so
    results do not depend on how genes are grouped into chunks or batches. A gene whose correction failed (not
    finite, negative, or zero while the gene has counts: a bug, reported as a warning) keeps its raw counts and
    is marked ``undiffuse_corrected = False``; nothing is silently zeroed.
    """
    config = replace(config or CorrectionConfig(), **overrides)
    adata = adata.copy() if copy else adata
    counts_view = _counts_view(adata, layer)
    genes = _resolve_genes(
        counts_view, check_correct_input(counts_view, genes, allow_degenerate_tissue=allow_degenerate_tissue)
    )
    reference_types, type_profiles = _reference_profiles(reference, config, counts_view, genes)
    device = _resolve_device(config.device)
    torch.manual_seed(config.seed)
    dtype = torch.float32

    geometry = _geometry(counts_view, config, image=image, device=device, dtype=dtype)
    counts_all = _dense_counts(counts_view, genes)
    levels = _resolve_q_init(q_init, genes)
    batch_genes = _batch_genes(config, geometry, device)
    candidates = _programmes(config, counts_view, len(genes))
    if candidates and type_profiles is not None:
        candidates = [len(reference_types)]

    def geometry_of(window: np.ndarray) -> SampleGeometry:
        if window.all():
            return geometry
        return _geometry(counts_view[window], config, image=image, device=device, dtype=dtype)

    window = geometry.training_window(config.train_spots or geometry.n_spots)
    trained_on = geometry_of(window)
    # With several candidates the rank is chosen from the data, by count splitting on a window of the slide
    # with all the call's genes (its first value until then: non-zero, the low-rank model is on).
    rank = candidates[0] if candidates else 0
    programme_updates = PROGRAMME_ITERATIONS if rank else 0
    choosing = len(candidates) > 1
    if choosing:
        splitter = np.random.default_rng(config.seed)
        train_counts, train_starts, window_models = [], [], []
        selection_window = geometry.varied_window(RANK_SELECTION_SPOTS, counts_all)
        selected_on = geometry_of(selection_window)

    # Without a reference the low-rank model replaces the per-gene fields; with one, genes the reference does
    # not describe keep them.
    final_iterations = (
        min(config.em_iterations, START_EM_ITERATIONS)
        if rank and type_profiles is None
        else config.em_iterations
    )
    # Fields are zero off tissue, so only the tissue spots' rows are kept: half of a Visium HD slide.
    corrected = np.empty((len(geometry.tissue_rows), len(genes)), dtype=np.float32)
    param_tables, histories, profiles, models = [], [], [], []
    batches = [slice(i, i + batch_genes) for i in range(0, len(genes), batch_genes)]
    bar = tqdm(
        total=len(batches) * config.epochs,
        desc=f"correct [{geometry.operator.kind}]",
        unit="epoch",
        disable=not config.progress or None,
        leave=False,
    )
    started = time.perf_counter()
    with _deterministic_algorithms(), heap_reuse():
        for batch in batches:
            counts = torch.as_tensor(counts_all[:, batch], dtype=dtype, device=device)
            trainer = KernelTrainer(
                trained_on, counts[torch.as_tensor(window, device=device)], levels[batch], config
            )
            history = trainer.fit(bar)
            field_, table, profile_samples, model = trainer.final(geometry, counts, n_iter=final_iterations)
            corrected[:, batch] = field_.index_select(0, geometry.tissue_rows).cpu().numpy()
            if choosing:
                # The same per-gene fields of the window from the training half of its counts, which start
                # each candidate.
                train = split_counts(counts_all[selection_window, batch], splitter)
                train_start, _, _, window_model = trainer.final(
                    selected_on, torch.as_tensor(train, dtype=dtype, device=device), n_iter=final_iterations
                )
                train_counts.append(train)
                train_starts.append(train_start.index_select(0, selected_on.tissue_rows).cpu().numpy())
                window_models.append((batch, window_model))
            if rank or type_profiles is not None:
                models.append((batch, model))
            table.index = genes[batch]
            param_tables.append(table)
            histories.append(history * (counts.shape[1] / len(genes)))
            profiles.append(profile_samples.cpu().numpy())
            release_free_memory()
        deviance, own_field = {}, np.zeros(len(genes), dtype=bool)
        if choosing:
            rank, programme_updates, deviance, own_field = choose_rank(
                counts_all[selection_window],
                np.concatenate(train_counts, axis=1),
                np.concatenate(train_starts, axis=1),
                [(part, model.kernel, model.bleed, model.distal) for part, model in window_models],
                selected_on.tissue,
                candidates,
                seed=config.seed,
                dtype=dtype,
                progress=config.progress,
            )
            del train_counts, train_starts, window_models
            logger.info(
                "rank %d and %d updates chosen by count splitting on %d spots: %s; %d genes keep their own field",
                rank,
                programme_updates,
                int(selection_window.sum()),
                deviance,
                int(own_field.sum()),
            )
        # The genes the programmes do not describe keep their per-gene fields, which the low-rank field is
        # written over.
        own_fields = corrected[:, own_field].copy()
        low_rank = (
            deconvolve_programmes(
                counts_all,
                corrected,
                [(batch, model.kernel, model.bleed, model.distal) for batch, model in models],
                geometry.tissue,
                rank,
                n_iter=programme_updates,
                seed=config.seed,
                profiles=type_profiles,
                dtype=dtype,
                progress=config.progress,
                # Without a reference the per-gene fields are not needed after the low-rank model starts.
                out=corrected if type_profiles is None else None,
            )
            if rank
            else None
        )
        if type_profiles is not None:
            centre = (
                torch.as_tensor(low_rank, device=device)
                if rank
                else reference_centre(corrected, type_profiles, device=device)
            )
            guided = 0
            for (batch, model), table in zip(models, param_tables, strict=True):
                corrected[:, batch], strength, used = _deconvolve_towards(
                    centre[:, batch],
                    corrected[:, batch],
                    counts_all[:, batch],
                    model,
                    table["prior_strength"].to_numpy(),
                    config,
                )
                guided += int(used.sum())
                table["prior_strength"] = strength
            logger.info("the reference guided %d of %d genes", guided, len(genes))
            del centre
        corrected[:, own_field] = own_fields
        # Without a reference ``low_rank`` is ``corrected``, written in place.
        del low_rank, own_fields
        models.clear()
    bar.close()
    elapsed = time.perf_counter() - started

    params = pd.concat(param_tables)
    failed = failed_genes(corrected, counts_all.sum(axis=0), genes)
    columns = dense_to_csr(corrected, rows=geometry.tissue_rows.cpu().numpy(), n_rows=geometry.n_spots)
    del corrected  # gigabytes on Visium HD, as are the dense counts
    if failed.any():
        columns = _with_columns(columns, np.flatnonzero(failed), counts_all[:, failed])
    del counts_all
    loss_history = sum(histories[1:], histories[0]).reset_index().rename(columns={"index": "epoch"})
    profile_samples = np.concatenate(profiles, axis=1)
    kernel_profile = pd.DataFrame(
        {
            "distance": geometry.profile_distance.cpu().numpy(),
            "weight": np.median(profile_samples, axis=1),
            "q25": np.quantile(profile_samples, 0.25, axis=1),
            "q75": np.quantile(profile_samples, 0.75, axis=1),
        }
    )
    resolved = asdict(config) | {
        "operator": geometry.operator.kind,
        "cutoff": config.cutoff if config.cutoff is not None else "none",
        "reach": geometry.reach,
        "pair_cutoff": getattr(geometry.operator, "cutoff", None)
        if geometry.operator.kind == "pairs"
        else "none",
        "batch_genes": batch_genes,
        "programmes": rank,
        "programme_updates": programme_updates,
        "programmes_held_out_deviance": ", ".join(
            f"{k}x{n}: {value:.6g}" for (k, n), value in deviance.items()
        )
        or "none",
        "programmes_own_field_genes": ", ".join(np.asarray(genes)[own_field]) or "none",
        "final_em_iterations": final_iterations,
        "reference_types": ",".join(reference_types) or "none",
        "trained_on_spots": int(window.sum()),
        "n_basis": N_RADIAL_BASIS,
        "device": str(device),
        "image_loss_used": config.weights["image"] > 0 and geometry.raster is not None,
    }
    logger.info("corrected %d genes in %.1f s on %s", len(genes), elapsed, device)
    store_correction(
        adata,
        corrected=columns,
        params=params.assign(corrected=~failed),
        provenance={
            "layer": key_added,
            "counts": layer or "X",
            "config": resolved,
            "kernel_profile": kernel_profile,
            "loss_history": loss_history,
        },
        counts=counts_view.X,
        key_added=key_added,
    )
    return adata if copy else None


def store_correction(
    adata: AnnData,
    *,
    corrected: np.ndarray | sp.spmatrix | sp.sparray,
    params: pd.DataFrame,
    provenance: Mapping[str, Any],
    counts: np.ndarray | sp.spmatrix | sp.sparray,
    key_added: str,
) -> None:
    """Write a correction into ``adata`` in :func:`correct`'s layout (the one writer of that layout; the
    workflow's merge assigns its chunks with it).

    Parameters
    ----------
    adata
        ``(N, G)`` sample to write into.
    corrected
        ``(N, g)`` corrected values of the genes of ``params``' index, in that order.
    params
        ``(g, ...)`` per gene: the columns of :data:`PARAMETER_COLUMNS`, ``phi_0`` ... ``phi_K`` and
        ``corrected`` (bool).
    provenance
        ``layer``, ``counts``, ``config``, ``kernel_profile``, ``loss_history`` (see :func:`correct`).
    counts
        ``(N, G)`` raw counts, which the genes not in ``params`` keep.
    key_added
        Layer of the corrected values.
    """
    from . import __version__

    position = adata.var_names.get_indexer(params.index)
    if (position < 0).any():
        raise ValueError(f"genes not in the data: {list(params.index[position < 0][:5])}")
    adata.layers[key_added] = _with_columns(counts, position, corrected)
    phi_columns = [c for c in params.columns if c.startswith("phi_")]
    for name in PARAMETER_COLUMNS:
        values = np.full(adata.n_vars, NOT_CORRECTED_VALUE)
        values[position] = params[name].to_numpy(np.float64)
        adata.var[parameter_column(name)] = values
    was_corrected = np.zeros(adata.n_vars, dtype=bool)
    was_corrected[position] = params["corrected"].to_numpy(bool)
    adata.var[CORRECTED_COLUMN] = was_corrected
    phi = np.full((adata.n_vars, len(phi_columns)), NOT_CORRECTED_VALUE)
    phi[position] = params[phi_columns].to_numpy(np.float64)
    adata.varm[PHI_KEY] = phi
    info = dict(adata.uns.get(KEY, {}))
    info["correction"] = {
        **provenance,
        "config": _jsonable(provenance["config"]),
        "version": __version__,
    }
    adata.uns[KEY] = info


def parameter_table(adata: AnnData, genes: Sequence[str] | None = None) -> pd.DataFrame:
    """The learned parameters that :func:`correct` wrote, as one table in :func:`store_correction`'s layout.

    Parameters
    ----------
    adata
        Output of :func:`correct` (or ``corrected.h5ad``, or a chunk file).
    genes
        Rows to return; default all genes.

    Returns
    -------
    ``(g, ...)`` indexed by gene: :data:`PARAMETER_COLUMNS`, ``phi_0`` ... ``phi_K`` and ``corrected``.

    Raises
    ------
    KeyError
        ``adata`` holds no correction.
    """
    view = adata if genes is None else adata[:, list(genes)]
    table = pd.DataFrame(
        {name: view.var[parameter_column(name)].to_numpy(np.float64) for name in PARAMETER_COLUMNS},
        index=view.var_names,
    )
    phi = np.asarray(view.varm[PHI_KEY], dtype=np.float64)
    for k in range(phi.shape[1]):
        table[f"phi_{k}"] = phi[:, k]
    table["corrected"] = view.var[CORRECTED_COLUMN].to_numpy(bool)
    return table


def _with_columns(
    counts: np.ndarray | sp.spmatrix | sp.sparray,
    positions: np.ndarray,
    columns: np.ndarray | sp.spmatrix | sp.sparray,
) -> np.ndarray | sp.csr_matrix:
    """Float32 ``counts`` with the columns at ``positions`` replaced by ``columns``: CSR when ``counts`` are
    sparse (corrected values are zero off tissue, and Visium HD holds millions of bins), else dense."""
    if not sp.issparse(counts):
        out = np.array(counts, dtype=np.float32)
        out[:, positions] = columns.toarray() if sp.issparse(columns) else columns
        return out
    columns = sp.csr_matrix(columns, dtype=np.float32) if sp.issparse(columns) else dense_to_csr(columns)
    if np.array_equal(positions, np.arange(counts.shape[1])):
        return columns
    counts = sp.csc_matrix(counts, dtype=np.float32)
    kept = np.setdiff1d(np.arange(counts.shape[1]), positions)
    blocks = sp.hstack([counts[:, kept], columns.tocsc()], format="csc")
    order = np.argsort(np.concatenate([kept, positions]), kind="stable")
    return blocks[:, order].tocsr()


def rediffuse(corrected: AnnData, *, layer: str | None = None) -> np.ndarray:
    """Apply each gene's learned diffusion to its corrected field: the expected observed counts.

    Parameters
    ----------
    corrected
        ``(N, g)`` output of :func:`correct` (or the merged ``corrected.h5ad``) restricted to corrected genes:
        needs ``var['undiffuse_r']``, ``['undiffuse_bleed']``, ``['undiffuse_distal']``,
        ``varm['undiffuse_phi']`` and ``uns['undiffuse']['correction']``.
    layer
        Layer holding the corrected field; default the one :func:`correct` wrote.

    Returns
    -------
    ``(N, g)`` float64 expected counts under the learned forward model, computed in float32 (as the
    correction ran) the stored ``batch_genes`` genes at a time (a kernel's FFT spectra take a few times the
    slide's size per gene).
    """
    provenance = corrected.uns[KEY]["correction"]
    settings = provenance["config"]
    stored = corrected.layers[layer or provenance["layer"]]
    cutoff = settings.get("cutoff", "none")
    config = CorrectionConfig(
        operator=settings.get("operator", "auto"),
        cutoff=None if cutoff in ("none", None) else float(cutoff),
        max_cutoff=float(settings.get("max_cutoff", 10.0)),
        kernel_tolerance=float(settings.get("kernel_tolerance", DEFAULT_TOLERANCE)),
        device="cpu",
        progress=False,
    )
    # In float32, as the correction ran.
    geometry = _geometry(corrected, config, image=None, device=torch.device("cpu"), dtype=torch.float32)
    var = corrected.var
    learned = {
        name: torch.as_tensor(var[parameter_column(name)].to_numpy(np.float32))
        for name in ("r", "bleed", "distal")
    }
    phi = torch.as_tensor(np.asarray(corrected.varm[PHI_KEY], dtype=np.float32))
    stored_batch = str(settings.get("batch_genes", ""))
    batch_genes = int(stored_batch) if stored_batch.isdigit() else DEFAULT_BATCH
    expected = np.empty(stored.shape, dtype=np.float64)
    with torch.no_grad():
        for start in range(0, stored.shape[1], batch_genes):
            batch = slice(start, start + batch_genes)
            model = DiffusionModel(
                geometry,
                gibbs_log_weights(geometry, phi[batch], learned["r"][batch]),
                learned["bleed"][batch],
                learned["distal"][batch],
            )
            field_ = torch.as_tensor(as_dense(stored[:, batch], dtype=np.float32))
            expected[:, batch] = model.forward(field_).numpy()
    return expected


def deconvolve_known_kernel(
    adata: AnnData,
    *,
    genes: Sequence[str],
    scale: np.ndarray,
    bleed: float | np.ndarray,
    distal: float | np.ndarray,
    kind: KernelKind = "gaussian",
    q_init: Mapping[str, float] | pd.Series | float | None = None,
    config: CorrectionConfig | None = None,
) -> np.ndarray:
    """EM deconvolution with a given diffusion kernel instead of a learned one.

    With the simulator's true kernel and ``config.prior_strength = 0`` this is maximum likelihood with the
    answer known: the reference the learned correction is measured against; with the default prior it is the
    maximum a posteriori estimate with the answer known. It uses the same start (soft threshold at ``q_init``),
    the same confinement to tissue, the same prior and the same EM updates as :func:`correct`.

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
    q_init, config
        As for :func:`correct` (``beta``, ``prior_strength``, ``em_iterations`` and the operator options
        matter).

    Returns
    -------
    ``(N, G)`` float32 deconvolved counts, genes deconvolved ``config.batch_genes`` at a time (each on its
    own, so the batches do not change the result).
    """
    config = config or CorrectionConfig(progress=False)
    genes = _resolve_genes(adata, genes)
    n_genes = len(genes)
    as_vector = lambda v: torch.as_tensor(np.broadcast_to(np.asarray(v, np.float32), (n_genes,)).copy())  # noqa: E731
    scale, bleed, distal = (as_vector(v) for v in (scale, bleed, distal))
    counts_all = _dense_counts(adata, genes)
    levels = torch.as_tensor(_resolve_q_init(q_init, genes), dtype=torch.float32)
    device = torch.device("cpu")
    geometry = _geometry(adata, config, image=None, device=device, dtype=torch.float32)
    batch_genes = _batch_genes(config, geometry, device)
    field_ = np.zeros_like(counts_all)
    with _deterministic_algorithms(), torch.no_grad():
        for start_gene in range(0, n_genes, batch_genes):
            batch = slice(start_gene, start_gene + batch_genes)
            counts = torch.as_tensor(counts_all[:, batch])
            soft_start = SoftStart(counts, geometry.tissue, config.beta)
            start = soft_start.start(soft_start.soft(levels[batch]))
            model = DiffusionModel(geometry, profile(scale[batch], kind), bleed[batch], distal[batch])
            prior = model.smoothness_prior(counts, config.prior_strength)
            field_[:, batch] = model.deconvolve(
                counts, start, n_iter=config.em_iterations, prior=prior, accelerate=True
            ).numpy()
    return field_


# --------------------------------------------------------------------------------------------------------------
# Input handling


def _geometry(
    adata: AnnData, config: CorrectionConfig, *, image, device: torch.device, dtype: torch.dtype
) -> SampleGeometry:
    return SampleGeometry.build(
        adata,
        operator=config.operator,
        cutoff=config.cutoff,
        max_cutoff=config.max_cutoff,
        tolerance=config.kernel_tolerance,
        image=image,
        image_size=config.image_size,
        prior_weights=config.prior_weights,
        device=device,
        dtype=dtype,
    )


def _batch_genes(config: CorrectionConfig, geometry: SampleGeometry, device: torch.device) -> int:
    """Genes per batch: the configured number, or for ``auto`` what half the free GPU memory holds."""
    if config.batch_genes != "auto":
        return int(config.batch_genes)
    if device.type != "cuda":
        return DEFAULT_BATCH
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, int(GPU_MEMORY_SHARE * free // _bytes_per_gene(geometry)))


def _bytes_per_gene(geometry: SampleGeometry) -> int:
    """Rough peak training memory of one gene: the tensors autograd keeps for the differentiated EM updates,
    about 64 arrays the size of the FFT grid (or of the pairs) and 64 the size of the spots, in float32."""
    operator = geometry.operator
    if operator.kind == "lattice":
        n_i, n_j = operator.lattice.shape
        cells = 4 * n_i * n_j  # the FFT grid is at most twice as wide and high as the lattice array
    else:
        cells = operator.n_pairs
    return 4 * 64 * (cells + geometry.n_spots)


@contextmanager
def _deterministic_algorithms() -> Iterator[None]:
    """Same seed, same device, same result: scatter-add backward passes are otherwise reduced in a
    thread-dependent order."""
    previous = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    # torch.use_deterministic_algorithms also sets a flag of the TorchInductor compiler, which this package
    # does not use, and importing the compiler costs seconds in every correction process.
    torch._C._set_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch._C._set_deterministic_algorithms(previous, warn_only=warn_only)


def _resolve_genes(adata: AnnData, genes: Sequence[str] | None) -> list[str]:
    genes = selected_genes(adata) if genes is None else list(genes)
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


def _programmes(config: CorrectionConfig, adata: AnnData, n_genes: int) -> list[int]:
    """The ranks of the low-rank model for a call on ``n_genes`` genes (none: the model is off; several: the
    candidates of :func:`~undiffuse.ot.programmes.choose_rank`): the configured one, at most one programme per
    gene; for ``"held_out"``, and for ``"auto"`` on Visium HD, the candidates that do not exceed the genes,
    which needs at least :data:`PROGRAMMES_MIN_GENES` genes."""
    if config.programmes in ("auto", "held_out") and n_genes < PROGRAMMES_MIN_GENES:
        return []
    if config.programmes == "held_out" or (config.programmes == "auto" and is_visium_hd(adata)):
        return [k for k in RANK_CANDIDATES if k <= n_genes]
    if config.programmes == "auto":
        return []
    return [min(config.programmes, n_genes)] if config.programmes > 0 else []


@torch.no_grad()
def _deconvolve_towards(
    centre: torch.Tensor,
    start: np.ndarray,
    counts: np.ndarray,
    model: DiffusionModel,
    smoothness_strength: np.ndarray,
    config: CorrectionConfig,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A batch's genes deconvolved again from their maximum a posteriori fields ``start`` under the Gamma prior
    of mode ``centre``, the part of their fields a reference's cell types explain
    (:meth:`~undiffuse.model.DiffusionModel.reference_prior`), for the genes whose strength under that prior
    exceeds the one under the smoothness prior (``smoothness_strength``): the mixture then describes their
    spot-to-spot variation more tightly than the neighbours' mean does. The others keep ``start``: a reference
    that does not describe a gene (another tissue, missing types) leaves it as it was. ``centre`` and ``start``
    are given on the tissue spots, ``(T, g)``, as are the fields returned, with each gene's total, beside the
    ``(g,)`` strengths of the priors used and the ``(g,)`` guided genes."""
    geometry = model.geometry
    observed = torch.as_tensor(counts, dtype=centre.dtype, device=centre.device)
    prior = model.reference_prior(observed, geometry.on_slide(centre))
    strength = prior.strength.cpu().numpy()
    guided = strength > smoothness_strength
    if not guided.any():
        return start, smoothness_strength, guided
    field = model.deconvolve(
        observed,
        geometry.on_slide(torch.as_tensor(start, dtype=centre.dtype, device=centre.device)),
        n_iter=config.em_iterations,
        prior=prior,
        accelerate=True,
    )
    field = with_totals(field, observed.sum(dim=0)).index_select(0, geometry.tissue_rows).cpu().numpy()
    return np.where(guided, field, start), np.where(guided, strength, smoothness_strength), guided


def _gene_ids(adata: AnnData, genes: Sequence[str]) -> pd.Index | None:
    return pd.Index(adata.var.loc[list(genes), "gene_ids"].astype(str)) if "gene_ids" in adata.var else None


def _reference_profiles(
    reference: AnnData | pd.DataFrame | str | PathLike[str] | None,
    config: CorrectionConfig,
    adata: AnnData,
    genes: Sequence[str],
) -> tuple[list[str], np.ndarray | None]:
    """The cell types of ``reference`` (see :func:`correct`) and their ``(types, G)`` profiles of ``genes``
    (:func:`undiffuse.reference.profiles_for`); no types and ``None`` without a reference."""
    if reference is None:
        return [], None
    source = None
    if isinstance(reference, str | PathLike):
        source = Path(reference)
        table = (
            read_profiles(source)
            if source.suffix in (".tsv", ".txt")
            else read_reference(source, config.reference_key)
        )
    elif isinstance(reference, AnnData):
        table = reference_profiles(reference, config.reference_key)
    else:
        table = reference
    if config.programmes != "auto":
        raise ConfigError(
            f"programmes is set by the reference's {table.shape[1]} cell types; leave programmes at 'auto'"
        )
    profiles = profiles_for(table, pd.Index(genes), _gene_ids(adata, genes))
    if not np.isfinite(profiles).all(axis=0).any():
        raise InputError(
            source,
            f"the reference shares none of the {len(genes)} genes to correct (e.g. {', '.join(list(genes)[:3])}); "
            "give a reference with the sample's gene names or ids",
        )
    return list(map(str, table.columns)), profiles


def _counts_view(adata: AnnData, layer: str | None) -> AnnData:
    """``adata`` itself, or for ``layer`` an AnnData sharing its annotations whose ``X`` is that layer."""
    if layer is None:
        return adata
    if layer not in adata.layers:
        raise InputError(adata.uns.get(KEY, {}).get("source"), f"has no layer {layer!r} of raw counts")
    return AnnData(X=adata.layers[layer], obs=adata.obs, var=adata.var, obsm=dict(adata.obsm), uns=adata.uns)


def _dense_counts(adata: AnnData, genes: Sequence[str]) -> np.ndarray:
    return as_dense(adata[:, list(genes)].X, dtype=np.float32)


def _jsonable(values: Mapping[str, Any]) -> dict[str, Any]:
    """Configuration values that h5ad can store (no ``None``)."""
    return {k: ("none" if v is None else dict(v) if isinstance(v, Mapping) else v) for k, v in values.items()}
