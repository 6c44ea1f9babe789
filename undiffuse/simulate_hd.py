r"""Ground-truth simulator of Visium HD: cells rendered at 2 um, diffused, written as Space Ranger bins.

The sample is built from one seed in five steps, each with its own random stream:

1. **Anatomy**, as in :mod:`undiffuse.simulate` but in microns: an irregular tissue region with a
   background rim all round, domains (wavy layers and elliptical blobs) and a smooth density trend.
2. **Cells** (:class:`CellMap`): centres on a jittered hexagonal lattice, thinned by the local density;
   each cell takes a type from its domain's composition, a radius (cells of 10-20 um across) and a nucleus
   of half that radius. A point belongs to the nearest cell centre when it lies within that cell's radius
   (a Voronoi tessellation clipped to discs), so cells pack where the tissue is dense and leave
   extracellular gaps where it is not.
3. **Truth**: each cell holds :math:`e_{cg} = c\, a_c\, \lambda_g\, \pi_{g, t(c)}\, \epsilon_{cg}`
   expected molecules (area :math:`a_c`, gene level :math:`\lambda_g`, cell-type profile :math:`\pi`,
   log-normal noise :math:`\epsilon`), spread evenly over the cell. :func:`render_truth` turns that into
   the expected counts of any square grid; the 2 um bins are rendered, and the 8 and 16 um bins are their
   sums, as Space Ranger bins its 2 um squares.
4. **Diffusion and counts**: the 2 um truth goes through :func:`undiffuse.diffusion.diffuse` (a kernel
   scale per gene, log-uniform between ``kernel_length_min_um`` and ``kernel_length_max_um``, a local share
   ``bleed`` and a uniform share ``distal``), in batches of genes, then Poisson counts; coarser bins are
   sums of 2 um counts.
5. **Image**: an H&E-like picture at the hires scale of Visium HD (about 1.1 um a pixel): eosin over the
   tissue and the cytoplasm, haematoxylin on every nucleus, so that the image shows the cells of the truth.

Output (:func:`write_hd_sample`)::

    OUTDIR/outs/binned_outputs/square_{002,008,016}um/{raw,filtered}_feature_bc_matrix.h5
    OUTDIR/outs/binned_outputs/square_{002,008,016}um/spatial/{tissue_positions.parquet,
        scalefactors_json.json, tissue_hires_image.png, tissue_lowres_image.png}
    OUTDIR/truth/square_{002,008,016}um.h5ad    truth per bin size (below)
    OUTDIR/truth/cells.h5ad                      the cell map: one row per cell, its expected molecules

Truth of one bin size (``square_XXXum.h5ad``): the bins of the matrix, in its order; ``X`` the undiffused
expected counts (CSR float32, zero outside cells); ``layers['expected']`` the diffused expected counts
before the Poisson draw (dense float32; 8 and 16 um only, as the 2 um one would be bins x genes dense);
``obs`` ``in_tissue``, ``array_row``, ``array_col``, ``domain`` and, at 2 um, ``cell`` (row of
``cells.h5ad``, -1 outside cells) and ``compartment`` (``none``, ``nucleus``, ``cytoplasm``), at 8 and 16 um
``cell_coverage`` (share of the bin's area in cells); ``obsm['spatial']`` full-resolution pixels;
``var`` ``gene_ids``, ``gene_type`` (``marker``, ``shared``, ``housekeeping``), ``marker_of`` (cell type),
``expressed_in``, ``level``, ``kernel_length_um`` and ``kernel_cutoff_um`` (microns), ``kernel_scale`` and
``kernel_cutoff`` (pitches of this bin size); ``uns`` ``simulation`` (every parameter), ``summary`` and
``bin_size_um``. The cell map (``cells.h5ad``): ``X`` the expected molecules of each gene in each cell,
``obs`` ``x_um``, ``y_um`` (from the capture area's top-left corner), ``radius_um``, ``nucleus_radius_um``,
``area_um2``, ``cell_type``, ``domain``; ``obsm['spatial']`` full-resolution pixels of the centres.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass, replace
from os import PathLike
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData
from scipy import ndimage
from scipy.spatial import cKDTree
from tqdm.auto import tqdm

from .atomic import atomic_path
from .diffusion import KernelKind, diffuse
from .io.visium_hd import HD_FEATURE_SLICE, hd_barcodes
from .simulate import (
    BACKGROUND,
    _Anatomy,
    _downsample,
    _draw_domains,
    _draw_outline,
    _group_profiles,
    _midpoint_threshold,
    _numbered,
    _SimulationParamsBase,
    _stained_rgb,
    output_folder,
    simulate_reference,
    write_outs_of_truth,
)

#: Bin sizes Space Ranger writes, in microns; coarser bins are sums of 2 um bins.
BIN_SIZES_UM = (2, 8, 16)
#: Full-resolution image scale of a real Visium HD sample (microns per pixel).
MICRONS_PER_PIXEL = 0.2738242950835738
#: Hires and lowres scale factors of a real Visium HD sample; the hires image has at most 6,000 pixels a side.
HIRES_SCALEF = 0.2505533
LOWRES_SCALEF = 0.02505533
HIRES_MAX_SIDE = 6000
#: Fiducial frame diameter in microns (Space Ranger's ``fiducial_diameter_fullres`` times the pixel size).
FIDUCIAL_DIAMETER_UM = 330.0
#: Glass round the capture area in the full-resolution image, in microns.
FRAME_UM = 100.0
#: Background all round the tissue: share of the shorter side of the capture area kept off tissue.
RIM_SHARE = 0.08
#: Anatomy (outline, domains, density) is defined in units of the coarsest bin, so that its shapes do not
#: depend on the bin size they are sampled at.
ANATOMY_UNIT_UM = 16.0
#: Upper bound on bins x genes of one dense batch handed to :func:`diffuse` (512 MiB of float64). Larger
#: batches mean fewer calls, and each call fits the lattice of all bins again (about 30 s at full size).
BATCH_VALUES = 1 << 26
#: Sizes of the two presets: small enough for CI, and the full 6.5 mm capture area for benchmarks.
PRESETS: dict[str, dict[str, Any]] = {
    "ci": {"width_um": 1024.0, "height_um": 1024.0, "n_genes": 24},
    "full": {"width_um": 6496.0, "height_um": 6496.0, "n_genes": 100},
}
#: Visium view of the same tissue: 55 um spots on the 100 um hexagonal lattice, with the high-resolution
#: truth on square grids of these sizes (microns).
VISIUM_PITCH_UM = 100.0
VISIUM_SPOT_UM = 55.0
VIEW_GRIDS_UM = (10, 20)


@dataclass(frozen=True)
class HDSimulationParams(_SimulationParamsBase):
    """Every parameter of a simulated Visium HD sample, with its default (the ``ci`` preset's size).

    Lengths are in microns.

    Attributes
    ----------
    width_um, height_um
        Capture area; multiples of 16 um (the coarsest bin). A real one is 6.5 mm square.
    n_genes
        Genes: cell-type markers, shared genes and housekeeping genes.
    n_cell_types
        Cell types.
    tissue_fraction
        Share of the capture area covered by tissue (0.2-0.7).
    n_layers, n_blobs, blob_fraction
        Domains, as in :class:`undiffuse.simulate.SimulationParams`.
    cell_radius_um, cell_radius_sd
        Median cell radius and the standard deviation of its log (over cell types, then cells); radii are
        clipped to 4-11 um, so cells are about 10-20 um across.
    nucleus_ratio
        Nucleus radius over cell radius.
    cell_fill
        Share of lattice sites that hold a cell at mean density (the rest are extracellular space).
    marker_fraction, shared_fraction
        Share of genes marking one cell type, and expressed in a few types; the rest are housekeeping.
    depth
        Mean expected UMIs of an 8 um tissue bin before diffusion, over all genes.
    level_sd, marker_weight, housekeeping_sd
        Spread of the log gene levels; level of markers relative to the median housekeeping gene; spread of
        the log modulation of housekeeping genes by cell type.
    marker_leak
        Expression of markers and shared genes in other cell types, relative to their own (0: none, which
        keeps the truth sparse).
    density_sd, cellularity_spread
        Log standard deviation of the smooth density trend; cellularity per domain in ``1 +- spread``.
    cell_noise
        Standard deviation of the log per-cell, per-gene noise.
    bleed, distal
        Shares of molecules moved by the local kernel and spread uniformly over the capture area.
    kernel
        Radial profile of the local kernel: ``gaussian`` or ``heavy_tailed``.
    kernel_length_min_um, kernel_length_max_um
        Range of the per-gene kernel scales (log-uniform).
    kernel_reach
        Kernel radius in kernel scales (0: :data:`undiffuse.simulate.DEFAULT_REACH` of the kind).
    microns_per_pixel
        Full-resolution image scale.
    sample_id
        Library id written into the matrices.
    seed
        Seed of every random choice; one seed gives identical files.
    """

    width_um: float = 1024.0
    height_um: float = 1024.0
    n_genes: int = 24
    n_cell_types: int = 5
    tissue_fraction: float = 0.5
    n_layers: int = 3
    n_blobs: int = 1
    blob_fraction: float = 0.1
    cell_radius_um: float = 7.0
    cell_radius_sd: float = 0.2
    nucleus_ratio: float = 0.5
    cell_fill: float = 0.85
    marker_fraction: float = 0.35
    shared_fraction: float = 0.2
    depth: float = 200.0
    level_sd: float = 1.0
    marker_weight: float = 4.0
    marker_leak: float = 0.0
    housekeeping_sd: float = 0.3
    density_sd: float = 0.2
    cellularity_spread: float = 0.3
    cell_noise: float = 0.3
    bleed: float = 0.4
    distal: float = 0.05
    kernel: KernelKind = "heavy_tailed"
    kernel_length_min_um: float = 5.0
    kernel_length_max_um: float = 30.0
    kernel_reach: float = 0.0
    microns_per_pixel: float = MICRONS_PER_PIXEL
    sample_id: str = "simulated_hd"
    seed: int = 0

    _LABEL: ClassVar[str] = "HD simulation"
    _PRESETS: ClassVar[Mapping[str, Mapping[str, Any]]] = PRESETS

    def _checks(self) -> list[tuple[bool, str]]:
        coarse = max(BIN_SIZES_UM)
        n_types = self.n_cell_types
        return [
            *(
                (
                    value >= 256 and value % coarse == 0,
                    f"{name} must be a multiple of {coarse} um of at least 256, got {value:g}",
                )
                for name, value in (("width_um", self.width_um), ("height_um", self.height_um))
            ),
            (
                self.width_um * self.height_um <= 7000.0**2,
                "the capture area must be at most 7 x 7 mm (a real one is 6.5 mm square)",
            ),
            (self.n_cell_types >= 2, f"n_cell_types must be >= 2, got {n_types}"),
            (self.n_genes >= n_types + 1, f"n_genes must be >= n_cell_types + 1, got {self.n_genes}"),
            (4 <= self.cell_radius_um <= 11, f"cell_radius_um must be in [4, 11], got {self.cell_radius_um}"),
            (
                0 <= self.cell_radius_sd <= 0.5,
                f"cell_radius_sd must be in [0, 0.5], got {self.cell_radius_sd}",
            ),
            (
                0.2 <= self.nucleus_ratio <= 0.8,
                f"nucleus_ratio must be in [0.2, 0.8], got {self.nucleus_ratio}",
            ),
            (0.1 <= self.cell_fill <= 1, f"cell_fill must be in [0.1, 1], got {self.cell_fill}"),
            (self.cell_noise >= 0, f"cell_noise must be >= 0, got {self.cell_noise}"),
            (
                0.5 <= self.kernel_length_min_um <= self.kernel_length_max_um <= 100,
                "need 0.5 <= kernel_length_min_um <= kernel_length_max_um <= 100, got "
                f"{self.kernel_length_min_um} and {self.kernel_length_max_um}",
            ),
            (
                0.05 <= self.microns_per_pixel <= 2,
                f"microns_per_pixel must be in [0.05, 2], got {self.microns_per_pixel}",
            ),
        ]

    @property
    def cell_types(self) -> list[str]:
        """Cell-type names ``type1``, ...."""
        return [f"type{k + 1}" for k in range(self.n_cell_types)]


# --------------------------------------------------------------------------------------------- grids


@dataclass(frozen=True)
class SquareGrid:
    """A square lattice of bins over the capture area, in grid order (row-major).

    Attributes
    ----------
    bin_um
        Bin size (pitch) in microns.
    n_rows, n_cols
        Bins down and across.
    origin_um
        ``(x, y)`` of the capture area's top-left corner in the frame of the cell map (microns).
    """

    bin_um: float
    n_rows: int
    n_cols: int
    origin_um: tuple[float, float] = (0.0, 0.0)

    @property
    def n_bins(self) -> int:
        return self.n_rows * self.n_cols

    def indices(self) -> tuple[np.ndarray, np.ndarray]:
        """``array_row``, ``array_col`` of every bin (int64)."""
        rows, cols = np.divmod(np.arange(self.n_bins, dtype=np.int64), self.n_cols)
        return rows, cols

    def centres_um(self) -> np.ndarray:
        """``(n_bins, 2)`` bin centres ``(x, y)`` in microns."""
        rows, cols = self.indices()
        return np.column_stack(
            [self.origin_um[0] + (cols + 0.5) * self.bin_um, self.origin_um[1] + (rows + 0.5) * self.bin_um]
        )

    def aggregation(self, factor: int, *, crop: bool = False) -> sp.csr_matrix:
        """``(n_coarse, n_bins)`` 0/1 matrix summing ``factor x factor`` blocks into bins ``factor`` times
        larger (Space Ranger's binning). The grid's sides must be multiples of ``factor``, unless ``crop``
        drops the partial blocks along the bottom and right edges."""
        if not crop and (self.n_rows % factor or self.n_cols % factor):
            raise ValueError(
                f"a {self.n_rows} x {self.n_cols} grid does not split into {factor} x {factor} blocks"
            )
        rows, cols = self.indices()
        n_rows, n_cols = self.n_rows // factor, self.n_cols // factor
        keep = np.flatnonzero((rows // factor < n_rows) & (cols // factor < n_cols))
        coarse = (rows[keep] // factor) * n_cols + cols[keep] // factor
        return sp.csr_matrix(
            (np.ones(keep.size, dtype=np.float32), (coarse, keep)), shape=(n_rows * n_cols, self.n_bins)
        )


# --------------------------------------------------------------------------------------------- anatomy


def _draw_hd_anatomy(params: HDSimulationParams, rng: np.random.Generator) -> _Anatomy:
    """Outline, domains and density over the capture area, in anatomy units (16 um), background rim kept."""
    unit = ANATOMY_UNIT_UM
    grid = SquareGrid(1.0, round(params.height_um / unit), round(params.width_um / unit))
    coords = grid.centres_um()
    x, y = coords.T
    low, high = np.zeros(2), np.array([grid.n_cols, grid.n_rows], dtype=np.float64)
    outline = _draw_outline(low, high, 0.03, rng)
    radius = outline.radius(x, y)
    rim = RIM_SHARE * float(min(high))
    on_rim = (x < rim) | (y < rim) | (x > high[0] - rim) | (y > high[1] - rim)
    threshold = _midpoint_threshold(radius, round(params.tissue_fraction * grid.n_bins))
    threshold = min(threshold, float(radius[on_rim].min()) * (1 - 1e-9))
    outline = replace(outline, threshold=threshold)
    return _draw_domains(params, coords, outline, radius <= threshold, rng)


def _anatomy_at(anatomy: _Anatomy, points_um: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tissue mask, domain (-1 off tissue) and relative density at points given in microns."""
    x, y = points_um[:, 0] / ANATOMY_UNIT_UM, points_um[:, 1] / ANATOMY_UNIT_UM
    tissue = anatomy.outline.contains(x, y)
    domain = anatomy.domain(x, y, tissue)
    return tissue, domain, anatomy.density(x, y, domain)


# --------------------------------------------------------------------------------------------- cells


@dataclass(frozen=True)
class CellMap:
    """Cells of the simulated tissue and their true expression; the input of :func:`render_truth`.

    Attributes
    ----------
    centres_um
        ``(C, 2)`` cell centres ``(x, y)`` in microns from the capture area's top-left corner.
    radius_um, nucleus_um
        ``(C,)`` cell and nucleus radii.
    cell_type, domain
        ``(C,)`` int codes into ``type_names`` and ``domain_names``.
    expression
        ``(C, G)`` CSR expected molecules of each gene in each cell (before diffusion).
    type_names, domain_names
        Names of the codes.
    anatomy
        The anatomy the cells were drawn from (tissue outline of the grids).
    """

    centres_um: np.ndarray
    radius_um: np.ndarray
    nucleus_um: np.ndarray
    cell_type: np.ndarray
    domain: np.ndarray
    expression: sp.csr_matrix
    type_names: list[str]
    domain_names: list[str]
    anatomy: _Anatomy

    @property
    def n_cells(self) -> int:
        return int(self.centres_um.shape[0])

    def locate(
        self, points_um: np.ndarray, *, on_tissue: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Cell of each point (-1 outside every cell and off tissue) and whether it is in the nucleus.

        A point belongs to its nearest cell centre when it lies within that cell's radius and on tissue.
        ``on_tissue`` (the outline at the points) saves evaluating it again.
        """
        points_um = np.asarray(points_um, dtype=np.float64)
        cell = np.full(points_um.shape[0], -1, dtype=np.int64)
        nucleus = np.zeros(points_um.shape[0], dtype=bool)
        if self.n_cells == 0 or points_um.shape[0] == 0:
            return cell, nucleus
        if on_tissue is None:
            on_tissue = _anatomy_at(self.anatomy, points_um)[0]
        on_tissue = np.flatnonzero(on_tissue)
        distance, nearest = cKDTree(self.centres_um).query(
            points_um[on_tissue], distance_upper_bound=float(self.radius_um.max())
        )
        found = np.isfinite(distance)
        nearest = np.where(found, nearest, 0)
        inside = found & (distance <= self.radius_um[nearest])
        cell[on_tissue[inside]] = nearest[inside]
        nucleus[on_tissue[inside]] = distance[inside] <= self.nucleus_um[nearest[inside]]
        return cell, nucleus


def _draw_cells(
    params: HDSimulationParams, anatomy: _Anatomy, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Cell centres, radii, nucleus radii, types and domains (see the module docstring)."""
    spacing = 1.8 * params.cell_radius_um  # neighbouring discs overlap a little: cells touch
    row_step = spacing * math.sqrt(3) / 2
    n_rows, n_cols = int(params.height_um / row_step) + 1, int(params.width_um / spacing) + 1
    rows, cols = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    sites = np.column_stack(
        [(cols + 0.5 * (rows % 2) + 0.25).ravel() * spacing, (rows.ravel() + 0.5) * row_step]
    )
    sites += rng.uniform(-0.3, 0.3, sites.shape) * spacing
    tissue, domain, density = _anatomy_at(anatomy, sites)
    keep = tissue & (rng.uniform(0, 1, tissue.size) < np.clip(params.cell_fill * density, 0, 1))
    sites, domain = sites[keep], domain[keep]
    # Each domain is dominated by one cell type, with a mixture of the others.
    n_domains, n_types = params.n_layers + params.n_blobs, params.n_cell_types
    composition = rng.dirichlet(np.full(n_types, 0.7), n_domains)
    composition[np.arange(n_domains), np.arange(n_domains) % n_types] += 1.5
    composition /= composition.sum(axis=1, keepdims=True)
    cumulative = np.cumsum(composition, axis=1)[domain]
    cell_type = np.minimum((rng.uniform(0, 1, domain.size)[:, None] > cumulative).sum(axis=1), n_types - 1)
    type_radius = params.cell_radius_um * np.exp(params.cell_radius_sd * rng.standard_normal(n_types))
    radius = np.clip(
        type_radius[cell_type] * np.exp(0.5 * params.cell_radius_sd * rng.standard_normal(domain.size)),
        4.0,
        11.0,
    )
    return sites, radius, params.nucleus_ratio * radius, cell_type.astype(np.int64), domain.astype(np.int64)


def gene_table_hd(params: HDSimulationParams) -> pd.DataFrame:
    """Deterministic gene names, ids and types: markers per cell type, shared, housekeeping.

    Returns
    -------
    DataFrame indexed by gene name with ``gene_ids``, ``gene_type`` and ``marker_of`` (cell type or '').
    """
    types = params.cell_types
    per_type = max(1, round(params.marker_fraction * params.n_genes / len(types)))
    per_type = min(per_type, (params.n_genes - 1) // len(types))
    n_markers = per_type * len(types)
    n_shared = min(round(params.shared_fraction * params.n_genes), params.n_genes - 1 - n_markers)
    names, kinds, marker_of = [], [], []
    for cell_type in types:
        names += _numbered(f"{cell_type}_marker", per_type)
        kinds += ["marker"] * per_type
        marker_of += [cell_type] * per_type
    n_housekeeping = params.n_genes - n_markers - n_shared
    names += _numbered("shared", n_shared) + _numbered("housekeeping", n_housekeeping)
    kinds += ["shared"] * n_shared + ["housekeeping"] * n_housekeeping
    marker_of += [""] * (n_shared + n_housekeeping)
    return pd.DataFrame(
        {
            "gene_ids": [f"SIMH{g + 1:08d}" for g in range(params.n_genes)],
            "gene_type": kinds,
            "marker_of": marker_of,
        },
        index=pd.Index(names, name="gene"),
    )


def marker_table_hd(params: HDSimulationParams | None = None) -> pd.DataFrame:
    """Marker genes of the cell types as ``cell_type``, ``gene`` rows (as in ``resources/markers/*.tsv``)."""
    genes = gene_table_hd(params or HDSimulationParams())
    markers = genes.loc[genes["gene_type"] == "marker", "marker_of"]
    return pd.DataFrame({"cell_type": markers.to_numpy(), "gene": markers.index.to_numpy()})


# --------------------------------------------------------------------------------------------- truth


def cell_weights(
    cells: CellMap, grid: SquareGrid, *, supersample: int = 1, located: np.ndarray | None = None
) -> tuple[sp.csr_matrix, np.ndarray]:
    """``(n_bins, C)`` share of each cell's area in each bin of ``grid``, and each cell's sample points.

    The cell's area is sampled at ``supersample x supersample`` points per bin; a bin receives the share of
    its cell's points that fall in it. ``located`` (the cell of each sample point, as
    :meth:`CellMap.locate` gives it, in the fine grid's order) saves locating them again.
    """
    fine = SquareGrid(
        grid.bin_um / supersample, grid.n_rows * supersample, grid.n_cols * supersample, grid.origin_um
    )
    cell = cells.locate(fine.centres_um())[0] if located is None else np.asarray(located)
    points = np.flatnonzero(cell >= 0)
    n_points = np.bincount(cell[points], minlength=cells.n_cells)
    rows, cols = np.divmod(points, fine.n_cols)
    coarse = (rows // supersample) * grid.n_cols + cols // supersample
    share = (1.0 / np.maximum(n_points[cell[points]], 1)).astype(np.float32)
    weights = sp.csr_matrix((share, (coarse, cell[points])), shape=(grid.n_bins, cells.n_cells))
    return weights, n_points


def render_truth(
    cells: CellMap, grid: SquareGrid, *, supersample: int = 1
) -> tuple[sp.csr_matrix, np.ndarray]:
    """Expected molecules of every bin of ``grid``, each cell's molecules spread evenly over its area.

    With 2 um bins and ``supersample=1`` a bin belongs wholly to the cell under its centre; coarser grids (a
    10 or 20 um grid for a Visium view of the same tissue) should sample at 2 um
    (``supersample = bin_um / 2``), so that every grid shares one rendering of the cells and a coarse bin
    is the sum of the 2 um bins it covers (see :func:`cell_weights`).

    Returns
    -------
    ``(n_bins, G)`` CSR float32 expected counts (zero outside cells) and ``(C,)`` the number of sample
    points of each cell.
    """
    weights, n_points = cell_weights(cells, grid, supersample=supersample)
    return (weights @ cells.expression.astype(np.float32)).tocsr(), n_points


# --------------------------------------------------------------------------------------------- sample


@dataclass
class BinLevel:
    """One bin size of a simulated sample: counts, positions and truth."""

    bin_um: int
    counts: sp.csr_matrix
    barcodes: np.ndarray
    positions: pd.DataFrame
    truth: AnnData


@dataclass
class SimulatedHDSample:
    """A simulated Visium HD sample in memory: one :class:`BinLevel` per bin size, the cell map as an
    AnnData (``cells``, as written) and as a :class:`CellMap` (``cell_map``, to render the same tissue on
    other grids with :func:`render_truth`), scale factors by bin size, the images and a single-cell reference
    of the cell types (:func:`undiffuse.simulate.simulate_reference`)."""

    levels: dict[int, BinLevel]
    cells: AnnData
    cell_map: CellMap
    scalefactors: dict[int, dict[str, float]]
    hires_image: np.ndarray
    lowres_image: np.ndarray
    summary: dict[str, float | int]
    reference: AnnData
    visium: VisiumView | None = None


@dataclass
class VisiumView:
    """The same tissue seen by Visium: 55 um spots capture the 2 um bins under them.

    The spots' counts are the sums of the 2 um counts under each spot (the same molecules, so a Poisson
    draw of the spots' expectation), their truth and expectation likewise; ``grids`` holds the truth on
    square grids of :data:`VIEW_GRIDS_UM` microns (sums of the 2 um truth), the high-resolution answer that
    a super-resolution method should find from the spots.

    Attributes
    ----------
    counts
        ``(S, G)`` CSR int32 counts, spots in barcode order (as in the matrix file).
    truth
        AnnData of the spots (layout of ``truth.h5ad`` of :mod:`undiffuse.simulate`, plus ``var``
        ``kernel_length_um``).
    positions
        Space Ranger positions table (grid order).
    scalefactors
        Visium scale factors in the HD sample's full-resolution frame.
    grids
        Grid size (microns) -> AnnData of the truth on that grid (``X`` CSR float32, ``obs`` ``array_row``,
        ``array_col``, ``in_tissue``; ``obsm['spatial']`` full-resolution pixels).
    hires_image, lowres_image
        Visium-sized resamplings of the HD image.
    """

    counts: sp.csr_matrix
    truth: AnnData
    positions: pd.DataFrame
    scalefactors: dict[str, float]
    grids: dict[int, AnnData]
    hires_image: np.ndarray
    lowres_image: np.ndarray


def visium_spots(width_um: float, height_um: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Visium's hexagonal lattice over a capture area: ``array_row``, ``array_col`` and ``(S, 2)`` centres
    ``(x, y)`` in microns, every spot wholly inside the area."""
    margin, row_step = VISIUM_SPOT_UM / 2, VISIUM_PITCH_UM * math.sqrt(3) / 2
    n_rows = int((height_um - 2 * margin) // row_step) + 1
    n_per_row = int((width_um - 2 * margin - VISIUM_PITCH_UM / 2) // VISIUM_PITCH_UM) + 1
    rows, ks = np.meshgrid(np.arange(n_rows), np.arange(n_per_row), indexing="ij")
    array_row, array_col = rows.ravel().astype(np.int64), (2 * ks + rows % 2).ravel().astype(np.int64)
    centres = np.column_stack([margin + array_col * VISIUM_PITCH_UM / 2, margin + array_row * row_step])
    return array_row, array_col, centres


def capture_matrix(centres_um: np.ndarray, grid: SquareGrid, radius_um: float) -> sp.csr_matrix:
    """``(S, n_bins)`` 0/1 matrix of the bins whose centres lie within ``radius_um`` of each spot centre."""
    reach = int(math.ceil(radius_um / grid.bin_um)) + 1
    dy, dx = (offset.ravel() for offset in np.mgrid[-reach : reach + 1, -reach : reach + 1])
    origin = np.asarray(grid.origin_um)
    row0 = np.floor((centres_um[:, 1] - origin[1]) / grid.bin_um).astype(np.int64)
    col0 = np.floor((centres_um[:, 0] - origin[0]) / grid.bin_um).astype(np.int64)
    rows, cols = row0[:, None] + dy[None, :], col0[:, None] + dx[None, :]
    x = origin[0] + (cols + 0.5) * grid.bin_um - centres_um[:, :1]
    y = origin[1] + (rows + 0.5) * grid.bin_um - centres_um[:, 1:]
    inside = (np.hypot(x, y) <= radius_um) & (rows >= 0) & (rows < grid.n_rows) & (cols >= 0)
    inside &= cols < grid.n_cols
    spot = np.broadcast_to(np.arange(centres_um.shape[0])[:, None], rows.shape)[inside]
    return sp.csr_matrix(
        (np.ones(spot.size, dtype=np.float32), (spot, rows[inside] * grid.n_cols + cols[inside])),
        shape=(centres_um.shape[0], grid.n_bins),
    )


def _scalefactors(params: HDSimulationParams, hires_scalef: float, bin_um: int) -> dict[str, float]:
    mpp = params.microns_per_pixel
    return {
        "bin_size_um": float(bin_um),
        "microns_per_pixel": mpp,
        "spot_diameter_fullres": bin_um / mpp,
        "fiducial_diameter_fullres": FIDUCIAL_DIAMETER_UM / mpp,
        "regist_target_img_scalef": hires_scalef,
        "tissue_hires_scalef": hires_scalef,
        "tissue_lowres_scalef": hires_scalef * LOWRES_SCALEF / HIRES_SCALEF,
    }


def _diffuse_counts(
    weights: sp.csr_matrix,
    expression: np.ndarray,
    grid: SquareGrid,
    tissue: np.ndarray,
    scales: np.ndarray,
    params: HDSimulationParams,
    aggregations: dict[Any, sp.csr_matrix],
    rng: np.random.Generator,
) -> tuple[sp.csr_matrix, dict[Any, np.ndarray], np.ndarray]:
    """Diffuse the 2 um truth gene batch by gene batch and draw Poisson counts.

    The truth of a batch is rendered from the cells (``weights @ expression``), so that no second copy of
    the 2 um truth is held. Only one dense batch of 2 um bins exists at a time; the expected counts are kept
    dense only at the coarser bin sizes and other views (``aggregations``: bin size or view name ->
    aggregation matrix of the 2 um bins).

    Returns
    -------
    2 um counts (CSR int32), expected counts by coarse bin size (dense float32) and each gene's kernel
    cutoff in 2 um pitches.
    """
    n_bins, n_genes = weights.shape[0], expression.shape[1]
    coords = np.column_stack(grid.indices()[::-1]).astype(np.float64)  # x = column, y = row, in pitches
    order = np.argsort(scales, kind="stable")
    batch = max(1, min(n_genes, BATCH_VALUES // max(n_bins, 1)))
    expected = {size: np.zeros((m.shape[0], n_genes), dtype=np.float32) for size, m in aggregations.items()}
    cutoff = np.empty(n_genes)
    parts: list[sp.csc_matrix] = [None] * n_genes  # type: ignore[list-item]
    batches = [order[start : start + batch] for start in range(0, n_genes, batch)]
    for genes in tqdm(batches, desc="diffusing genes", unit="batch", disable=None):
        cutoff[genes] = params.reach * scales[genes].max()
        field = np.asarray(weights @ expression[:, genes], dtype=np.float64)
        mu = diffuse(
            field,
            coords,
            tissue,
            scale=scales[genes],
            bleed=params.bleed,
            distal=params.distal,
            kind=params.kernel,
            cutoff=float(cutoff[genes[0]]),
        )
        del field
        np.maximum(mu, 0.0, out=mu)  # rounding can leave -1e-17 where nothing arrives
        for size, matrix in aggregations.items():
            expected[size][:, genes] = matrix @ mu
        drawn = rng.poisson(mu).astype(np.int32)
        del mu
        for j, g in enumerate(genes):
            parts[g] = sp.csc_matrix(drawn[:, j : j + 1])
    counts = sp.hstack(parts, format="csr", dtype=np.int32)
    return counts, expected, cutoff


def _positions(grid: SquareGrid, barcodes: np.ndarray, in_tissue: np.ndarray, mpp: float) -> pd.DataFrame:
    rows, cols = grid.indices()
    centres = grid.centres_um()
    return pd.DataFrame(
        {
            "barcode": barcodes,
            "in_tissue": in_tissue.astype(np.int64),
            "array_row": rows,
            "array_col": cols,
            "pxl_row_in_fullres": (FRAME_UM + centres[:, 1]) / mpp,
            "pxl_col_in_fullres": (FRAME_UM + centres[:, 0]) / mpp,
        }
    )


def simulate_hd(params: HDSimulationParams | None = None, *, visium_view: bool = False) -> SimulatedHDSample:
    """Simulate a Visium HD sample in memory; see the module docstring for the model.

    Parameters
    ----------
    params
        Parameters (default: :class:`HDSimulationParams` defaults).
    visium_view
        Also see the same tissue through Visium spots (:class:`VisiumView`), with the truth on 10 and 20 um
        grids.

    Returns
    -------
    SimulatedHDSample; ``levels[b].truth`` is the truth at bin size ``b`` (module docstring) and
    ``summary`` holds the realised figures (cells, tissue share, background share of UMIs, ...).
    """
    params = params or HDSimulationParams()
    streams = np.random.SeedSequence(params.seed).spawn(7)
    anatomy_rng, cell_rng, gene_rng, noise_rng, count_rng, image_rng, reference_rng = map(
        np.random.default_rng, streams
    )
    fine_um = min(BIN_SIZES_UM)
    grids = {
        b: SquareGrid(float(b), round(params.height_um / b), round(params.width_um / b)) for b in BIN_SIZES_UM
    }
    fine = grids[fine_um]

    anatomy = _draw_hd_anatomy(params, anatomy_rng)
    centres, radius, nucleus, cell_type, cell_domain = _draw_cells(params, anatomy, cell_rng)
    genes = gene_table_hd(params)
    levels, profiles, expressed_in = _group_profiles(
        params, genes, params.cell_types, gene_rng, random_leak=False
    )
    lengths = np.exp(
        gene_rng.uniform(
            math.log(params.kernel_length_min_um), math.log(params.kernel_length_max_um), params.n_genes
        )
    )
    cells = CellMap(
        centres,
        radius,
        nucleus,
        cell_type,
        cell_domain,
        sp.csr_matrix((centres.shape[0], params.n_genes)),
        params.cell_types,
        params.domains,
        anatomy,
    )
    # One pass over the 2 um bins: the outline, the domains and the cells they fall in.
    fine_tissue, fine_domain, _ = _anatomy_at(anatomy, fine.centres_um())
    cell_of_bin, in_nucleus = cells.locate(fine.centres_um(), on_tissue=fine_tissue)
    weights, n_points = cell_weights(cells, fine, located=cell_of_bin)
    # Expression scales with the rendered area, so that molecules per square micron do not depend on size.
    area = n_points * float(fine_um) ** 2
    sd = params.cell_noise
    noise = np.exp(sd * noise_rng.standard_normal((cells.n_cells, params.n_genes)) - sd**2 / 2)
    expression = area[:, None] * levels[None, :] * profiles[cell_type] * noise
    tissue: dict[int, np.ndarray] = {}
    aggregations = {b: fine.aggregation(b // fine_um) for b in BIN_SIZES_UM if b != fine_um}
    tissue[fine_um] = fine_tissue
    for b, matrix in aggregations.items():
        # A coarse bin is in tissue when most of its 2 um bins are.
        tissue[b] = np.asarray(matrix @ fine_tissue.astype(np.float32)).ravel() >= 0.5 * (b // fine_um) ** 2
    depth_factor = params.depth * max(int(tissue[8].sum()), 1) / max(float(expression.sum()), 1e-12)
    expression *= depth_factor
    cells = replace(cells, expression=sp.csr_matrix(expression))
    truth_fine = (weights @ cells.expression.astype(np.float32)).tocsr()

    captures = dict(aggregations)
    if visium_view:
        spot_rows, spot_cols, spot_centres = visium_spots(params.width_um, params.height_um)
        captures["visium"] = capture_matrix(spot_centres, fine, VISIUM_SPOT_UM / 2)
    counts_fine, expected, cutoff_fine = _diffuse_counts(
        weights, expression, fine, fine_tissue, lengths / fine_um, params, captures, count_rng
    )
    del weights
    var = genes.assign(
        expressed_in=expressed_in,
        level=levels * depth_factor,
        kernel_length_um=lengths,
        kernel_cutoff_um=cutoff_fine * fine_um,
    )
    var["gene_type"] = pd.Categorical(var["gene_type"], categories=["marker", "shared", "housekeeping"])
    var.index.name = None

    mpp = params.microns_per_pixel
    full_shape = tuple(
        int(math.ceil((side + 2 * FRAME_UM) / mpp)) for side in (params.height_um, params.width_um)
    )
    hires_scalef = min(HIRES_SCALEF, HIRES_MAX_SIDE / max(full_shape))
    hires = _render_hd_he(cells, params, full_shape, hires_scalef, image_rng)
    lowres_scale = LOWRES_SCALEF / HIRES_SCALEF
    lowres = _downsample(
        hires, (max(1, round(hires.shape[0] * lowres_scale)), max(1, round(hires.shape[1] * lowres_scale)))
    )

    levels_out: dict[int, BinLevel] = {}
    simulation = params.to_dict()
    domain_names = [*params.domains, BACKGROUND]
    for b, grid in grids.items():
        rows, cols = grid.indices()
        barcodes = hd_barcodes(b, rows, cols)
        matrix = aggregations.get(b)
        counts = counts_fine if matrix is None else (matrix @ counts_fine).tocsr().astype(np.int32)
        truth = truth_fine if matrix is None else (matrix @ truth_fine).tocsr()
        positions = _positions(grid, barcodes, tissue[b], mpp)
        domain = fine_domain if matrix is None else _anatomy_at(anatomy, grid.centres_um())[1]
        obs = pd.DataFrame(
            {
                "in_tissue": tissue[b],
                "array_row": rows,
                "array_col": cols,
                "domain": pd.Categorical.from_codes(
                    np.where(domain >= 0, domain, len(domain_names) - 1), domain_names
                ),
            },
            index=pd.Index(barcodes.astype(str)),
        )
        if matrix is None:
            obs["cell"] = cell_of_bin
            obs["compartment"] = pd.Categorical.from_codes(
                np.where(cell_of_bin < 0, 0, np.where(in_nucleus, 1, 2)), ["none", "nucleus", "cytoplasm"]
            )
        else:
            obs["cell_coverage"] = (
                np.asarray(matrix @ (cell_of_bin >= 0).astype(np.float32)).ravel() / (b // fine_um) ** 2
            )
        level_var = var.assign(
            kernel_scale=var["kernel_length_um"] / b, kernel_cutoff=var["kernel_cutoff_um"] / b
        )
        adata = AnnData(
            X=truth.astype(np.float32, copy=False),
            obs=obs,
            var=level_var,
            obsm={
                "spatial": positions[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(dtype=np.float64)
            },
            uns={"simulation": simulation, "bin_size_um": b},
        )
        if matrix is not None:
            adata.layers["expected"] = expected[b]
        levels_out[b] = BinLevel(b, counts, barcodes, positions, adata)

    summary = _summary(levels_out, cells, cell_of_bin, fine_tissue)
    for level in levels_out.values():
        level.truth.uns["summary"] = summary
    cell_obs = pd.DataFrame(
        {
            "x_um": centres[:, 0],
            "y_um": centres[:, 1],
            "radius_um": radius,
            "nucleus_radius_um": nucleus,
            "area_um2": area,
            "cell_type": pd.Categorical.from_codes(cell_type, params.cell_types),
            "domain": pd.Categorical.from_codes(cell_domain, params.domains),
        },
        index=pd.Index([f"cell{c + 1:07d}" for c in range(cells.n_cells)]),
    )
    cell_adata = AnnData(
        X=cells.expression.astype(np.float32),
        obs=cell_obs,
        var=var,
        obsm={"spatial": (FRAME_UM + centres) / mpp},
        uns={"simulation": simulation, "summary": summary},
    )
    view = None
    if visium_view:
        view = _visium_view(
            params,
            (spot_rows, spot_cols, spot_centres),
            captures["visium"],
            levels_out[fine_um],
            expected["visium"],
            fine,
            hires,
            full_shape,
        )
    return SimulatedHDSample(
        levels=levels_out,
        cells=cell_adata,
        cell_map=cells,
        scalefactors={b: _scalefactors(params, hires_scalef, b) for b in BIN_SIZES_UM},
        hires_image=hires,
        lowres_image=lowres,
        summary=summary,
        reference=simulate_reference(
            pd.DataFrame((levels[None, :] * profiles).T, index=var.index, columns=params.cell_types),
            reference_rng,
        ),
        visium=view,
    )


def _visium_view(
    params: HDSimulationParams,
    spots: tuple[np.ndarray, np.ndarray, np.ndarray],
    capture: sp.csr_matrix,
    fine_level: BinLevel,
    expected: np.ndarray,
    fine: SquareGrid,
    hd_hires: np.ndarray,
    full_shape: tuple[int, int],
) -> VisiumView:
    """The Visium spots of the tissue: sums of the 2 um bins under each spot (see :class:`VisiumView`)."""
    from . import simulate as visium

    array_row, array_col, centres = spots
    mpp = params.microns_per_pixel
    fine_truth = fine_level.truth
    barcodes = visium.visium_barcodes(array_row, array_col)
    order = np.argsort(barcodes, kind="stable")
    counts = (capture @ fine_level.counts).tocsr().astype(np.int32)
    truth = np.asarray((capture @ fine_truth.X).todense(), dtype=np.float32)
    # A spot is in tissue when most of the 2 um bins under it are (Space Ranger calls it from the image).
    n_under = np.asarray(capture.sum(axis=1)).ravel()
    in_tissue = (
        np.asarray(capture @ fine_truth.obs["in_tissue"].to_numpy(dtype=np.float32)).ravel() >= 0.5 * n_under
    )
    domain_codes = fine_truth.obs["domain"].cat.codes.to_numpy()
    centre_bins = np.floor(centres[:, 1] / fine.bin_um).astype(np.int64) * fine.n_cols + np.floor(
        centres[:, 0] / fine.bin_um
    ).astype(np.int64)
    domain = pd.Categorical.from_codes(domain_codes[centre_bins], fine_truth.obs["domain"].cat.categories)
    pxl = (FRAME_UM + centres) / mpp
    positions = pd.DataFrame(
        {
            "barcode": barcodes,
            "in_tissue": in_tissue.astype(np.int64),
            "array_row": array_row,
            "array_col": array_col,
            "pxl_row_in_fullres": pxl[:, 1],
            "pxl_col_in_fullres": pxl[:, 0],
        }
    )
    spot_px = VISIUM_SPOT_UM / mpp
    scalefactors = {
        "spot_diameter_fullres": spot_px,
        "fiducial_diameter_fullres": spot_px * visium.FIDUCIAL_TO_SPOT_DIAMETER,
        "tissue_hires_scalef": visium.HIRES_MAX_SIDE / max(full_shape),
        "tissue_lowres_scalef": visium.LOWRES_MAX_SIDE / max(full_shape),
    }
    hires = _downsample(hd_hires, tuple(round(n * scalefactors["tissue_hires_scalef"]) for n in full_shape))
    lowres = _downsample(hd_hires, tuple(round(n * scalefactors["tissue_lowres_scalef"]) for n in full_shape))
    var = fine_truth.var.assign(
        kernel_scale=fine_truth.var["kernel_length_um"] / VISIUM_PITCH_UM,
        kernel_cutoff=fine_truth.var["kernel_cutoff_um"] / VISIUM_PITCH_UM,
    )
    obs = pd.DataFrame(
        {"in_tissue": in_tissue, "array_row": array_row, "array_col": array_col, "domain": domain},
        index=pd.Index(barcodes.astype(str)),
    ).iloc[order]
    spot_truth = AnnData(
        X=truth[order],
        obs=obs,
        var=var,
        layers={"expected": expected[order].astype(np.float32)},
        obsm={"spatial": pxl[order]},
        uns={
            "simulation": fine_truth.uns["simulation"],
            "view": "visium",
            "spot_diameter_um": VISIUM_SPOT_UM,
        },
    )
    grids = {}
    for size in VIEW_GRIDS_UM:
        factor = int(round(size / fine.bin_um))
        aggregate = fine.aggregation(factor, crop=True)
        grid = SquareGrid(float(size), fine.n_rows // factor, fine.n_cols // factor)
        rows, cols = grid.indices()
        in_grid_tissue = np.asarray(
            aggregate @ fine_truth.obs["in_tissue"].to_numpy(dtype=np.float32)
        ).ravel()
        grids[size] = AnnData(
            X=(aggregate @ fine_truth.X).tocsr().astype(np.float32),
            obs=pd.DataFrame(
                {"in_tissue": in_grid_tissue >= 0.5 * factor**2, "array_row": rows, "array_col": cols},
                index=pd.Index([f"g_{size:03d}um_{r:05d}_{c:05d}" for r, c in zip(rows, cols, strict=True)]),
            ),
            var=var.assign(
                kernel_scale=var["kernel_length_um"] / size, kernel_cutoff=var["kernel_cutoff_um"] / size
            ),
            obsm={"spatial": (FRAME_UM + grid.centres_um()) / mpp},
            uns={"simulation": fine_truth.uns["simulation"], "grid_um": size},
        )
    return VisiumView(
        counts=counts[order],
        truth=spot_truth,
        positions=positions,
        scalefactors=scalefactors,
        grids=grids,
        hires_image=hires,
        lowres_image=lowres,
    )


def _summary(
    levels: dict[int, BinLevel], cells: CellMap, cell_of_bin: np.ndarray, fine_tissue: np.ndarray
) -> dict[str, float | int]:
    """Realised figures: sizes, cell coverage, background share of UMIs (8 um bins) and depth."""
    level = levels[8]
    tissue = level.truth.obs["in_tissue"].to_numpy()
    totals = np.asarray(level.counts.sum(axis=1)).ravel().astype(np.float64)
    expected = level.truth.layers["expected"]
    expected_totals = expected.sum(axis=1, dtype=np.float64)
    diameters = 2 * np.sqrt(
        np.bincount(cell_of_bin[cell_of_bin >= 0], minlength=cells.n_cells)
        * float(min(BIN_SIZES_UM)) ** 2
        / np.pi
    )
    return {
        "n_cells": cells.n_cells,
        "mean_cell_diameter_um": float(diameters.mean()) if cells.n_cells else 0.0,
        "n_bins_002um": int(levels[2].counts.shape[0]),
        "n_bins_008um": int(level.counts.shape[0]),
        "n_bins_016um": int(levels[16].counts.shape[0]),
        "tissue_fraction": float(fine_tissue.mean()),
        "cell_coverage": float((cell_of_bin >= 0).sum() / max(int(fine_tissue.sum()), 1)),
        "umis_total": int(totals.sum()),
        "background_share": float(totals[~tissue].sum() / max(totals.sum(), 1.0)),
        "expected_background_share": float(expected_totals[~tissue].sum() / expected_totals.sum()),
        "mean_umis_per_tissue_bin_008um": float(totals[tissue].mean()),
        "nnz_002um": int(levels[2].counts.nnz),
    }


# --------------------------------------------------------------------------------------------- image


def _splat_discs(
    shape: tuple[int, int], centres_px: np.ndarray, radii_px: np.ndarray, weights: np.ndarray
) -> np.ndarray:
    """Sum of filled discs (one per centre, value ``weights``) on an image of ``shape``, float32."""
    out = np.zeros(shape[0] * shape[1], dtype=np.float64)
    whole = np.maximum(np.round(radii_px).astype(np.int64), 0)
    for r in np.unique(whole):
        members = np.flatnonzero(whole == r)
        dy, dx = np.mgrid[-r : r + 1, -r : r + 1]
        inside = dy**2 + dx**2 <= max(r, 0.5) ** 2
        dy, dx = dy[inside], dx[inside]
        row = np.round(centres_px[members, 1]).astype(np.int64)[:, None] + dy[None, :]
        col = np.round(centres_px[members, 0]).astype(np.int64)[:, None] + dx[None, :]
        ok = (row >= 0) & (row < shape[0]) & (col >= 0) & (col < shape[1])
        value = np.broadcast_to(weights[members, None], row.shape)
        out += np.bincount((row * shape[1] + col)[ok], value[ok], minlength=out.size)
    return out.reshape(shape).astype(np.float32)


def _render_hd_he(
    cells: CellMap,
    params: HDSimulationParams,
    full_shape: tuple[int, int],
    scale: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """H&E-like uint8 RGB image of the full-resolution frame resampled by ``scale`` (the hires image).

    Beer-Lambert mixing: eosin stains the tissue (strength by domain) and, more strongly, the cytoplasm of
    every cell; haematoxylin stains every nucleus (darkness by cell type).
    """
    shape = (round(full_shape[0] * scale), round(full_shape[1] * scale))
    um_per_px = params.microns_per_pixel / scale
    ys = (np.arange(shape[0], dtype=np.float32) + 0.5) * np.float32(um_per_px) - np.float32(FRAME_UM)
    xs = (np.arange(shape[1], dtype=np.float32) + 0.5) * np.float32(um_per_px) - np.float32(FRAME_UM)
    unit = np.float32(ANATOMY_UNIT_UM)
    x, y = np.broadcast_to(xs[None, :] / unit, shape), np.broadcast_to(ys[:, None] / unit, shape)
    tissue = cells.anatomy.outline.contains(x, y)
    domain = cells.anatomy.domain(x, y, tissue)
    n_domains = len(cells.domain_names)
    eosin_by_domain = rng.permutation(np.linspace(0.15, 0.35, n_domains)).astype(np.float32)
    stain_by_type = rng.permutation(np.linspace(0.7, 1.3, len(cells.type_names)))
    tissue_soft = ndimage.gaussian_filter(tissue.astype(np.float32), 1.0)
    texture = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), 1.5)
    texture /= texture.std() or 1.0

    centres_px = (cells.centres_um + FRAME_UM) / um_per_px
    cytoplasm = np.minimum(
        _splat_discs(shape, centres_px, cells.radius_um / um_per_px, np.ones(cells.n_cells)), 1.0
    )
    nuclei = _splat_discs(
        shape,
        centres_px,
        cells.nucleus_um / um_per_px,
        stain_by_type[cells.cell_type] * rng.uniform(0.8, 1.2, cells.n_cells),
    )
    stain = ndimage.gaussian_filter(eosin_by_domain[np.maximum(domain, 0)], 2.0)
    eosin = (tissue_soft * stain + 0.35 * ndimage.gaussian_filter(cytoplasm * tissue, 0.7)) * (
        1 + 0.12 * texture
    )
    haematoxylin = 0.9 * ndimage.gaussian_filter(nuclei * tissue, 0.7) + 0.05 * tissue_soft

    return _stained_rgb(haematoxylin, eosin, rng)


# --------------------------------------------------------------------------------------------- writing


def bin_folder(bin_um: int) -> str:
    """Space Ranger's folder name of a bin size: ``square_008um``."""
    return f"square_{bin_um:03d}um"


def write_hd_sample(outdir: str | PathLike[str], sample: SimulatedHDSample) -> Path:
    """Write a simulated HD sample: ``outdir/outs/binned_outputs/``, ``outdir/truth/``,
    ``outdir/reference.h5ad`` (single cells of its types) and, with a Visium
    view, ``outdir/visium/`` (``outs/`` in the Visium layout, ``truth.h5ad`` of the spots and
    ``truth_grid_010um.h5ad``, ``truth_grid_020um.h5ad``).

    Each folder appears only when complete: a failure leaves none behind (nor changes older ones).

    Returns
    -------
    The ``binned_outputs`` folder.
    """
    from .io.writers import write_hd_bin_folder, write_hd_feature_slice

    outdir = output_folder(outdir)
    library_id = sample.cells.uns["simulation"]["sample_id"]
    with ExitStack() as stack:
        if sample.visium is not None:
            visium_tmp = stack.enter_context(atomic_path(outdir / "visium", directory=True))
            _write_visium_view(visium_tmp, sample.visium, library_id)
        truth_tmp = stack.enter_context(atomic_path(outdir / "truth", directory=True))
        for b, level in sample.levels.items():
            level.truth.write_h5ad(truth_tmp / f"{bin_folder(b)}.h5ad", compression="gzip")
        sample.cells.write_h5ad(truth_tmp / "cells.h5ad", compression="gzip")
        reference_tmp = stack.enter_context(atomic_path(outdir / "reference.h5ad"))
        sample.reference.write_h5ad(reference_tmp)
        with atomic_path(outdir / "outs", directory=True) as outs_tmp:
            for b, level in sample.levels.items():
                write_hd_bin_folder(
                    outs_tmp / "binned_outputs" / bin_folder(b),
                    level.counts,
                    level.barcodes,
                    level.truth.var["gene_ids"].tolist(),
                    level.truth.var_names.tolist(),
                    level.positions,
                    sample.scalefactors[b],
                    hires_image=sample.hires_image,
                    lowres_image=sample.lowres_image,
                    library_id=library_id,
                )
            write_hd_feature_slice(outs_tmp / HD_FEATURE_SLICE)
    if sample.visium is None and (outdir / "visium").is_dir():
        shutil.rmtree(outdir / "visium")  # the view of an earlier sample, not of this one
    return outdir / "outs" / "binned_outputs"


def _write_visium_view(folder: Path, view: VisiumView, library_id: str) -> None:
    """``folder/outs`` (Space Ranger Visium layout), ``folder/truth.h5ad`` and the grids' truth."""
    truth = view.truth
    truth.write_h5ad(folder / "truth.h5ad", compression="gzip")
    for size, grid in view.grids.items():
        grid.write_h5ad(folder / f"truth_grid_{size:03d}um.h5ad", compression="gzip")
    write_outs_of_truth(
        folder / "outs",
        view.counts,
        truth,
        view.positions,
        view.scalefactors,
        hires_image=view.hires_image,
        lowres_image=view.lowres_image,
        library_id=f"{library_id}_visium",
    )


def simulate_hd_sample(
    outdir: str | PathLike[str],
    params: HDSimulationParams | None = None,
    /,
    *,
    preset: str | None = None,
    visium_view: bool = False,
    **overrides: Any,
) -> Path:
    """Simulate a Visium HD sample and write it (:func:`write_hd_sample`).

    Parameters
    ----------
    outdir
        Output folder (created if needed).
    params
        Base parameters (default: the :class:`HDSimulationParams` defaults, or ``preset``'s).
    preset
        ``ci`` (1 mm square, 24 genes) or ``full`` (the 6.5 mm capture area, 100 genes).
    visium_view
        Also write the Visium view of the same tissue (:class:`VisiumView`) into ``outdir/visium/``.
    **overrides
        Any field of :class:`HDSimulationParams`.

    Returns
    -------
    The ``binned_outputs`` folder.

    Raises
    ------
    ConfigError
        On an unknown preset or an unknown or invalid parameter.
    """
    params = HDSimulationParams.from_dict(params.to_dict() if params else {}, preset=preset, **overrides)
    return write_hd_sample(outdir, simulate_hd(params, visium_view=visium_view))
