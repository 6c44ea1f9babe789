r"""The seed's balanced-OT formulation, kept as a documented baseline for benchmarks and tests.

Per gene, the seed solves balanced entropic OT (``ot.bregman.sinkhorn_stabilized``) between the normalised
counts :math:`a = x / \sum x` and the normalised soft-thresholded counts :math:`b = b_g / \sum b_g`, with cost
:math:`M = W \odot D^2`, and reads the corrected field as :math:`(\sum x)\, \gamma^\top \mathbf 1`. Because a
balanced plan satisfies :math:`\gamma^\top \mathbf 1 = b` by construction, this output **is the normalised soft
threshold**, whatever :math:`W` and the regularisation: the transport cannot move any mass, and only the
quantile level changes the result. That is why the correction uses the Gibbs kernel as a forward model
(:mod:`undiffuse.correct`) instead; this module shows the seed's formulation as it is, so that benchmarks can
report it and tests can check the identity.

Where the dense problem fits in memory, the plan is POT's own; otherwise the same problem is solved on neighbour
pairs by :func:`undiffuse.ot.sinkhorn.sinkhorn_log`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import ot
import torch
from anndata import AnnData

from ..arrays import as_dense
from ..geometry import qc_reach
from ..model import SoftStart
from ..sparse_ops import column_sums
from ..spatial import neighbour_pairs, pitch_coordinates, tissue_spots
from .sinkhorn import sinkhorn_log

#: Largest number of spots whose dense ``N x N`` cost POT is given (float64: 8 N^2 bytes).
MAX_DENSE_SPOTS = 3000


def balanced_ot_baseline(
    adata: AnnData,
    *,
    genes: Sequence[str],
    q: float | np.ndarray = 0.5,
    beta: float = 50.0,
    reg: float | None = None,
    num_iter: int = 1000,
    max_dense_spots: int = MAX_DENSE_SPOTS,
) -> np.ndarray:
    r"""The seed's correction: ``(sum x) * gamma^T 1`` of balanced entropic OT from the counts to their soft
    threshold, with :math:`W = 1` (the seed's initialisation).

    Parameters
    ----------
    adata
        Canonical AnnData (raw counts on all spots, tissue mask, ``obsm['spatial']``).
    genes
        Genes to correct.
    q
        Quantile level(s) of the soft threshold (e.g. the Moran's I scan's ``q_init``).
    beta
        Sharpness of the soft threshold.
    reg
        Entropic regularisation; default :math:`2 s^2` from the QC's diffusion scale :math:`s`, else 1.
    num_iter
        Sinkhorn iterations.
    max_dense_spots
        Up to this many spots POT solves the dense problem; beyond, pairs within the QC's diffusion range.

    Returns
    -------
    ``(N, G)`` float64 corrected counts, equal to the soft threshold rescaled to each gene's total.
    """
    info = adata.uns.get("undiffuse", {})
    coords = pitch_coordinates(adata)
    tissue = torch.as_tensor(tissue_spots(adata))
    counts = torch.as_tensor(as_dense(adata[:, list(genes)].X))
    levels = torch.as_tensor(np.broadcast_to(np.asarray(q, dtype=np.float64), (counts.shape[1],)).copy())
    soft = SoftStart(counts, tissue, beta).soft(levels)
    if reg is None:
        scale = info.get("diffusion_scale")
        reg = 2.0 * float(scale) ** 2 if scale else 1.0
    totals = counts.sum(dim=0)
    a = counts / torch.where(totals > 0, totals, 1.0)
    mass = soft.sum(dim=0)
    b = soft / torch.where(mass > 0, mass, 1.0)
    if coords.shape[0] <= max_dense_spots:
        arrived = np.zeros(tuple(counts.shape))
        for g in range(counts.shape[1]):
            # A balanced plan has no mass on empty rows or columns: POT is given the supports only.
            rows, cols = np.flatnonzero(a[:, g].numpy() > 0), np.flatnonzero(b[:, g].numpy() > 0)
            if rows.size == 0 or cols.size == 0:
                continue
            cost = ((coords[rows, None, :] - coords[None, cols, :]) ** 2).sum(axis=-1)
            plan = ot.bregman.sinkhorn_stabilized(
                a[rows, g].numpy(), b[cols, g].numpy(), cost, reg, numItermax=num_iter
            )
            arrived[cols, g] = plan.sum(axis=0)
        return arrived * totals.numpy()
    pairs = neighbour_pairs(coords, qc_reach(info))
    index = (torch.as_tensor(pairs.source), torch.as_tensor(pairs.target))
    cost = torch.as_tensor(pairs.distance**2)[:, None].expand(-1, counts.shape[1])
    plan = sinkhorn_log(a, b, index, cost, reg, numItermax=num_iter)
    return (column_sums(plan, index, pairs.n_spots) * totals).numpy()
