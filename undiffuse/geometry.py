r"""A sample's geometry, built once and shared by every gene: spots, tissue, the diffusion operator, and the
inputs of the losses and of the prior.

What only a loss or the prior needs (the image raster, the Moran's I graph, the prior's neighbour graph) is
built on first use, so that applying a learned model (:func:`undiffuse.correct.rediffuse`) builds none of them
and deconvolving with a known kernel builds only the prior's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal, get_args

import numpy as np
import scipy.sparse as sp
import torch
from anndata import AnnData

from .diffusion import KernelKind
from .genes import selected_genes
from .losses import ImageTarget
from .moran import SpatialWeights, spatial_weights
from .operators import (
    DEFAULT_TOLERANCE,
    LatticeOperator,
    OperatorKind,
    PairOperator,
    build_operator,
    on_slide,
)
from .ot.cost import pair_features
from .ot.prior import TissueNeighbours
from .raster import Raster, build_raster, image_intensity, working_grid
from .spatial import distance_to_mask, pitch_coordinates, tissue_spots
from .tissue import pick_image

#: Range (spot pitches) of f_phi's radial basis and of the pair operator when neither the config nor the QC
#: gives one.
DEFAULT_REACH = 8.0
#: A Gaussian kernel keeps 99% of its mass within this many scales (2-D: sqrt(2 ln 100)).
SCALES_PER_REACH = 3.0
#: Principal components of the expression profiles that weigh the bilateral smoothness prior's neighbours:
#: enough to tell tissue domains apart, few enough to leave most counting noise out.
PROFILE_COMPONENTS = 15
#: The profiles use at most this many of the selected genes (the most variable ones).
PROFILE_MAX_GENES = 2000
#: Values per dense block of the profiles' covariance.
PROFILE_BLOCK_VALUES = 4_000_000
#: A window of :meth:`SampleGeometry.varied_window` is this many blocks on a side, and the genes' block profiles
#: are compared this many genes at a time.
VARIED_WINDOW_BLOCKS = 8
VARIED_WINDOW_GENES = 256
#: How the smoothness prior weighs a spot's tissue neighbours (:class:`undiffuse.ot.prior.TissueNeighbours`).
PriorWeights = Literal["uniform", "bilateral"]


def qc_reach(info: Mapping[str, Any]) -> float:
    """Diffusion range (pitches) measured by the QC's background decay: the larger of its cutoff and 3 scales
    (where a Gaussian kernel holds 99% of its mass); :data:`DEFAULT_REACH` without QC."""
    measured = [
        float(info[k]) * f
        for k, f in (("diffusion_cutoff", 1.0), ("diffusion_scale", SCALES_PER_REACH))
        if info.get(k)
    ]
    return max(measured) if measured else DEFAULT_REACH


def decay_kernel(info: Mapping[str, Any]) -> tuple[KernelKind, float] | None:
    """The QC's best-fitting profile of the background decay and its scale (pitches), or ``None`` where the
    QC fitted none (or the sample was prepared without QC)."""
    qc = info.get("qc", {})
    kind, scale = qc.get("decay_kernel"), qc.get("decay_kernel_scale")
    if not qc.get("decay_fitted") or kind not in get_args(KernelKind) or not scale or scale <= 0:
        return None
    return kind, float(scale)


@dataclass
class SampleGeometry:
    """Everything about a sample that does not depend on the genes.

    Attributes
    ----------
    coords
        ``(N, 2)`` spot centres in pitches.
    tissue
        ``(N,)`` boolean tissue mask (tensor on the working device).
    operator
        Applies kernels on the spots (:mod:`undiffuse.operators`): the lattice FFT operator, or pairs.
    reach
        Range (pitches) of f_phi's radial basis, and of the kernel profiles reported.
    diffusion_scale
        The QC's Gaussian-equivalent diffusion scale (pitches), or ``None`` without QC.
    decay_kernel
        The radial profile that fits the QC's background decay best and its scale (pitches):
        (``"gaussian"`` or ``"heavy_tailed"``, scale), or ``None`` without a fitted decay.
    prior_weights
        How the smoothness prior weighs a spot's tissue neighbours (:attr:`neighbours`).
    """

    adata: AnnData = field(repr=False)
    coords: np.ndarray = field(repr=False)
    tissue: torch.Tensor = field(repr=False)
    operator: LatticeOperator | PairOperator
    reach: float
    diffusion_scale: float | None
    decay_kernel: tuple[KernelKind, float] | None
    prior_weights: PriorWeights
    image: np.ndarray | None = field(repr=False)
    image_size: int
    device: torch.device
    dtype: torch.dtype

    @classmethod
    def build(
        cls,
        adata: AnnData,
        *,
        operator: OperatorKind = "auto",
        cutoff: float | None = None,
        max_cutoff: float = 10.0,
        tolerance: float = DEFAULT_TOLERANCE,
        image: np.ndarray | None = None,
        image_size: int = 64,
        prior_weights: PriorWeights = "bilateral",
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> SampleGeometry:
        """Geometry of ``adata`` (see :class:`undiffuse.correct.CorrectionConfig` for the options).

        ``cutoff`` truncates the kernel on either operator; without one the lattice operator keeps the whole
        kernel and the pair operator uses the QC's diffusion range, at most ``max_cutoff``.
        """
        device = torch.device(device)
        coords = pitch_coordinates(adata)
        tissue = tissue_spots(adata)
        info = adata.uns.get("undiffuse", {})
        reach = float(cutoff or qc_reach(info))
        diffusion_operator = build_operator(
            coords,
            tissue,
            kind=operator,
            cutoff=cutoff,
            fallback_cutoff=min(reach, max_cutoff),
            tolerance=tolerance,
            device=device,
            dtype=dtype,
        )
        return cls(
            adata=adata,
            coords=coords,
            tissue=torch.as_tensor(tissue, device=device),
            operator=diffusion_operator,
            reach=reach,
            diffusion_scale=info.get("diffusion_scale"),
            decay_kernel=decay_kernel(info),
            prior_weights=prior_weights,
            image=image,
            image_size=image_size,
            device=device,
            dtype=dtype,
        )

    @property
    def n_spots(self) -> int:
        return int(self.coords.shape[0])

    @cached_property
    def tissue_rows(self) -> torch.Tensor:
        """``(T,)`` the tissue spots' indices, increasing: the rows of a field kept on tissue only."""
        return torch.nonzero(self.tissue).reshape(-1)

    def on_slide(self, values: torch.Tensor) -> torch.Tensor:
        """``(N, G)`` a field given on the ``(T, G)`` tissue spots, zero elsewhere."""
        return on_slide(values, self.tissue_rows, self.n_spots)

    def training_window(self, n_spots: int) -> np.ndarray:
        """``(N,)`` boolean mask of a square window of about ``n_spots`` spots around the tissue boundary
        nearest the tissue's centre: where tissue, background and the diffusion between them are all seen."""
        tissue = self.tissue.cpu().numpy()
        coords = self.coords
        if n_spots >= len(coords):
            return np.ones(len(coords), dtype=bool)
        edge = tissue & (distance_to_mask(coords, ~tissue) < 1.5) if (~tissue).any() else tissue
        centroid = coords[tissue].mean(axis=0)
        centre = coords[edge][np.argmin(((coords[edge] - centroid) ** 2).sum(axis=1))]
        half = 0.5 * self._window_side(n_spots)
        return (np.abs(coords - centre) <= half).all(axis=1)

    def _window_side(self, n_spots: int) -> float:
        """Side (pitches) of a square that holds about ``n_spots`` spots at the slide's mean density."""
        spacing = np.sqrt(np.prod(np.ptp(self.coords, axis=0)) / self.n_spots)
        return float(spacing * np.sqrt(n_spots))

    def varied_window(self, n_spots: int, counts: np.ndarray) -> np.ndarray:
        r"""``(N,)`` boolean mask of a square window of about ``n_spots`` spots where the tissue's expression
        varies most: a window that holds the slide's kinds of tissue, not one of them.

        The slide is cut into blocks, :data:`VARIED_WINDOW_BLOCKS` to a window's side. Each block's profile
        :math:`p_b`, the share of its tissue counts in each gene, is compared by the Hellinger distance, and a
        window :math:`w` of blocks scores their scatter around its mean, weighted by their tissue spots
        :math:`n_b`:

        .. math::

            \sum_{b \in w} n_b \lVert \sqrt{p_b} - \bar h_w \rVert^2
            = n_w \big(1 - \lVert \bar h_w \rVert^2\big), \qquad
            \bar h_w = \frac{1}{n_w} \sum_{b \in w} n_b \sqrt{p_b},

        zero where the window holds one kind of tissue, and largest for much tissue of many kinds.

        Parameters
        ----------
        n_spots
            About how many spots the window holds (all of them where the slide has no more).
        counts
            ``(N, G)`` the counts of the genes that tell the kinds apart.
        """
        if n_spots >= self.n_spots:
            return np.ones(self.n_spots, dtype=bool)
        block = self._window_side(n_spots) / VARIED_WINDOW_BLOCKS
        cell = np.floor((self.coords - self.coords.min(axis=0)) / block).astype(np.int64)
        shape = cell.max(axis=0) + 1
        tissue = self.tissue.cpu().numpy()
        rows = np.nonzero(tissue)[0]
        blocks = sp.csr_matrix(
            (np.ones(len(rows)), (cell[rows, 0] * shape[1] + cell[rows, 1], rows)),
            shape=(int(np.prod(shape)), self.n_spots),
        )
        totals = np.asarray(blocks @ counts.sum(axis=1, dtype=np.float64)).reshape(-1)
        # A block without counts has no profile to compare.
        spots = np.where(totals > 0, np.asarray(blocks.sum(axis=1)).reshape(-1), 0.0)
        # Positions of the window's corner block, and the window's sums over blocks by summed-area tables.
        side = np.minimum(VARIED_WINDOW_BLOCKS, shape)

        def window_sums(per_block: np.ndarray) -> np.ndarray:
            table = np.zeros((shape[0] + 1, shape[1] + 1, *per_block.shape[1:]))
            table[1:, 1:] = per_block.reshape(*shape, *per_block.shape[1:]).cumsum(axis=0).cumsum(axis=1)
            a, b = side
            return table[a:, b:] - table[:-a, b:] - table[a:, :-b] + table[:-a, :-b]

        weight = np.divide(spots, np.sqrt(totals), out=np.zeros_like(totals), where=totals > 0)
        squared_mean = 0.0
        for start in range(0, counts.shape[1], VARIED_WINDOW_GENES):
            genes = slice(start, start + VARIED_WINDOW_GENES)
            summed = np.sqrt(np.asarray(blocks @ counts[:, genes], dtype=np.float64)) * weight[:, None]
            squared_mean = squared_mean + np.square(window_sums(summed)).sum(axis=-1)
        in_window = window_sums(spots)
        score = in_window - np.divide(
            squared_mean, in_window, out=np.zeros_like(in_window), where=in_window > 0
        )
        corner = np.unravel_index(int(np.argmax(score)), score.shape)
        return ((cell >= corner) & (cell < np.add(corner, side))).all(axis=1)

    def features(self, distance: torch.Tensor, crosses: torch.Tensor) -> torch.Tensor:
        """``(M, K + 1)`` inputs of f_phi (:mod:`undiffuse.ot.cost`) at these distances."""
        return pair_features(distance, crosses, self.reach)

    @cached_property
    def neighbours(self) -> TissueNeighbours:
        """First-ring tissue neighbours (the smoothness prior's graph), weighted alike or bilaterally."""
        tissue = self.tissue.cpu().numpy()
        profiles = expression_profiles(self.adata, tissue) if self.prior_weights == "bilateral" else None
        return TissueNeighbours.build(
            self.coords, tissue, profiles=profiles, dtype=self.dtype, device=self.device
        )

    @cached_property
    def background_distance(self) -> np.ndarray:
        """``(B,)`` distances (pitches) of the background spots, in spot order, to the nearest tissue spot."""
        tissue = self.tissue.cpu().numpy()
        return distance_to_mask(self.coords, tissue)[~tissue]

    @cached_property
    def moran_weights(self) -> SpatialWeights:
        """The first-ring spot graph of the Moran's I loss."""
        return spatial_weights(self.coords, dtype=self.dtype, device=self.device)

    @cached_property
    def raster(self) -> tuple[Raster, ImageTarget] | None:
        """The rasteriser and the image side of the image loss, or ``None`` without an image."""
        return _image_raster(self.adata, self.image, self.image_size, self.dtype, self.device)

    @cached_property
    def reference_distance(self) -> torch.Tensor:
        """Distances from the most central spot to every spot within ``reach``: a full lattice neighbourhood on
        which diffusion lengths are measured, away from tissue edges."""
        coords = self.coords
        centre = np.argmin(((coords - coords.mean(axis=0)) ** 2).sum(axis=1))
        distance = np.sqrt(((coords - coords[centre]) ** 2).sum(axis=1))
        kept = distance[distance <= self.reach * (1 + 1e-9)]
        return torch.as_tensor(kept, dtype=self.dtype, device=self.device)

    @property
    def profile_distance(self) -> torch.Tensor:
        """Distances (pitches) at which the learned kernel profile is reported."""
        return torch.linspace(0.0, self.reach, 49, dtype=self.dtype, device=self.device)


