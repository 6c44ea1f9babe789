r"""Genes that share structure: EM deconvolution under a low-rank Poisson model of the true field.

Cells of a few types make up a tissue, so the true fields of many genes are mixtures of a few expression
programmes: :math:`z = W H`, with :math:`W \ge 0` the ``(N, k)`` weights of the programmes in each spot (zero
off tissue) and :math:`H \ge 0` the ``(k, G)`` programmes. Each gene keeps its own diffusion kernel
:math:`K_g` (:mod:`undiffuse.ot.deconvolution`):

.. math::

    x_g \sim \mathrm{Poisson}\big(K_g^\top (W H)_{\cdot g}\big).

This is Poisson non-negative matrix factorisation (Lee & Seung 2001) with a blur per column, fitted by EM.
The E-step gives each gene's expected molecules at their source, :math:`Y = (W H) \odot B` with
:math:`B = K(x / K^\top z)` gene by gene (:func:`~undiffuse.ot.deconvolution.back_projected_ratio`); with
:math:`K \mathbf 1 = \mathbf 1` on tissue, the expected complete-data log-likelihood is then
:math:`\sum Y \log(W H) - W H`, the objective of a plain Poisson NMF of :math:`Y`. The M-step is that NMF,
:data:`M_STEP_ITERATIONS` of its multiplicative updates (:func:`poisson_nmf`) from the current factors, each of
which raises it, so no EM update lowers the likelihood of the counts. The E-step applies every gene's
kernel and its transpose; the NMF updates only multiply ``(T, k)`` by ``(k, G)`` matrices, so a whole M-step
costs about what one E-step does and the EM needs several times fewer E-steps than with a single
multiplicative update per E-step (on ``benchmarks/hd.py``'s 2 mm slide, whose truth has rank 4, 4 programmes
reach RMSE 0.46 after 10 updates, where one multiplicative update per E-step needed 90). The H updates keep
each gene's total. A spot is described by :math:`k` numbers instead of :math:`G`, so a gene with few counts
borrows its shape, and its borders, from the genes of its programmes: the low-rank model removes counting
noise without the spatial smoothing of the Gamma prior (:mod:`undiffuse.ot.prior`), which pulls expression
across domain borders.

The start is a plain Poisson NMF (no blur) of the maximum a posteriori field, whose programmes start from rows
of that field (:func:`successive_projections`): the low-rank EM keeps the local optimum its start lies in, so
the start is not left to chance. How far the EM should go
depends on the rank: above the rank of the truth the model fits counting noise as it converges, and stopping
early keeps the denoising of its start, while at the truth's rank it keeps gaining (on the same slide, 8
programmes are best after 15 updates and 12 after 5; on the HD simulator's 2 mm slide, whose cells of several
types are not exactly low rank, 8 programmes are best after 5). So where the rank is chosen from the data the
number of updates is chosen with it; a fixed rank makes :data:`PROGRAMME_ITERATIONS`. That field only starts
the model, so the per-gene EM that makes it stops early too (:data:`START_EM_ITERATIONS`).
:func:`low_rank_updates` gives the EM updates one at a time.

The rank may be chosen from the data (:func:`choose_rank`) by count splitting (Neufeld et al. 2024): each count is
split into two independent Poisson halves (binomial thinning), the model is fitted to one half for each
candidate rank, and the rank whose fit best predicts the other half (lowest held-out Poisson deviance) is kept.
Unlike held-out entries of a smoothed field, the held-out counts carry counting noise of their own that no rank
can fit, so a rank that fits noise predicts them worse. The number of updates is chosen with the rank, among
:data:`UPDATE_CANDIDATES`. The rank is chosen by default on Visium HD (``programmes: auto`` of
:func:`undiffuse.correct`). The choice is made with all the genes, on a
window of the slide: each spot's weights :math:`W` are fitted to its genes, so with fewer genes they are noisier
and fewer programmes predict better, while the programmes :math:`H` need far fewer spots than a Visium HD slide
holds.

A reference of cell types gives the programmes instead (``profiles``): their shapes across the types are
kept and each gene learns only its scale. Spots vary beyond a mixture of a few types, so the correction does
not stop at that mixture; it centres a Gamma prior on it (:class:`~undiffuse.ot.prior.CentredPrior`). Where
the low-rank model is off, :func:`reference_centre` fits the mixture to the per-gene fields instead.

References
----------
Araujo, M. C. U., Saldanha, T. C. B., Galvao, R. K. H., Yoneyama, T., Chame, H. C. & Visani, V. (2001). The
successive projections algorithm for variable selection in spectroscopic multicomponent analysis. Chemometrics
and Intelligent Laboratory Systems 57, 65-73.

Gillis, N. & Vavasis, S. A. (2014). Fast and robust recursive algorithms for separable nonnegative matrix
factorization. IEEE Transactions on Pattern Analysis and Machine Intelligence 36, 698-714.

Lee, D. D. & Seung, H. S. (2001). Algorithms for non-negative matrix factorization. Advances in Neural
Information Processing Systems 13, 556-562.

Neufeld, A., Gao, L. L., Popp, J., Battle, A. & Witten, D. (2024). Inference after latent variable estimation
for single-cell RNA sequencing data. Biostatistics 25, 270-287.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from ..diffusion import expected_counts
from ..losses import poisson_loss
from ..operators import Kernel, on_slide
from .deconvolution import back_projected_ratio, with_totals

#: Updates of the low-rank EM, after its start, with a rank that is not chosen from the data.
PROGRAMME_ITERATIONS = 10
#: Updates of the Poisson NMF that starts it.
START_ITERATIONS = 100
#: Share of each gene's mean below which no entry of the programmes' start lies.
START_FLOOR = 1e-3
#: Poisson NMF updates of each M-step of the low-rank EM.
M_STEP_ITERATIONS = 10
#: Per-gene maximum a posteriori EM updates of the field that the Poisson NMF of the start factorises: on the
#: HD simulator's slide, 9, 15 and 60 updates give the low-rank model's result the same RMSE to 1e-3.
START_EM_ITERATIONS = 9
#: Rows the Poisson NMF updates at a time.
NMF_BLOCK_ROWS = 16_384
#: Rows :func:`successive_projections` reads at a time, in double precision.
PROJECTION_BLOCK_ROWS = 1_024
#: Updates of the Poisson NMF that fits a reference's cell types to a field (:func:`reference_centre`).
REFERENCE_ITERATIONS = 200
#: Ranks and numbers of updates among which :func:`choose_rank` chooses, the share of each count its training
#: half keeps, and the spots of the window of the slide it fits (with all the genes: each spot's weights are
#: determined by the genes, so fewer genes would favour fewer programmes): each rank costs a low-rank EM of
#: that window with the most updates.
RANK_CANDIDATES = (4, 8, 12, 16)
UPDATE_CANDIDATES = (2, 5, 10, 20, 40)
TRAIN_SHARE = 0.5
RANK_SELECTION_SPOTS = 16_384


def split_counts(
    counts: np.ndarray, generator: np.random.Generator, share: float = TRAIN_SHARE
) -> np.ndarray:
    """The training half of count splitting: each count thinned binomially to ``share`` of it. It and the rest
    are independent Poisson counts of expectations ``share`` and ``1 - share`` times the counts'."""
    return generator.binomial(np.asarray(counts, dtype=np.int64), share).astype(np.float32)


