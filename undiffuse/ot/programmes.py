r"""Genes that share structure: EM deconvolution under a low-rank Poisson model of the true field.

Cells of a few types make up a tissue, so the true fields of many genes are mixtures of a few expression
programmes: :math:`z = W H`, with :math:`W \ge 0` the ``(N, k)`` weights of the programmes in each spot (zero
off tissue) and :math:`H \ge 0` the ``(k, G)`` programmes. Each gene keeps its own diffusion kernel
:math:`K_g` (:mod:`undiffuse.ot.deconvolution`):

.. math::

    x_g \sim \mathrm{Poisson}\big(K_g^\top (W H)_{\cdot g}\big).

This is Poisson non-negative matrix factorisation (Lee & Seung 2001) with a blur per column. With
:math:`B = K(x / K^\top z)`, gene by gene (:func:`~undiffuse.ot.deconvolution.back_projected_ratio`), the
gradient of the log-likelihood is :math:`B - 1` on tissue (where :math:`K \mathbf 1 = \mathbf 1`), and the
multiplicative updates

.. math::

    W \leftarrow W \odot \frac{B H^\top}{\mathbf 1 H^\top}, \qquad
    H \leftarrow H \odot \frac{W^\top B}{W^\top \mathbf 1}

never decrease it (they are EM updates for the latent molecules of each programme). The :math:`H` update
keeps each gene's total. A spot is described by :math:`k` numbers instead of :math:`G`, so a gene with few
counts borrows its shape, and its borders, from the genes of its programmes: the low-rank model removes
counting noise without the spatial smoothing of the Gamma prior (:mod:`undiffuse.ot.prior`), which pulls
expression across domain borders.

The start is a plain Poisson NMF (no blur) of the maximum a posteriori field, and the number of updates is
small (:data:`PROGRAMME_ITERATIONS`): with :math:`k` close to :math:`G` the model can fit counting noise, and
stopping early keeps the denoising of its start.

References
----------
Lee, D. D. & Seung, H. S. (2001). Algorithms for non-negative matrix factorization. Advances in Neural
Information Processing Systems 13, 556-562.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..operators import Kernel
from .deconvolution import back_projected_ratio

#: Multiplicative updates of the low-rank EM, after its start.
PROGRAMME_ITERATIONS = 30
#: Updates of the Poisson NMF that starts it.
START_ITERATIONS = 100


def poisson_nmf(
    values: torch.Tensor, rank: int, *, n_iter: int = START_ITERATIONS, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Poisson (KL) NMF :math:`V \approx W H` by multiplicative updates, from a seeded random start.

    Parameters
    ----------
    values
        ``(M, G)`` non-negative values.
    rank
        :math:`k`.

    Returns
    -------
    ``(M, k)`` :math:`W` and ``(k, G)`` :math:`H`.
    """
    generator = torch.Generator().manual_seed(seed)
    dtype, tiny = values.dtype, torch.finfo(values.dtype).tiny
    weights = (torch.rand(values.shape[0], rank, generator=generator, dtype=dtype) + 0.5).to(values.device)
    scale = values.mean(dim=0, keepdim=True) + tiny
    programmes = (
        scale
        * (torch.rand(rank, values.shape[1], generator=generator, dtype=dtype) + 0.5).to(values.device)
        / rank
    )
    for _ in range(n_iter):
        weights = weights * ((values / (weights @ programmes).clamp_min(tiny)) @ programmes.T)
        weights = weights / programmes.sum(dim=1).clamp_min(tiny)
        ratio = values / (weights @ programmes).clamp_min(tiny)
        programmes = programmes * (weights.T @ ratio) / weights.sum(dim=0).clamp_min(tiny)[:, None]
    return weights, programmes


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
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> np.ndarray:
    """EM deconvolution of all genes at once under the low-rank model :math:`z = W H`.

    Parameters
    ----------
    counts
        ``(N, G)`` observations.
    start
        ``(N, G)`` a field to start from (the maximum a posteriori EM of each gene), zero off tissue.
    kernels
        ``(genes, kernel, bleed, distal)`` for consecutive batches of genes: the columns they cover, their
        bound kernel :math:`P` and their ``(g,)`` shares.
    tissue
        ``(N,)`` boolean tissue mask.
    rank
        Number of programmes :math:`k`.
    n_iter
        Updates of :math:`W` and :math:`H` (each applies every gene's kernel and its transpose twice).
    seed
        Seed of the start's Poisson NMF.
    dtype
        Precision of the updates.
    progress
        Show a progress bar over the updates.

    Returns
    -------
    ``(N, G)`` field :math:`W H` with each gene's total of ``counts``.
    """
    device = tissue.device
    rows = torch.as_tensor(np.flatnonzero(tissue.cpu().numpy()), device=device)
    tiny = torch.finfo(dtype).tiny
    inside, programmes = poisson_nmf(
        torch.as_tensor(start, dtype=dtype, device=device)[rows], rank, seed=seed
    )
    weights = torch.zeros(tissue.shape[0], rank, dtype=dtype, device=device).index_copy(0, rows, inside)
    batches = [
        (genes, torch.as_tensor(counts[:, genes], dtype=dtype, device=device), *rest)
        for genes, *rest in kernels
    ]

    def factors(genes, observed, kernel, bleed, distal):
        return back_projected_ratio(weights @ programmes[:, genes], observed, kernel, bleed, distal)[0]

    for _ in tqdm(
        range(n_iter), desc=f"programmes [k={rank}]", unit="update", disable=not progress or None, leave=False
    ):
        numerator = torch.zeros_like(weights)
        for genes, observed, *model in batches:
            numerator += factors(genes, observed, *model) @ programmes[:, genes].T
        weights = weights * numerator / programmes.sum(dim=1).clamp_min(tiny)
        for genes, observed, *model in batches:
            update = weights.T @ factors(genes, observed, *model)
            programmes[:, genes] = programmes[:, genes] * update / weights.sum(dim=0).clamp_min(tiny)[:, None]
    field = (weights @ programmes).cpu().numpy()
    totals = counts.sum(axis=0, dtype=np.float64)
    mass = field.sum(axis=0, dtype=np.float64)
    scale = np.divide(totals, mass, out=np.zeros_like(totals), where=mass > 0)
    # In place: on a Visium HD call the field is gigabytes.
    np.multiply(field, scale, out=field, casting="unsafe")
    return field.astype(counts.dtype, copy=False)