def expression_profiles(
    adata: AnnData, tissue: np.ndarray, *, n_components: int = PROFILE_COMPONENTS
) -> np.ndarray:
    """``(N, K)`` expression profiles of the spots, from which the bilateral prior weighs neighbours.

    The selected genes' raw counts (:func:`undiffuse.genes.selected_genes`), normalised to the median library
    size of the tissue spots and log1p-transformed, projected on their first ``n_components`` principal
    components over the tissue spots. They are computed once per sample, from every selected gene, so that a
    gene's correction does not depend on the chunk it is corrected in. The counts are still diffused, which
    blurs the profiles only within about a diffusion length of a border: the profiles still tell the two
    domains apart there, and the spots that carry the blurred mix lose both weights alike.
    """
    tissue = np.asarray(tissue, dtype=bool)
    counts = sp.csr_array(adata[:, selected_genes(adata)].X)
    totals = np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()
    lit = totals > 0
    target = float(np.median(totals[tissue & lit])) if (tissue & lit).any() else 1.0
    scale = np.where(lit, target / np.where(lit, totals, 1.0), 0.0)
    inside = np.flatnonzero(tissue)
    n = max(len(inside), 1)

    def logged(spots: np.ndarray, genes: np.ndarray | None = None):
        """Dense row blocks of the normalised log counts: counts of tissue spots are mostly non-zero, where
        sparse products are slow, and a whole dense or float64 copy of a Visium HD matrix is gigabytes."""
        step = max(1, PROFILE_BLOCK_VALUES // max(counts.shape[1] if genes is None else len(genes), 1))
        for start in range(0, len(spots), step):
            block = spots[start : start + step]
            part = counts[block] if genes is None else counts[block][:, genes]
            yield np.log1p(part.toarray().astype(np.float64) * scale[block, None])

    sums, squares = np.zeros(counts.shape[1]), np.zeros(counts.shape[1])
    for block in logged(inside):
        sums += block.sum(axis=0)
        squares += np.square(block).sum(axis=0)
    mean = sums / n
    variance = squares / n - mean**2
    kept = np.sort(np.argsort(-variance, kind="stable")[:PROFILE_MAX_GENES])
    mean = mean[kept]
    gram = np.zeros((len(kept), len(kept)))
    for block in logged(inside, kept):
        gram += block.T @ block
    covariance = gram / n - np.outer(mean, mean)
    _, vectors = np.linalg.eigh(covariance)
    axes = vectors[:, ::-1][:, : min(n_components, len(kept))]
    every_spot = np.arange(counts.shape[0])
    return np.concatenate([block @ axes for block in logged(every_spot, kept)]) - mean @ axes


def _image_raster(
    adata: AnnData, image: np.ndarray | None, max_side: int, dtype: torch.dtype, device: torch.device
) -> tuple[Raster, ImageTarget] | None:
    coords_full = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    sample_id = adata.uns.get("undiffuse", {}).get("sample_id")
    library = adata.uns.get("spatial", {}).get(sample_id, {})
    scalefactors = library.get("scalefactors", {})
    if image is not None:
        scale = 1.0
    else:
        picked = pick_image(adata) if library else None
        if picked is None:
            return None
        _, image, scale = picked
    small, zoom = working_grid(image_intensity(image), max_side)
    diameter = scalefactors.get("spot_diameter_fullres")
    if diameter is None:
        diameter = 0.55 * float(adata.uns.get("undiffuse", {}).get("spot_pitch_px") or 1.0)
    raster = build_raster(
        coords_full * scale * zoom, float(diameter) * scale * zoom, small.shape, dtype=dtype
    )
    intensity = torch.as_tensor(small, dtype=dtype)[None, None]
    return Raster(raster.matrix.to(device), raster.shape), ImageTarget.build(intensity.to(device))