class RankChoice(NamedTuple):
    """What :func:`choose_rank` chose: the rank, its number of updates, the held-out deviance of each
    ``(rank, updates)`` pair, and the ``(G,)`` genes whose own field predicts their held-out half better than
    the chosen fit does (the programmes do not describe them)."""

    rank: int
    updates: int
    deviance: dict[tuple[int, int], float]
    own_field: np.ndarray


@torch.no_grad()
def choose_rank(
    counts: np.ndarray,
    train: np.ndarray,
    start: np.ndarray,
    kernels: Sequence[tuple[slice, Kernel, torch.Tensor, torch.Tensor]],
    tissue: torch.Tensor,
    candidates: Sequence[int],
    *,
    updates: Sequence[int] = UPDATE_CANDIDATES,
    share: float = TRAIN_SHARE,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> RankChoice:
    r"""The rank of the low-rank model and its number of updates, chosen by count splitting, the held-out
    deviance of each pair, and the genes that the chosen fit predicts worse than their own fields.

    For each rank :math:`k`, the low-rank EM (:func:`low_rank_updates`) fits the training half :math:`x'`
    of the counts (:func:`split_counts`) from ``start``; after each number of ``updates``, its expected counts
    scaled to the other half, :math:`\hat\mu = \tfrac{1 - \epsilon}{\epsilon} K^\top (W H)`, are scored
    against that half :math:`x'' = x - x'` by the Poisson deviance
    :math:`2 \sum (\hat\mu - x'' + x'' \log(x'' / \hat\mu))`. How far the EM has gone matters as much as
    the rank: a rank above the truth's fits counting noise as it converges, while
    the truth's rank keeps gaining. The pair is chosen together, each rank's numbers of updates costing one
    fit, which stops at the first number of updates whose deviance rises (the held-out deviance falls, then
    rises, as the fit goes from the start's blur to the counting noise): the deviances of a rank are those
    of a prefix of ``updates``.

    The choice is a sum over genes, which the genes of many counts and of the tissue's common programmes
    dominate. A gene of a rare kind of cell, few counts and a pattern of its own is flattened by a rank too low
    to give that kind a programme; its own field (``start``) then predicts its held-out half better than the
    chosen fit, and the caller keeps that field (on the HD simulator's slide, five of the seven markers of its
    rarest cell type, which four programmes flattened).

    Parameters
    ----------
    counts, train
        ``(N, G)`` the counts and their training half.
    start
        ``(T, G)`` the per-gene fields of the training half on the tissue spots (the low-rank model's start).
    kernels, tissue
        As for :func:`deconvolve_programmes`.
    candidates
        Ranks to try.
    updates
        Numbers of updates to try.
    share
        :math:`\epsilon`, the share of the counts in the training half.
    seed, dtype
        As for :func:`deconvolve_programmes`.
    progress
        Show a progress bar over the candidates.

    Returns
    -------
    :class:`RankChoice`: the rank and number of updates of least held-out deviance, ``{(rank, updates):
    deviance}``, and the ``(G,)`` boolean genes whose held-out deviance under their ``start`` field is lower
    than under the chosen fit.
    """
    device = tissue.device
    rows = torch.nonzero(tissue).reshape(-1)
    held_out = torch.as_tensor(counts - train, dtype=dtype, device=device)
    totals = torch.as_tensor(train.sum(axis=0), dtype=dtype, device=device)
    checkpoints = sorted(set(updates))

    def gene_deviance(fields: Iterator[tuple[tuple, torch.Tensor]]) -> torch.Tensor:
        """``(G,)`` each gene's held-out deviance under the ``(T, g)`` fields of the kernels' batches."""
        per_gene = torch.empty(counts.shape[1], dtype=torch.float64, device=device)
        for (genes, kernel, bleed, distal), inside in fields:
            expected = expected_counts(on_slide(inside, rows, tissue.shape[0]), kernel, bleed, distal)
            expected *= (1.0 - share) / share
            # poisson_loss is the half deviance per spot.
            per_gene[genes] = 2.0 * len(held_out) * poisson_loss(held_out[:, genes], expected)
        return per_gene

    own = gene_deviance(
        (batch, torch.as_tensor(start[:, batch[0]], dtype=dtype, device=device)) for batch in kernels
    )
    deviance, by_gene = {}, {}
    for rank in tqdm(candidates, desc="rank", unit="rank", disable=not progress or None, leave=False):
        fits = low_rank_updates(train, start, kernels, tissue, rank, seed=seed, dtype=dtype)
        previous = np.inf
        for done, (weights, programmes) in enumerate(itertools.islice(fits, checkpoints[-1] + 1)):
            if done not in checkpoints:
                continue
            pair = int(rank), done
            by_gene[pair] = gene_deviance(_batch_fields(weights, programmes, rows, totals, kernels))
            deviance[pair] = float(by_gene[pair].sum())
            if deviance[pair] > previous:
                break
            previous = deviance[pair]
    rank, n_updates = min(deviance, key=deviance.get)
    own_field = (own < by_gene[rank, n_updates]).cpu().numpy()
    return RankChoice(rank, n_updates, deviance, own_field)


def update_programmes(
    programmes: torch.Tensor, numerator: torch.Tensor, denominator: torch.Tensor, shaped: torch.Tensor | None
) -> torch.Tensor:
    r"""The multiplicative update :math:`H \leftarrow H \odot N / D` of ``(k, G)`` programmes, in place.

    ``numerator`` is ``(k, G)`` :math:`W^\top B`, ``denominator`` ``(k,)`` :math:`W^\top \mathbf 1`. The genes
    of the ``(G,)`` mask ``shaped`` keep the shape of their column (a reference's cell-type profile) and take
    only a scale :math:`s_g`, whose EM update pools the programmes:
    :math:`s_g \leftarrow s_g \sum_t H_{tg} N_{tg} / \sum_t H_{tg} D_t`.
    """
    tiny = torch.finfo(programmes.dtype).tiny
    free = numerator / denominator.clamp_min(tiny)[:, None]
    if shaped is not None and bool(shaped.any()):
        pooled = (programmes * numerator).sum(dim=0) / (programmes * denominator[:, None]).sum(
            dim=0
        ).clamp_min(tiny)
        free = torch.where(shaped[None, :], pooled[None, :], free)
    return programmes.mul_(free)


def poisson_nmf(
    values: torch.Tensor,
    rank: int,
    *,
    n_iter: int = START_ITERATIONS,
    seed: int = 0,
    weights: torch.Tensor | None = None,
    programmes: torch.Tensor | None = None,
    shaped: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Poisson (KL) NMF :math:`V \approx W H` by multiplicative updates, from a seeded random start.

    Parameters
    ----------
    values
        ``(M, G)`` non-negative values.
    rank
        :math:`k`.
    weights
        ``(M, k)`` start of :math:`W` (default: random).
    programmes
        ``(k, G)`` start of :math:`H` (default: random around each gene's mean).
    shaped
        ``(G,)`` genes whose column of ``programmes`` keeps its shape (:func:`update_programmes`).

    Returns
    -------
    ``(M, k)`` :math:`W` and ``(k, G)`` :math:`H`.
    """
    generator = torch.Generator().manual_seed(seed)
    dtype, tiny = values.dtype, torch.finfo(values.dtype).tiny
    if weights is None:
        weights = (torch.rand(values.shape[0], rank, generator=generator, dtype=dtype) + 0.5).to(
            values.device
        )
    if programmes is None:
        scale = values.mean(dim=0, keepdim=True) + tiny
        programmes = (
            scale
            * (torch.rand(rank, values.shape[1], generator=generator, dtype=dtype) + 0.5).to(values.device)
            / rank
        )
    else:
        programmes = programmes.clone()

    # A block of rows at a time, in place on the product: ``values`` may be a whole Visium HD call.
    blocks = [slice(i, i + NMF_BLOCK_ROWS) for i in range(0, values.shape[0], NMF_BLOCK_ROWS)]

    def ratio(rows: slice) -> torch.Tensor:
        product = (weights[rows] @ programmes).clamp_min_(tiny)
        return torch.div(values[rows], product, out=product)

    for _ in range(n_iter):
        totals = programmes.sum(dim=1).clamp_min(tiny)
        weights = torch.cat([weights[rows] * (ratio(rows) @ programmes.T) / totals for rows in blocks])
        numerator = sum(weights[rows].T @ ratio(rows) for rows in blocks)
        update_programmes(programmes, numerator, weights.sum(dim=0), shaped)
    return weights, programmes


def successive_projections(values: torch.Tensor, rank: int) -> torch.Tensor:
    r"""The rows of ``values`` whose profiles are the vertices of the others' hull, by the successive projection
    algorithm (Araujo et al. 2001; Gillis & Vavasis 2014): the start of the programmes of :func:`poisson_nmf`.

    Where each row is a non-negative mixture :math:`w_i^\top H` of ``rank`` programmes and some rows are pure, the
    rows' profiles :math:`v_i / \sum v_i` lie in the simplex spanned by the programmes' profiles, and a vertex has
    the largest norm. The algorithm takes the profile of largest norm, projects every profile onto the orthogonal
    complement of it, and repeats. Only the rows of at least the median total take part, whose profiles carry
    the least counting noise. Unlike a random start, it does not leave the fit in one local optimum or another
    by chance: on ``benchmarks/hd.py``'s 2 mm slide a third of the random starts of rank 4 left the low-rank EM at
    RMSE 0.58-0.61, where the others and this start reach 0.41-0.43. Beyond the number of kinds of pure rows the
    data hold, each pick is the row least explained by those before, often a noisy one.

    Parameters
    ----------
    values
        ``(M, G)`` non-negative values.
    rank
        Number of rows to pick.

    Returns
    -------
    ``(rank,)`` indices of the rows, in the order picked.
    """
    totals = values.sum(dim=1)
    candidates = torch.nonzero((totals >= totals.median()) & (totals > 0)).reshape(-1)
    blocks = [
        candidates[i : i + PROJECTION_BLOCK_ROWS] for i in range(0, len(candidates), PROJECTION_BLOCK_ROWS)
    ]

    def profiles(rows: torch.Tensor) -> torch.Tensor:
        return values[rows].double() / totals[rows, None]

    # Squared norms of the projected profiles, updated as each direction is removed (Gram-Schmidt), so no
    # projected copy of the values is made.
    residual = torch.cat([profiles(rows).square().sum(dim=1) for rows in blocks])
    basis, picked = [], []
    for _ in range(rank):
        best = int(torch.argmax(residual))
        picked.append(candidates[best])
        direction = profiles(candidates[best : best + 1])[0]
        for axis in basis:
            direction -= (direction @ axis) * axis
        direction /= direction.norm().clamp_min(torch.finfo(direction.dtype).tiny)
        basis.append(direction)
        residual -= torch.cat([(profiles(rows) @ direction).square() for rows in blocks])
    return torch.stack(picked)


@torch.no_grad()
def deconvolve_programmes(
    counts: np.ndarray,
    start: np.ndarray,
    kernels: Sequence[tuple[slice, Kernel, torch.Tensor, torch.Tensor]],
    tissue: torch.Tensor,
    rank: int,
    *,
    n_iter: int = PROGRAMME_ITERATIONS,
    seed: int = 0,
    profiles: np.ndarray | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """EM deconvolution of all genes at once under the low-rank model :math:`z = W H`.

    Parameters
    ----------
    counts
        ``(N, G)`` observations.
    start
        ``(T, G)`` a field to start from (the maximum a posteriori EM of each gene) on the tissue spots, in
        order: fields are zero off tissue, and on Visium HD only the tissue's half of the slide is kept.
    kernels
        ``(genes, kernel, bleed, distal)`` for consecutive batches of genes: the columns they cover, their
        bound kernel :math:`P` and their ``(g,)`` shares.
    tissue
        ``(N,)`` boolean tissue mask.
    rank
        Number of programmes :math:`k`.
    n_iter
        Updates of :math:`W` and :math:`H` (each applies every gene's kernel and its transpose once).
    seed
        Seed of the random weights that start the Poisson NMF (its programmes start from rows of ``start``).
    profiles
        ``(k, G)`` a reference's cell-type profiles (:func:`undiffuse.reference.profiles_for`; NaN for a gene
        it lacks): the programmes start from them, and a gene the reference holds keeps its profile's shape
        across the types, learning only its scale (:func:`update_programmes`).
    dtype
        Precision of the updates.
    progress
        Show a progress bar over the updates.
    out
        ``(T, G)`` array to write the field into; it may be ``start``, which is read before.

    Returns
    -------
    ``(T, G)`` field :math:`W H` on the tissue spots with each gene's total of ``counts`` (``out`` when
    given).
    """
    rows = torch.nonzero(tissue).reshape(-1)
    out = np.empty((len(rows), counts.shape[1]), dtype=counts.dtype) if out is None else out
    # ``out`` holds the EM's expected sources until the field is written into it.
    fits = low_rank_updates(
        counts, start, kernels, tissue, rank, seed=seed, profiles=profiles, dtype=dtype, scratch=out
    )
    bar = tqdm(
        itertools.islice(fits, n_iter),
        total=n_iter,
        desc=f"programmes [k={rank}]",
        unit="update",
        disable=not progress or None,
        leave=False,
    )
    # The start, then the updates; only the last is kept (each holds new weights).
    weights, programmes = collections.deque(itertools.chain([next(fits)], bar), maxlen=1)[0]
    # Batch by batch into ``out``: on a Visium HD call the field is gigabytes.
    totals = torch.as_tensor(counts.sum(axis=0), dtype=dtype, device=tissue.device)
    for (genes, *_), field in _batch_fields(weights, programmes, rows, totals, kernels):
        out[:, genes] = field.cpu().numpy()
    return out


def _batch_fields(
    weights: torch.Tensor,
    programmes: torch.Tensor,
    rows: torch.Tensor,
    totals: torch.Tensor,
    kernels: Sequence[tuple[slice, Kernel, torch.Tensor, torch.Tensor]],
) -> Iterator[tuple[tuple[slice, Kernel, torch.Tensor, torch.Tensor], torch.Tensor]]:
    """Each batch of ``kernels`` with its ``(T, g)`` field :math:`W H` on the tissue ``rows``, rescaled to the
    ``(G,)`` gene ``totals``: what :func:`deconvolve_programmes` returns and :func:`choose_rank` scores."""
    inside = weights[rows]
    for batch in kernels:
        genes = batch[0]
        yield batch, with_totals(inside @ programmes[:, genes], totals[genes])


def low_rank_updates(
    counts: np.ndarray,
    start: np.ndarray,
    kernels: Sequence[tuple[slice, Kernel, torch.Tensor, torch.Tensor]],
    tissue: torch.Tensor,
    rank: int,
    *,
    seed: int = 0,
    profiles: np.ndarray | None = None,
    dtype: torch.dtype = torch.float32,
    scratch: np.ndarray | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The low-rank EM of :func:`deconvolve_programmes` (same parameters), one update at a time: ``(N, k)``
    weights :math:`W` (zero off tissue) and ``(k, G)`` programmes :math:`H`, first at the start, then after
    each update, without end. ``scratch``, a ``(T, G)`` array (it may be ``start``, which is read first),
    holds the E-step's expected sources instead of a new one: on a Visium HD call they are gigabytes."""
    device = tissue.device
    rows = torch.nonzero(tissue).reshape(-1)
    shaped, initial = _reference_start(profiles, dtype, device)
    values = torch.as_tensor(start, dtype=dtype, device=device)
    if initial is None:
        # The rows picked, floored so that no gene is held at zero by the multiplicative updates.
        initial = torch.maximum(
            values[successive_projections(values, rank)], START_FLOOR * values.mean(dim=0)
        )
    inside, programmes = poisson_nmf(values, rank, seed=seed, programmes=initial, shaped=shaped)
    # On a GPU ``values`` is a copy of the start, which the EM no longer needs.
    del values, initial
    # Column views of the counts, not copies (on the CPU, where ``counts`` has the working precision).
    observed_all = torch.as_tensor(counts, dtype=dtype, device=device)
    batches = [(genes, observed_all[:, genes], *rest) for genes, *rest in kernels]
    sources = (
        torch.empty(len(rows), counts.shape[1], dtype=dtype, device=device)
        if scratch is None
        else torch.as_tensor(scratch, dtype=dtype, device=device)
    )
    weights = on_slide(inside, rows, tissue.shape[0])
    yield weights, programmes
    while True:
        # E-step: each gene's expected molecules at their source, the field times its back-projected ratio.
        for genes, observed, *model in batches:
            field = weights @ programmes[:, genes]
            back = back_projected_ratio(field, observed, *model)[0]
            torch.mul(field[rows], back[rows], out=sources[:, genes])
            del field, back
        # M-step: their Poisson NMF, from the current factors.
        inside, programmes = poisson_nmf(
            sources, rank, n_iter=M_STEP_ITERATIONS, weights=inside, programmes=programmes, shaped=shaped
        )
        weights = on_slide(inside, rows, tissue.shape[0])
        yield weights, programmes


@torch.no_grad()
def reference_centre(
    field: np.ndarray,
    profiles: np.ndarray,
    *,
    n_iter: int = REFERENCE_ITERATIONS,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    r"""``(T, G)`` the part of a field that a reference's cell types explain: :math:`W H` with the programmes
    :math:`H` kept to the shapes of the reference's profiles.

    A Poisson NMF of the field (:func:`poisson_nmf`) whose ``(k, G)`` programmes start from
    ``profiles`` and keep, for every gene the reference holds, its profile's shape across the :math:`k` types,
    learning only a scale per gene (capture differs between platforms); a gene the reference lacks (NaN)
    starts flat and learns its programme values. Each gene keeps its total.

    Parameters
    ----------
    field
        ``(T, G)`` a deconvolved field on the tissue spots.
    profiles
        ``(k, G)`` the reference's profiles (:func:`undiffuse.reference.profiles_for`).
    dtype, device
        Precision and device of the updates.
    """
    values = torch.as_tensor(field, dtype=dtype, device=device)
    shaped, initial = _reference_start(profiles, dtype, device)
    weights, programmes = poisson_nmf(
        values, initial.shape[0], n_iter=n_iter, programmes=initial, shaped=shaped
    )
    return with_totals(weights @ programmes, values.sum(dim=0))


def _reference_start(
    profiles: np.ndarray | None, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The ``(G,)`` genes that keep their reference profile's shape and the ``(k, G)`` programmes to start
    from (a gene the reference lacks starts flat across the types); ``None`` twice without a reference."""
    if profiles is None:
        return None, None
    reference = torch.as_tensor(profiles, dtype=dtype, device=device)
    shaped = torch.isfinite(reference).all(dim=0)
    return shaped, torch.where(shaped[None, :], reference, torch.ones((), dtype=dtype, device=device))
