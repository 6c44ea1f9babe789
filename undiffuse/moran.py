r"""Moran's I on the spot graph (torch, differentiable, vectorised over genes) and the quantile scan.

Moran's I of a field :math:`x \in \mathbb R^N` on spatial weights :math:`W` is

.. math::

    I = \frac{N}{S_0}\,\frac{z^\top W z}{z^\top z}, \qquad z = x - \bar x, \qquad S_0 = \sum_{ij} W_{ij}.

The weights are the first ring of neighbours (6 on the Visium hexagonal grid, 4 on square bins),
row-normalised so that every spot with neighbours has weight one in total. This is the graph of
``squidpy.gr.spatial_neighbors(coord_type='grid')`` with the default ``transformation=True`` of
``squidpy.gr.spatial_autocorr``, so both give the same :math:`I`. A constant field has :math:`z = 0`; its
:math:`I` is defined as 0 here (squidpy returns NaN).

The same :func:`morans_i` serves the quantile initialisation (:func:`scan_quantiles`) and the correction's
Moran loss, so both optimise the same statistic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData
from tqdm.auto import tqdm

from .arrays import as_dense
from .genes import selected_genes
from .spatial import FIRST_RING_RADIUS, adjacency, pitch_coordinates, tissue_spots

#: Candidate quantiles of the initialisation scan: 0.00, 0.05, ..., 0.95.
DEFAULT_QUANTILE_GRID: tuple[float, ...] = tuple(round(0.05 * k, 2) for k in range(20))

#: Bound on the elements of the ``(E, genes x cutoffs)`` work array of a scan batch (64 MB in float64).
SCAN_BATCH_ELEMENTS = 8_000_000


@dataclass(frozen=True)
class SpatialWeights:
    """Sparse spatial weights :math:`W` as an edge list ``source -> target`` with weights.

    Attributes
    ----------
    source, target
        ``(E,)`` int64 spot indices of the non-zero weights.
    weight
        ``(E,)`` weights :math:`W_{\\mathrm{source},\\mathrm{target}}`.
    n_spots
        Number of spots :math:`N`.
    """

    source: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor
    n_spots: int

    @property
    def total(self) -> torch.Tensor:
        """:math:`S_0`, the sum of all weights."""
        return self.weight.sum()

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> SpatialWeights:
        """The same weights on another device or in another floating-point type."""
        return SpatialWeights(
            self.source.to(device),
            self.target.to(device),
            self.weight.to(device=device, dtype=dtype),
            self.n_spots,
        )

    @classmethod
    def from_scipy(
        cls, matrix: sp.spmatrix | sp.sparray, *, dtype: torch.dtype = torch.float64
    ) -> SpatialWeights:
        """Weights from a SciPy sparse ``(N, N)`` matrix, e.g. squidpy's ``spatial_connectivities``."""
        coo = sp.coo_matrix(matrix)
        return cls(
            torch.as_tensor(coo.row.astype(np.int64)),
            torch.as_tensor(coo.col.astype(np.int64)),
            torch.as_tensor(coo.data, dtype=dtype),
            int(coo.shape[0]),
        )

    @classmethod
    def from_torch(cls, matrix: torch.Tensor) -> SpatialWeights:
        """Weights from a torch sparse ``(N, N)`` tensor (COO or CSR)."""
        coo = matrix.to_sparse_coo().coalesce()
        source, target = coo.indices()
        return cls(source, target, coo.values(), int(coo.shape[0]))


def spatial_weights(
    data: AnnData | np.ndarray,
    *,
    radius: float = FIRST_RING_RADIUS,
    row_normalise: bool = True,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> SpatialWeights:
    """The first-ring spot graph of a sample, row-normalised like squidpy's default.

    Parameters
    ----------
    data
        An AnnData with ``obsm['spatial']`` (converted to spot pitches with
        :func:`undiffuse.spatial.pitch_coordinates`), or ``(N, 2)`` coordinates already in spot pitches.
    radius
        Neighbour radius in spot pitches; the default keeps exactly the first ring.
    row_normalise
        Divide each row by its number of neighbours (spots without neighbours keep an empty row).
    """
    coords = pitch_coordinates(data) if isinstance(data, AnnData) else np.asarray(data, dtype=np.float64)
    weights = SpatialWeights.from_scipy(
        adjacency(coords, radius=radius, row_normalise=row_normalise), dtype=dtype
    )
    return weights.to(device)


def morans_i(values: torch.Tensor, weights: SpatialWeights | torch.Tensor) -> torch.Tensor:
    r"""Moran's I of every column of ``values``, differentiable with respect to ``values``.

    .. math::

        I_k = \frac{N}{S_0}\,
        \frac{\sum_{(i, j) \in E} W_{ij}\, z_{ik} z_{jk}}{\sum_i z_{ik}^2},
        \qquad z_{\cdot k} = x_{\cdot k} - \bar x_k.

    Parameters
    ----------
    values
        ``(N, K)`` field values (genes, or genes x cutoffs, as columns); a 1-D ``(N,)`` field is accepted.
    weights
        :class:`SpatialWeights` or a torch sparse ``(N, N)`` tensor, on the device of ``values``.

    Returns
    -------
    ``(K,)`` Moran's I (a scalar tensor for 1-D input). Constant columns give exactly 0.

    Notes
    -----
    Memory is ``O(E K)`` for ``E`` non-zero weights; batch the columns of large inputs.
    """
    if isinstance(weights, torch.Tensor):
        weights = SpatialWeights.from_torch(weights)
    squeeze = values.ndim == 1
    if squeeze:
        values = values[:, None]
    if values.shape[0] != weights.n_spots:
        raise ValueError(f"values have {values.shape[0]} rows but the weights join {weights.n_spots} spots")
    weight = weights.weight.to(values.dtype)
    centred = values - values.mean(dim=0, keepdim=True)
    # index_select, not indexing: the backward of indexing accumulates by a slow sort when deterministic
    # algorithms are on (as during correction).
    pairs = centred.index_select(0, weights.source) * centred.index_select(0, weights.target)
    numerator = (weight[:, None] * pairs).sum(dim=0)
    denominator = (centred * centred).sum(dim=0)
    # A column is constant when its spread is at rounding level: its centred values are noise, not signal.
    spread = values.amax(dim=0) - values.amin(dim=0)
    scale = values.abs().amax(dim=0)
    constant = spread <= 8 * torch.finfo(values.dtype).eps * scale
    safe_denominator = torch.where(constant, torch.ones_like(denominator), denominator)
    score = (weights.n_spots / weight.sum()) * numerator / safe_denominator
    score = torch.where(constant, torch.zeros_like(score), score)
    return score[0] if squeeze else score


def morans_i_numpy(
    values: np.ndarray | sp.spmatrix | sp.sparray,
    weights: SpatialWeights | sp.spmatrix | sp.sparray,
    *,
    batch_size: int | None = None,
) -> np.ndarray:
    """Moran's I of every column of a NumPy or SciPy ``(N, K)`` array, in float64, batched over columns.

    Parameters
    ----------
    values
        ``(N, K)`` dense or sparse values.
    weights
        :class:`SpatialWeights` or a SciPy sparse ``(N, N)`` weight matrix.
    batch_size
        Columns per batch; by default as many as keep the work array under :data:`SCAN_BATCH_ELEMENTS`.

    Returns
    -------
    ``(K,)`` float64 Moran's I.
    """
    if not isinstance(weights, SpatialWeights):
        weights = SpatialWeights.from_scipy(weights)
    weights = weights.to("cpu", torch.float64)
    n_columns = values.shape[1]
    batch_size = batch_size or max(1, SCAN_BATCH_ELEMENTS // max(1, weights.source.shape[0]))
    scores = np.empty(n_columns, dtype=np.float64)
    for start in range(0, n_columns, batch_size):
        block = _dense_columns(values, slice(start, start + batch_size))
        scores[start : start + batch_size] = morans_i(torch.from_numpy(block), weights).numpy()
    return scores


def gene_morans_i(
    adata: AnnData,
    genes: Sequence[str] | None = None,
    *,
    layer: str | None = None,
    weights: SpatialWeights | None = None,
) -> pd.Series:
    """Moran's I of genes over all spots of ``adata`` on the first-ring graph.

    Parameters
    ----------
    adata
        Spots x genes, with ``obsm['spatial']``.
    genes
        Genes to score (default: all).
    layer
        Layer to read instead of ``X``.
    weights
        Precomputed weights (default: :func:`spatial_weights` of ``adata``).

    Returns
    -------
    Series of Moran's I indexed by gene.
    """
    genes = list(adata.var_names if genes is None else genes)
    matrix = adata[:, genes].X if layer is None else adata[:, genes].layers[layer]
    weights = spatial_weights(adata) if weights is None else weights
    return pd.Series(morans_i_numpy(matrix, weights), index=pd.Index(genes, name="gene"), name="morans_i")


def hard_threshold(values: torch.Tensor, cutoffs: torch.Tensor) -> torch.Tensor:
    """Keep the values at or above each cutoff, zero the rest, for every gene and cutoff at once.

    Parameters
    ----------
    values
        ``(N, G)`` counts.
    cutoffs
        ``(C, G)`` cutoff of each candidate quantile for each gene.

    Returns
    -------
    ``(N, G, C)`` thresholded fields. A cutoff at the minimum keeps the field unchanged.
    """
    kept = values[:, :, None] >= cutoffs.T[None, :, :]
    return values[:, :, None] * kept


def scan_quantiles(
    adata: AnnData,
    genes: Sequence[str] | None = None,
    *,
    grid: Sequence[float] = DEFAULT_QUANTILE_GRID,
    tissue_key: str | None = None,
    batch_size: int | None = None,
) -> pd.DataFrame:
    r"""The initial quantile of every gene: the cutoff whose hard threshold maximises Moran's I.

    For gene :math:`g` and candidate quantile :math:`q` of the grid, the cutoff :math:`Q_g(q)` is the
    :math:`q`-quantile of the gene's counts on the **tissue spots** (linear interpolation, as
    :func:`numpy.quantile`), the hard-thresholded field
    :math:`x_g \odot \mathbb 1[x_g \ge Q_g(q)]` is formed on **all spots**, and its Moran's I is computed over
    all spots with the first-ring graph. The quantile with the largest :math:`I` is kept (the smallest one on
    ties).

    Why these spots: the quantile describes the sources, which lie in tissue, so background spots (mostly
    diffused molecules) must not pull the cutoffs down; Moran's I is taken over all spots because the field
    the correction produces is zero off tissue, and the contrast between tissue and background is part of
    the pattern it recovers. :math:`q = 0` keeps every tissue count, so ``moran_at_q_init >= moran_raw``
    whenever the grid holds 0 and no background count lies below the smallest tissue count.

    Parameters
    ----------
    adata
        Spots x genes of raw counts (``X``) with ``obsm['spatial']`` and a boolean tissue column in ``obs``.
    genes
        Genes to scan (default: ``var['selected']`` when present, otherwise all genes).
    grid
        Candidate quantiles in :math:`[0, 1]`.
    tissue_key
        Boolean ``obs`` column of the tissue mask (default: ``tissue`` after ``prepare``, else ``in_tissue``).
    batch_size
        Genes per batch; by default as many as keep the work array under :data:`SCAN_BATCH_ELEMENTS`.

    Returns
    -------
    DataFrame with columns ``gene``, ``q_init``, ``moran_at_q_init``, ``moran_raw``, one row per gene in
    ``genes`` order.
    """
    genes = selected_genes(adata) if genes is None else list(genes)
    quantiles = np.asarray(grid, dtype=np.float64)
    if quantiles.ndim != 1 or quantiles.size == 0 or np.any((quantiles < 0) | (quantiles > 1)):
        raise ValueError(f"the quantile grid must be a non-empty list of values in [0, 1], got {list(grid)}")
    tissue = tissue_spots(adata, key=tissue_key)
    weights = spatial_weights(adata)
    n_edges = max(1, weights.source.shape[0])
    batch_size = batch_size or max(1, SCAN_BATCH_ELEMENTS // (n_edges * quantiles.size))
    matrix = adata[:, genes].X
    grid_tensor = torch.from_numpy(quantiles)

    best_quantile, best_score, raw_score = [], [], []
    for start in tqdm(range(0, len(genes), batch_size), desc="quantile scan", unit="batch", disable=None):
        counts = torch.from_numpy(_dense_columns(matrix, slice(start, start + batch_size)))
        cutoffs = torch.quantile(counts[torch.from_numpy(tissue)], grid_tensor, dim=0)  # (C, G)
        fields = hard_threshold(counts, cutoffs)  # (N, G, C)
        scores = morans_i(fields.reshape(counts.shape[0], -1), weights).reshape(counts.shape[1], -1)
        best = scores.argmax(dim=1)
        best_quantile.append(grid_tensor[best])
        best_score.append(scores.gather(1, best[:, None])[:, 0])
        raw_score.append(morans_i(counts, weights))

    return pd.DataFrame(
        {
            "gene": genes,
            "q_init": torch.cat(best_quantile).numpy() if genes else np.empty(0),
            "moran_at_q_init": torch.cat(best_score).numpy() if genes else np.empty(0),
            "moran_raw": torch.cat(raw_score).numpy() if genes else np.empty(0),
        }
    )


def quantile_grid(*, start: float = 0.0, stop: float = 0.95, step: float = 0.05) -> tuple[float, ...]:
    """Evenly spaced candidate quantiles from ``start`` to ``stop`` inclusive, rounded to 1e-9."""
    if step <= 0 or not 0 <= start <= stop <= 1:
        raise ValueError(f"need 0 <= start <= stop <= 1 and step > 0, got {start}, {stop}, {step}")
    count = int(np.floor((stop - start) / step + 1e-9)) + 1
    return tuple(round(start + k * step, 9) for k in range(count))


def _dense_columns(values: np.ndarray | sp.spmatrix | sp.sparray, columns: slice) -> np.ndarray:
    return np.ascontiguousarray(as_dense(values[:, columns]))
