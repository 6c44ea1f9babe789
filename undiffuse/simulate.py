r"""Ground-truth simulator: a Visium sample with known undiffused expression, as Space Ranger ``outs/``.

The sample is built in four steps, each from its own random stream of one seed:

1. **Anatomy** (continuous functions of the position, so that spots and image pixels agree): an irregular
   tissue region (a star-shaped, Fourier-deformed ellipse, one piece, background all round), spatial domains
   (wavy layers across the tissue and elliptical blobs inside it) and a smooth cell-density trend times a
   cellularity per domain.
2. **Truth**: the undiffused expected counts of spot :math:`i` and gene :math:`g`,

   .. math::

       z_{ig} = c\, s_i\, \lambda_g\, \pi_{g, k(i)}\, \epsilon_{ig}, \qquad
       \log \lambda_g \sim \mathcal N(0, \sigma_\lambda^2), \qquad
       \log \epsilon_{ig} \sim \mathcal N(-\tau^2/2, \tau^2),

   where :math:`s_i` is the density of spot :math:`i`, :math:`k(i)` its domain, :math:`\pi_{g,k}` the domain
   profile of the gene (markers: 1 in their domain and ``marker_leak`` elsewhere; shared genes: a few domains;
   housekeeping: mild modulation) and :math:`c` sets the mean depth of tissue spots. Off tissue :math:`z = 0`.
3. **Diffusion** with the shared forward model :func:`undiffuse.diffusion.diffuse` (per-gene kernel scale
   :math:`\kappa_g = \kappa\, e^{\sigma_\kappa \xi_g}`, local share ``bleed``, uniform share ``distal``;
   kernels renormalised within ``kernel_reach`` scales), then Poisson counts. Each gene keeps its total
   through the diffusion; ``bleed`` and ``distal`` set the share of UMIs found off tissue.
4. **Image**: an H&E-like picture by Beer-Lambert mixing of eosin (tissue, strength by domain) and
   haematoxylin (nuclei, density following the cell density), aligned with the spots by the scale factors.

Geometry follows Visium: a hexagonal grid with ``array_col = 2 k + (array_row mod 2)``, 100 um pitch, 55 um
spots, about 1.6 full-resolution pixels per micrometre.
"""

from __future__ import annotations

import hashlib
import math
import numbers
import re
import typing
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from os import PathLike
from pathlib import Path
from typing import Any, ClassVar, Self

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData
from PIL import Image
from scipy import ndimage
from scipy.sparse.csgraph import connected_components
from tqdm.auto import tqdm

from .atomic import atomic_paths
from .diffusion import KernelKind, diffuse
from .errors import ConfigError, InputError
from .memory import heap_reuse
from .spatial import adjacency

#: Prefix of the truth's ``var`` columns holding each domain's expression profile (expected count at mean
#: density, before the spot noise).
PROFILE_PREFIX = "profile_"
#: Cells per domain, mean UMIs per cell, and the spread (log scale) of the reference's capture efficiency per
#: gene, of its cell sizes and of its cells' expression around their type's profile (:func:`simulate_reference`).
REFERENCE_CELLS = 200
REFERENCE_DEPTH = 2000.0
REFERENCE_CAPTURE_SD = 0.3
REFERENCE_CELL_SD = 0.3

#: Ratio of fiducial to spot diameter in Space Ranger's scale factors.
FIDUCIAL_TO_SPOT_DIAMETER = 1.6154
#: Empty frame round the capture area in the full-resolution image, in spot pitches (where fiducials sit).
FRAME_PITCHES = 3.0
#: Longest side of the hires and lowres images, as Space Ranger writes them.
HIRES_MAX_SIDE = 2000
LOWRES_MAX_SIDE = 600
#: Rings of spots along the edge of the capture area that are always background.
BACKGROUND_RIM = 2
#: Domain label of spots off tissue.
BACKGROUND = "background"
#: Beer-Lambert optical densities (R, G, B) of haematoxylin and eosin (Ruifrok and Johnston, 2001).
HAEMATOXYLIN_OD = np.array([0.65, 0.70, 0.29])
EOSIN_OD = np.array([0.07, 0.99, 0.11])
#: Neighbour radius of the kernel in kernel scales, by kernel kind (see ``SimulationParams.kernel_reach``).
DEFAULT_REACH = {"gaussian": 3.0, "heavy_tailed": 8.0}
#: Upper bound on neighbour pairs times genes per call of the diffusion model (memory of one batch).
_PAIR_GENE_BUDGET = 20_000_000

_NUCLEOTIDES = np.array(list("ACGT"))


class _SimulationParamsBase:
    """What the simulators' parameter sets share: type coercion, range checks, construction from a mapping
    and the domain names. Subclasses are frozen dataclasses with the shared fields."""

    _LABEL: ClassVar[str] = "simulation"
    _PRESETS: ClassVar[Mapping[str, Mapping[str, Any]]] = {}

    def __post_init__(self) -> None:
        for spec in fields(self):  # type: ignore[arg-type]
            object.__setattr__(self, spec.name, _coerce(spec.name, spec.type, getattr(self, spec.name)))
        problems = [message for ok, message in (*self._checks(), *self._shared_checks()) if not ok]
        if problems:
            raise ConfigError(f"invalid {self._LABEL} parameters: " + "; ".join(problems))

    def _checks(self) -> list[tuple[bool, str]]:
        """``(holds, message)`` of the checks of this kind of sample's own fields."""
        raise NotImplementedError

    def _shared_checks(self) -> list[tuple[bool, str]]:
        kinds = typing.get_args(KernelKind)
        return [
            (
                0.2 <= self.tissue_fraction <= 0.7,
                f"tissue_fraction must be in [0.2, 0.7], got {self.tissue_fraction}",
            ),
            (self.n_layers >= 1, f"n_layers must be >= 1, got {self.n_layers}"),
            (self.n_blobs >= 0, f"n_blobs must be >= 0, got {self.n_blobs}"),
            (
                0 < self.blob_fraction and self.n_blobs * self.blob_fraction <= 0.5,
                f"blob_fraction must be > 0 with n_blobs * blob_fraction <= 0.5, got {self.blob_fraction}",
            ),
            (0 < self.marker_fraction < 1, f"marker_fraction must be in (0, 1), got {self.marker_fraction}"),
            (0 <= self.shared_fraction < 1, f"shared_fraction must be in [0, 1), got {self.shared_fraction}"),
            (self.depth > 0, f"depth must be > 0, got {self.depth}"),
            (self.level_sd >= 0, f"level_sd must be >= 0, got {self.level_sd}"),
            (self.marker_weight > 0, f"marker_weight must be > 0, got {self.marker_weight}"),
            (0 <= self.marker_leak <= 1, f"marker_leak must be in [0, 1], got {self.marker_leak}"),
            (self.housekeeping_sd >= 0, f"housekeeping_sd must be >= 0, got {self.housekeeping_sd}"),
            (self.density_sd >= 0, f"density_sd must be >= 0, got {self.density_sd}"),
            (
                0 <= self.cellularity_spread < 1,
                f"cellularity_spread must be in [0, 1), got {self.cellularity_spread}",
            ),
            (0 <= self.bleed < 1, f"bleed must be in [0, 1), got {self.bleed}"),
            (0 <= self.distal < 1, f"distal must be in [0, 1), got {self.distal}"),
            (self.bleed + self.distal < 1, f"bleed + distal must be < 1, got {self.bleed + self.distal}"),
            (self.kernel in kinds, f"kernel must be one of {list(kinds)}, got {self.kernel!r}"),
            (
                self.kernel_reach == 0 or 1.5 <= self.kernel_reach <= 20,
                f"kernel_reach must be 0 (automatic) or in [1.5, 20] kernel scales, got {self.kernel_reach}",
            ),
            (
                re.fullmatch(r"[A-Za-z0-9_.-]+", self.sample_id) is not None,
                f"sample_id must be a plain name (letters, digits, '_', '.', '-'), got {self.sample_id!r}",
            ),
            (self.seed >= 0, f"seed must be >= 0, got {self.seed}"),
        ]

    @classmethod
    def from_dict(
        cls, values: Mapping[str, Any] | None = None, /, *, preset: str | None = None, **overrides: Any
    ) -> Self:
        """Parameters from a preset (if the kind has presets), then a mapping (e.g. the config's
        ``simulation:`` section), then keyword overrides.

        Raises
        ------
        ConfigError
            On an unknown preset or key (listing the known ones) or an invalid value.
        """
        if preset is not None and preset not in cls._PRESETS:
            known_presets = ", ".join(cls._PRESETS) or "none"
            raise ConfigError(f"unknown {cls._LABEL} preset {preset!r}; known presets: {known_presets}")
        merged = {**(cls._PRESETS[preset] if preset else {}), **(values or {}), **overrides}
        known = {spec.name for spec in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(merged) - known)
        if unknown:
            raise ConfigError(
                f"unknown {cls._LABEL} parameter(s) {', '.join(map(str, unknown))}; "
                f"known parameters: {', '.join(sorted(known))}"
            )
        return cls(**merged)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly copy of every parameter."""
        return asdict(self)  # type: ignore[call-overload]

    @property
    def domains(self) -> list[str]:
        """Domain names: ``layer1``, ..., then ``blob1``, ...."""
        return [f"layer{i + 1}" for i in range(self.n_layers)] + [f"blob{i + 1}" for i in range(self.n_blobs)]

    @property
    def reach(self) -> float:
        """Neighbour radius of the kernel in kernel scales (``kernel_reach``, or the kind's default)."""
        return self.kernel_reach or DEFAULT_REACH[self.kernel]


@dataclass(frozen=True)
class SimulationParams(_SimulationParamsBase):
    """Every parameter of a simulated sample, with its default (the "moderate" demo sample).

    The fields map 1:1 onto the keyword arguments of :func:`simulate_sample` and onto the ``simulation:``
    section of the workflow config. Lengths are in spot pitches unless named otherwise.

    Attributes
    ----------
    n_rows, n_cols
        Visium grid: rows, and spots per row (78 x 64 = 4,992 spots on a real slide).
    n_genes
        Genes, split into domain markers, shared genes and housekeeping genes.
    tissue_fraction
        Share of the capture area's spots covered by tissue (0.2-0.7).
    n_layers, n_blobs
        Spatial domains: wavy layers across the tissue, and elliptical blobs inside it.
    blob_fraction
        Share of tissue spots in each blob.
    marker_fraction, shared_fraction
        Share of genes that mark one domain, and that are expressed in a few domains; the rest are
        housekeeping genes.
    depth
        Mean expected UMIs per tissue spot, over all genes, before diffusion.
    level_sd
        Standard deviation of the log of the genes' mean levels (log-normal spread).
    marker_weight
        Level of marker and shared genes in their domains, relative to the median housekeeping gene.
    marker_leak
        Expression of marker and shared genes outside their domains, relative to inside.
    housekeeping_sd
        Standard deviation of the log domain modulation of housekeeping genes.
    density_sd
        Standard deviation of the log smooth cell-density trend over the tissue.
    cellularity_spread
        Cellularity of each domain is drawn uniformly in ``1 +- cellularity_spread``.
    spot_noise
        Standard deviation of the log per-spot, per-gene biological noise of the truth.
    bleed
        Share of each spot's molecules that moves by the local kernel.
    distal
        Share of each spot's molecules spread uniformly over the slide.
    kernel
        Radial profile of the local kernel: ``gaussian`` or ``heavy_tailed``.
    kernel_scale
        Median kernel scale over genes, in spot pitches.
    kernel_scale_sd
        Standard deviation of the log kernel scale over genes.
    kernel_reach
        Neighbour radius of the kernel in kernel scales (of the widest gene of a batch); the kernel is
        renormalised within it. 0 picks :data:`DEFAULT_REACH` of the kernel kind, which leaves about 1%
        (gaussian, 3 scales) and 3% (heavy-tailed, 8 scales) of a kernel's mass beyond the radius.
    spot_pitch_um, spot_diameter_um, pixels_per_um
        Slide geometry and full-resolution image scale.
    sample_id
        Library id written into the matrix.
    seed
        Seed of every random choice; one seed gives byte-identical files.
    """

    n_rows: int = 78
    n_cols: int = 64
    n_genes: int = 300
    tissue_fraction: float = 0.5
    n_layers: int = 3
    n_blobs: int = 2
    blob_fraction: float = 0.08
    marker_fraction: float = 0.35
    shared_fraction: float = 0.2
    depth: float = 10000.0
    level_sd: float = 1.0
    marker_weight: float = 4.0
    marker_leak: float = 0.05
    housekeeping_sd: float = 0.15
    density_sd: float = 0.25
    cellularity_spread: float = 0.3
    spot_noise: float = 0.1
    bleed: float = 0.3
    distal: float = 0.1
    kernel: KernelKind = "gaussian"
    kernel_scale: float = 2.5
    kernel_scale_sd: float = 0.2
    kernel_reach: float = 0.0
    spot_pitch_um: float = 100.0
    spot_diameter_um: float = 55.0
    pixels_per_um: float = 1.6
    sample_id: str = "simulated"
    seed: int = 0

    def _checks(self) -> list[tuple[bool, str]]:
        return [
            (self.n_rows >= 12, f"n_rows must be >= 12, got {self.n_rows}"),
            (self.n_cols >= 12, f"n_cols must be >= 12, got {self.n_cols}"),
            (
                self.n_genes >= len(self.domains) + 1,
                f"n_genes must be at least the number of domains + 1 ({len(self.domains) + 1}), "
                f"got {self.n_genes}",
            ),
            (self.spot_noise >= 0, f"spot_noise must be >= 0, got {self.spot_noise}"),
            (
                0 < self.kernel_scale <= 20,
                f"kernel_scale must be in (0, 20] pitches, got {self.kernel_scale}",
            ),
            (
                0 <= self.kernel_scale_sd <= 1,
                f"kernel_scale_sd must be in [0, 1], got {self.kernel_scale_sd}",
            ),
            (
                0 < self.spot_diameter_um < self.spot_pitch_um,
                f"need 0 < spot_diameter_um < spot_pitch_um, "
                f"got {self.spot_diameter_um} and {self.spot_pitch_um}",
            ),
            (
                0.1 <= self.pixels_per_um <= 10,
                f"pixels_per_um must be in [0.1, 10], got {self.pixels_per_um}",
            ),
        ]

    @property
    def pitch_px(self) -> float:
        """Spot pitch in full-resolution pixels."""
        return self.spot_pitch_um * self.pixels_per_um


def _coerce(name: str, annotation: Any, value: Any) -> Any:
    """Check a parameter's type, turning integers into floats where a float is expected."""
    expected = str(annotation)
    if expected == "int":
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ConfigError(f"simulation parameter {name} must be an integer, got {value!r}")
        return int(value)
    if expected == "float":
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ConfigError(f"simulation parameter {name} must be a finite number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise ConfigError(f"simulation parameter {name} must be a string, got {value!r}")
    return value


# --------------------------------------------------------------------------------------------- genes


def _numbered(prefix: str, count: int) -> list[str]:
    """``prefix01``, ``prefix02``, ...: zero-padded to the width of ``count``, at least two digits."""
    width = max(2, len(str(count)))
    return [f"{prefix}{j + 1:0{width}d}" for j in range(count)]


def gene_table(params: SimulationParams | None = None) -> pd.DataFrame:
    """Deterministic gene names, ids and types (independent of the seed).

    Marker genes come first, grouped by domain (``layer1_marker01``, ...), then shared genes
    (``shared01``, ...), then housekeeping genes (``housekeeping001``, ...).

    Returns
    -------
    DataFrame indexed by gene name with ``gene_ids``, ``gene_type`` and ``marker_of`` (domain or '').
    """
    params = params or SimulationParams()
    domains = params.domains
    # At least one marker per domain and one housekeeping gene (SimulationParams checks that they fit).
    per_domain = max(1, round(params.marker_fraction * params.n_genes / len(domains)))
    per_domain = min(per_domain, (params.n_genes - 1) // len(domains))
    n_markers = per_domain * len(domains)
    n_shared = min(round(params.shared_fraction * params.n_genes), params.n_genes - 1 - n_markers)
    n_housekeeping = params.n_genes - n_markers - n_shared
    names, types, marker_of = [], [], []
    for domain in domains:
        names += _numbered(f"{domain}_marker", per_domain)
        types += ["marker"] * per_domain
        marker_of += [domain] * per_domain
    names += _numbered("shared", n_shared) + _numbered("housekeeping", n_housekeeping)
    types += ["shared"] * n_shared + ["housekeeping"] * n_housekeeping
    marker_of += [""] * (n_shared + n_housekeeping)
    return pd.DataFrame(
        {
            "gene_ids": [f"SIMG{g + 1:08d}" for g in range(params.n_genes)],  # Ensembl-like, fixed width
            "gene_type": types,
            "marker_of": marker_of,
        },
        index=pd.Index(names, name="gene"),
    )


def marker_table(params: SimulationParams | None = None) -> pd.DataFrame:
    """Marker genes of the domains as ``cell_type``, ``gene`` rows (as in ``resources/markers/*.tsv``)."""
    genes = gene_table(params)
    markers = genes.loc[genes["gene_type"] == "marker", "marker_of"]
    return pd.DataFrame({"cell_type": markers.to_numpy(), "gene": markers.index.to_numpy()})


# --------------------------------------------------------------------------------------------- geometry


def visium_barcodes(array_row: np.ndarray, array_col: np.ndarray) -> np.ndarray:
    """Realistic, fixed barcodes (16 nt + ``-1``) of grid positions, as a slide's whitelist gives them.

    A barcode is a hash of its array position only, like on a real slide, so grids of any size agree; the
    rare hash collision is resolved by rehashing the later position.
    """
    barcodes: list[str] = []
    used: set[str] = set()
    for row, col in zip(np.asarray(array_row).tolist(), np.asarray(array_col).tolist(), strict=True):
        salt = 0
        while True:
            digest = hashlib.blake2b(f"visium:{row}:{col}:{salt}".encode(), digest_size=4).digest()
            value = int.from_bytes(digest, "big")  # 32 bits = 16 nucleotides
            barcode = "".join(_NUCLEOTIDES[(value >> (2 * i)) & 3] for i in range(16)) + "-1"
            if barcode not in used:
                break
            salt += 1
        used.add(barcode)
        barcodes.append(barcode)
    return np.array(barcodes, dtype=object)


@dataclass(frozen=True)
class _Grid:
    """Spots of the capture area in grid order (row-major)."""

    array_row: np.ndarray
    array_col: np.ndarray
    pxl_row: np.ndarray
    pxl_col: np.ndarray
    coords: np.ndarray  # (N, 2) x, y in spot pitches, from the rounded pixels
    full_shape: tuple[int, int]  # full-resolution image (rows, cols)

    @property
    def n_spots(self) -> int:
        return int(self.array_row.shape[0])


def _grid(params: SimulationParams) -> _Grid:
    rows, ks = np.meshgrid(np.arange(params.n_rows), np.arange(params.n_cols), indexing="ij")
    array_row = rows.ravel().astype(np.int64)
    array_col = (2 * ks + rows % 2).ravel().astype(np.int64)
    pitch, frame = params.pitch_px, FRAME_PITCHES * params.pitch_px
    pxl_col = np.round(frame + array_col * pitch / 2).astype(np.int64)
    pxl_row = np.round(frame + array_row * pitch * math.sqrt(3) / 2).astype(np.int64)
    full_shape = (int(pxl_row.max() + frame) + 1, int(pxl_col.max() + frame) + 1)
    coords = np.column_stack([pxl_col, pxl_row]).astype(np.float64) / pitch
    return _Grid(array_row, array_col, pxl_row, pxl_col, coords, full_shape)


def _rim(grid: _Grid, params: SimulationParams) -> np.ndarray:
    k = grid.array_col // 2
    return (
        (grid.array_row < BACKGROUND_RIM)
        | (grid.array_row >= params.n_rows - BACKGROUND_RIM)
        | (k < BACKGROUND_RIM)
        | (k >= params.n_cols - BACKGROUND_RIM)
    )


def _midpoint_threshold(values: np.ndarray, count: int) -> float:
    """A threshold with exactly ``count`` of ``values`` at or below it (ties aside)."""
    ordered = np.sort(values)
    count = int(np.clip(count, 1, ordered.size))
    if count == ordered.size:
        return float(ordered[-1])
    return float(0.5 * (ordered[count - 1] + ordered[count]))


@dataclass(frozen=True)
class _Waves:
    r"""Smooth random field of unit variance: :math:`\sqrt{2/n}\sum_k\cos(\omega_k \cdot x + \phi_k)`."""

    frequencies: np.ndarray  # (n, 2)
    phases: np.ndarray  # (n,)

    @classmethod
    def draw(cls, rng: np.random.Generator, n: int, wavelengths: tuple[float, float]) -> _Waves:
        angle = rng.uniform(0, 2 * np.pi, n)
        frequency = 2 * np.pi / rng.uniform(*wavelengths, n)
        return cls(
            np.column_stack([np.cos(angle), np.sin(angle)]) * frequency[:, None], rng.uniform(0, 2 * np.pi, n)
        )

    def __call__(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        out = np.zeros(np.broadcast_shapes(np.shape(x), np.shape(y)))
        for (fx, fy), phase in zip(self.frequencies, self.phases, strict=True):
            out += np.cos(fx * x + fy * y + phase)
        return out * math.sqrt(2.0 / len(self.phases))


@dataclass(frozen=True)
class _Outline:
    """Tissue outline: a Fourier-deformed ellipse, star-shaped about its centre, so always one piece."""

    centre: np.ndarray
    semi_axes: np.ndarray
    modes: np.ndarray  # (m, 3): order, amplitude, phase of the radial deformation
    threshold: float = np.inf

    def radius(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Normalised radius divided by the deformation; tissue is where it is at most ``threshold``."""
        # Python floats keep the dtype of x and y (float32 for image pixels).
        (cx, cy), (ax, ay) = map(float, self.centre), map(float, self.semi_axes)
        u, v = (x - cx) / ax, (y - cy) / ay
        theta = np.arctan2(v, u)
        deform = np.ones_like(theta)
        for order, amplitude, phase in self.modes.tolist():
            deform += amplitude * np.cos(order * theta + phase)
        return np.hypot(u, v) / deform

    def contains(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return self.radius(x, y) <= self.threshold


@dataclass(frozen=True)
class _Layers:
    """Wavy parallel bands: a coordinate along ``direction`` plus a sine across it, cut at ``edges``."""

    origin: np.ndarray
    direction: np.ndarray
    amplitude: float
    wavelength: float
    phase: float
    edges: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def depth(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        (ox, oy), (ux, uy) = map(float, self.origin), map(float, self.direction)
        dx, dy = x - ox, y - oy
        along = dx * ux + dy * uy
        across = -dx * uy + dy * ux
        return along + self.amplitude * np.sin(2 * np.pi * across / self.wavelength + self.phase)

    def index(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.edges, self.depth(x, y)).astype(np.int64)


@dataclass(frozen=True)
class _Blob:
    """An elliptical domain: rotated, stretched distance to ``centre`` at most ``threshold``."""

    centre: np.ndarray
    angle: float
    aspect: float
    threshold: float = 0.0

    def metric(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        dx, dy = x - float(self.centre[0]), y - float(self.centre[1])
        c, s = math.cos(self.angle), math.sin(self.angle)
        return np.hypot(c * dx + s * dy, (-s * dx + c * dy) * self.aspect)


@dataclass(frozen=True)
class _Anatomy:
    """Tissue outline, domains and cell density as functions of the position (spot pitches), so that the
    spots and the image pixels agree."""

    outline: _Outline
    layers: _Layers
    blobs: tuple[_Blob, ...]
    density_waves: _Waves
    density_sd: float
    cellularity: np.ndarray  # (n_domains,)
    density_norm: float = 1.0

    def domain(self, x: np.ndarray, y: np.ndarray, tissue: np.ndarray) -> np.ndarray:
        """Domain index (layers, then blobs) of positions; -1 off ``tissue``."""
        codes = self.layers.index(x, y)
        n_layers = self.layers.edges.size + 1
        for b, blob in enumerate(self.blobs):
            codes[blob.metric(x, y) <= blob.threshold] = n_layers + b
        codes[~tissue] = -1
        return codes

    def density(self, x: np.ndarray, y: np.ndarray, domain: np.ndarray) -> np.ndarray:
        """Relative cell density (mean 1 over tissue spots): smooth trend times cellularity; 0 off tissue."""
        trend = np.exp(self.density_sd * self.density_waves(x, y))
        return np.where(domain >= 0, trend * self.cellularity[np.maximum(domain, 0)], 0.0) / self.density_norm


def _draw_outline(low: np.ndarray, high: np.ndarray, jitter: float, rng: np.random.Generator) -> _Outline:
    """A Fourier-deformed ellipse filling the box ``low``-``high``, its centre moved by up to ``jitter`` of the
    box; its threshold is set by the caller."""
    orders = np.arange(2, 7)
    modes = np.column_stack(
        [orders, rng.uniform(-1, 1, orders.size) * 0.24 / orders, rng.uniform(0, 2 * np.pi, orders.size)]
    )
    return _Outline(
        (low + high) / 2 + rng.uniform(-jitter, jitter, 2) * (high - low), (high - low) / 2, modes
    )


def _draw_tissue(
    params: SimulationParams, grid: _Grid, rng: np.random.Generator
) -> tuple[_Outline, np.ndarray]:
    """Outline covering ``tissue_fraction`` of the spots, clear of the rim, and the spots' tissue mask."""
    x, y = grid.coords[:, 0], grid.coords[:, 1]
    outline = _draw_outline(grid.coords.min(axis=0), grid.coords.max(axis=0), 0.04, rng)
    radius = outline.radius(x, y)
    threshold = _midpoint_threshold(radius, round(params.tissue_fraction * grid.n_spots))
    threshold = min(threshold, float(radius[_rim(grid, params)].min()) * (1 - 1e-9))
    outline = replace(outline, threshold=threshold)
    tissue = radius <= threshold
    # A star-shaped region is one piece, but its sampling on the lattice may leave a stray spot at a thin tip.
    n_parts, part = connected_components(adjacency(grid.coords)[tissue][:, tissue], directed=False)
    if n_parts > 1:
        tissue[np.flatnonzero(tissue)[part != np.argmax(np.bincount(part))]] = False
    return outline, tissue


def _draw_blobs(
    params: _SimulationParamsBase,
    coords: np.ndarray,
    outline: _Outline,
    tissue: np.ndarray,
    rng: np.random.Generator,
) -> tuple[_Blob, ...]:
    """Blobs of ``blob_fraction`` of the tissue sites each, centred well inside the tissue and apart."""
    x, y = coords[:, 0], coords[:, 1]
    size = max(1, round(params.blob_fraction * int(tissue.sum())))
    core = np.flatnonzero(tissue & (outline.radius(x, y) <= 0.6 * outline.threshold))
    core = core if core.size else np.flatnonzero(tissue)
    spacing = 2.2 * math.sqrt(size * math.sqrt(3) / 2 / math.pi)  # 1.1 diameters of a round blob
    blobs: list[_Blob] = []
    for _ in range(params.n_blobs):
        distance = np.full(core.size, np.inf)
        for blob in blobs:
            distance = np.minimum(distance, np.hypot(*(coords[core] - blob.centre).T))
        free = core[distance >= spacing]
        centre = rng.choice(free) if free.size else core[np.argmax(distance)]
        blob = _Blob(coords[centre].copy(), rng.uniform(0, np.pi), rng.uniform(1.0, 1.8))
        blobs.append(replace(blob, threshold=_midpoint_threshold(blob.metric(x, y)[tissue], size)))
    return tuple(blobs)


def _draw_layers(
    params: _SimulationParamsBase,
    coords: np.ndarray,
    outline: _Outline,
    free: np.ndarray,
    rng: np.random.Generator,
) -> _Layers:
    """Layers splitting the ``free`` sites (tissue outside blobs) into shares near ``1 / n_layers``."""
    angle = rng.uniform(0, 2 * np.pi)
    span = float(np.mean(outline.semi_axes)) * 2 * outline.threshold
    layers = _Layers(
        outline.centre,
        np.array([math.cos(angle), math.sin(angle)]),
        amplitude=rng.uniform(0.05, 0.1) * span,
        wavelength=rng.uniform(0.8, 1.5) * span,
        phase=rng.uniform(0, 2 * np.pi),
    )
    depth = layers.depth(coords[free, 0], coords[free, 1])
    shares = np.maximum(rng.dirichlet(np.full(params.n_layers, 8.0)), 0.5 / params.n_layers)
    cumulative = np.cumsum(shares / shares.sum())[:-1]
    return replace(
        layers, edges=np.array([_midpoint_threshold(depth, round(c * depth.size)) for c in cumulative])
    )


def _draw_anatomy(
    params: SimulationParams, grid: _Grid, rng: np.random.Generator
) -> tuple[_Anatomy, np.ndarray]:
    """Anatomy and the tissue mask of the spots (one connected piece, background rim kept)."""
    outline, tissue = _draw_tissue(params, grid, rng)
    return _draw_domains(params, grid.coords, outline, tissue, rng), tissue


def _draw_domains(
    params: _SimulationParamsBase,
    coords: np.ndarray,
    outline: _Outline,
    tissue: np.ndarray,
    rng: np.random.Generator,
) -> _Anatomy:
    """The anatomy inside a drawn outline: blobs, layers, density trend and cellularity, sampled at
    ``coords`` (``(n, 2)``) whose ``tissue`` mask the outline gives."""
    x, y = coords[:, 0], coords[:, 1]
    blobs = _draw_blobs(params, coords, outline, tissue, rng)
    in_blob = np.zeros(coords.shape[0], dtype=bool)
    for blob in blobs:
        in_blob |= blob.metric(x, y) <= blob.threshold
    # Layers split what the blobs leave, so that no layer is empty.
    layers = _draw_layers(params, coords, outline, tissue & ~in_blob, rng)
    span = float(np.mean(outline.semi_axes)) * 2 * outline.threshold
    anatomy = _Anatomy(
        outline,
        layers,
        blobs,
        density_waves=_Waves.draw(rng, 6, (0.6 * span, 1.6 * span)),
        density_sd=params.density_sd,
        cellularity=1 + rng.uniform(-1, 1, len(params.domains)) * params.cellularity_spread,
    )
    domain = anatomy.domain(x, y, tissue)
    return replace(anatomy, density_norm=float(anatomy.density(x, y, domain)[tissue].mean()))


# --------------------------------------------------------------------------------------------- expression


def _group_profiles(
    params: _SimulationParamsBase,
    genes: pd.DataFrame,
    groups: list[str],
    rng: np.random.Generator,
    *,
    random_leak: bool,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Gene levels ``(G,)``, profiles over ``groups`` (domains or cell types) ``(len(groups), G)`` and the
    groups each gene is expressed in.

    A marker is 1 in the group of its ``marker_of`` and ``marker_leak`` elsewhere (times a log-normal factor
    per group with ``random_leak``); a shared gene is expressed in two or three groups; a housekeeping gene
    is modulated mildly in all of them.
    """
    n_groups, n_genes = len(groups), genes.shape[0]
    gene_type = genes["gene_type"].to_numpy()
    levels = np.exp(params.level_sd * rng.standard_normal(n_genes))
    levels[gene_type != "housekeeping"] *= params.marker_weight
    leak_factor = np.exp(0.3 * rng.standard_normal((n_groups, n_genes))) if random_leak else 1.0
    leak = np.broadcast_to(params.marker_leak * leak_factor, (n_groups, n_genes))
    profiles = np.exp(params.housekeeping_sd * rng.standard_normal((n_groups, n_genes)))
    expressed_in = [""] * n_genes
    for g in range(n_genes):
        if gene_type[g] == "housekeeping":
            continue
        if gene_type[g] == "marker":
            active = np.array([groups.index(genes["marker_of"].iat[g])])
            amplitude = np.ones(1)
        else:
            n_active = int(rng.integers(2, min(3, n_groups) + 1)) if n_groups > 1 else 1
            active = np.sort(rng.choice(n_groups, n_active, replace=False))
            amplitude = rng.uniform(0.5, 1.0, n_active)
        profiles[:, g] = leak[:, g]
        profiles[active, g] = amplitude
        expressed_in[g] = ",".join(groups[k] for k in active)
    return levels, profiles, expressed_in


def _diffuse_in_batches(
    truth: np.ndarray, coords: np.ndarray, tissue: np.ndarray, scales: np.ndarray, params: SimulationParams
) -> tuple[np.ndarray, np.ndarray]:
    """Apply :func:`diffuse` to genes in batches of similar kernel scale, so that memory stays bounded.

    Genes are sorted by scale so that each batch's neighbour radius (``reach`` times its widest kernel) is
    close to what each of its genes needs.

    Returns
    -------
    The expected counts ``(N, G)`` and each gene's neighbour radius ``(G,)`` in pitches.
    """
    order = np.argsort(scales, kind="stable")
    pairs_per_pitch2 = int(tissue.sum()) * math.pi / (math.sqrt(3) / 2)  # hexagonal lattice density
    batches, start = [], 0
    while start < order.size:
        stop = start + 1
        while stop < order.size:
            pairs = pairs_per_pitch2 * (params.reach * scales[order[stop]]) ** 2
            if pairs * (stop + 1 - start) > _PAIR_GENE_BUDGET:
                break
            stop += 1
        batches.append(order[start:stop])
        start = stop
    expected = np.empty_like(truth)
    cutoff = np.empty_like(scales)
    with heap_reuse():
        for batch in tqdm(batches, desc="diffusing genes", unit="batch", disable=None):
            cutoff[batch] = params.reach * scales[batch].max()
            expected[:, batch] = diffuse(
                truth[:, batch],
                coords,
                tissue,
                scale=scales[batch],
                bleed=params.bleed,
                distal=params.distal,
                kind=params.kernel,
                cutoff=float(cutoff[batch[0]]),
            )
    return expected, cutoff


# --------------------------------------------------------------------------------------------- image


def _render_he(
    anatomy: _Anatomy,
    params: SimulationParams,
    full_shape: tuple[int, int],
    scale: float,
    density_bound: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """H&E-like uint8 RGB image of the full-resolution frame, resampled by ``scale``.

    Beer-Lambert mixing of two stains on glass: eosin stains the tissue with a strength per domain;
    haematoxylin marks nuclei, drawn as a Poisson process whose intensity follows the cell density (trend
    times cellularity of the domain), which must stay below ``density_bound``.
    """
    shape = (round(full_shape[0] * scale), round(full_shape[1] * scale))
    to_pitch = 1.0 / (scale * params.pitch_px)  # image pixel -> spot pitches
    y, x = ((np.arange(n, dtype=np.float32) + 0.5) * np.float32(to_pitch) for n in shape)
    x, y = np.broadcast_to(x[None, :], shape), np.broadcast_to(y[:, None], shape)
    tissue = anatomy.outline.contains(x, y)
    domain = anatomy.domain(x, y, tissue)
    n_domains = anatomy.cellularity.size
    # Evenly spread, shuffled stain strengths keep every pair of domains apart in the picture.
    eosin_by_domain = rng.permutation(np.linspace(0.2, 0.6, n_domains)).astype(np.float32)
    stain_by_domain = rng.permutation(np.linspace(0.7, 1.3, n_domains))

    tissue_soft = ndimage.gaussian_filter(tissue.astype(np.float32), 1.5)
    texture = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), 2.0)
    texture /= texture.std() or 1.0
    stain = ndimage.gaussian_filter(eosin_by_domain[np.maximum(domain, 0)], 2.0)  # no razor-sharp borders
    eosin = tissue_soft * stain * (1 + 0.12 * texture)

    # Nuclei: a uniform Poisson process thinned to the density; about 8 per pitch^2 at mean density
    # (1,000 cells per mm^2 in a 10 um section).
    nuclei_per_pitch2 = 8.0
    area_pitch2 = shape[0] * shape[1] * to_pitch**2
    candidates = rng.uniform(0, 1, (rng.poisson(density_bound * nuclei_per_pitch2 * area_pitch2), 2))
    pixel = (candidates * np.array(shape)).astype(np.int64)
    flat = pixel[:, 0] * shape[1] + pixel[:, 1]
    nucleus_domain = domain.ravel()[flat]
    density = anatomy.density(*((pixel[:, ::-1] + 0.5) * to_pitch).T, nucleus_domain)
    keep = rng.uniform(0, density_bound, density.size) < density
    weights = stain_by_domain[np.maximum(nucleus_domain[keep], 0)] * rng.uniform(0.7, 1.3, int(keep.sum()))
    nuclei = np.bincount(flat[keep], weights, minlength=shape[0] * shape[1]).reshape(shape).astype(np.float32)
    sigma = max(0.6, 3.5 * params.pixels_per_um * scale)  # nuclei ~7 um across
    # Scaled so that a lone nucleus peaks near optical density 1.1, the darkness of a stained nucleus.
    haematoxylin = ndimage.gaussian_filter(nuclei, sigma) * (2 * np.pi * sigma**2 * 1.1) + 0.08 * tissue_soft

    return _stained_rgb(haematoxylin, eosin, rng)


def _stained_rgb(haematoxylin: np.ndarray, eosin: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 RGB of two stains' optical density maps on slightly uneven glass (Beer-Lambert)."""
    shape = haematoxylin.shape
    glass = 0.965 + 0.01 * ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), 3.0)
    rgb = np.empty((*shape, 3), dtype=np.uint8)
    for channel in range(3):
        optical_density = haematoxylin * HAEMATOXYLIN_OD[channel] + eosin * EOSIN_OD[channel]
        rgb[..., channel] = np.clip(np.round(255 * glass * np.exp(-optical_density)), 0, 255)
    return rgb


def _downsample(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resample a uint8 RGB image to ``shape`` (rows, cols) with a Lanczos filter."""
    resized = Image.fromarray(image, mode="RGB").resize((shape[1], shape[0]), Image.Resampling.LANCZOS)
    return np.asarray(resized)


# --------------------------------------------------------------------------------------------- sample


@dataclass
class SimulatedSample:
    """A simulated sample in memory.

    Attributes
    ----------
    counts
        ``(N, G)`` CSR int64 Poisson counts, spots in barcode order (as in the matrix file).
    truth
        AnnData of the truth (the content of ``truth.h5ad``).
    positions
        Space Ranger positions table (grid order), columns of ``io.writers.POSITION_COLUMNS``.
    scalefactors
        Space Ranger scale factors.
    hires_image, lowres_image
        ``(H, W, 3)`` uint8 RGB.
    reference
        A matching single-cell reference of the domains (:func:`simulate_reference`, the content of
        ``reference.h5ad``).
    """

    counts: sp.csr_matrix
    truth: AnnData
    positions: pd.DataFrame
    scalefactors: dict[str, float]
    hires_image: np.ndarray
    lowres_image: np.ndarray
    reference: AnnData


def _rmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((np.asarray(a, dtype=np.float64) - b) ** 2)))


def _draw_truth(
    params: SimulationParams,
    genes: pd.DataFrame,
    density: np.ndarray,
    domain: np.ndarray,
    gene_rng: np.random.Generator,
    noise_rng: np.random.Generator,
) -> tuple[np.ndarray, pd.DataFrame]:
    """Undiffused expected counts ``(N, G)`` (zero off tissue) and the gene table with the drawn values."""
    tissue = domain >= 0
    levels, profiles, expressed_in = _group_profiles(
        params, genes, params.domains, gene_rng, random_leak=True
    )
    kernel_scales = params.kernel_scale * np.exp(
        params.kernel_scale_sd * gene_rng.standard_normal(genes.shape[0])
    )
    sd = params.spot_noise
    noise = np.exp(sd * noise_rng.standard_normal((domain.size, genes.shape[0])) - sd**2 / 2)
    truth = density[:, None] * levels[None, :] * profiles[np.maximum(domain, 0)] * noise
    truth[~tissue] = 0.0
    depth_factor = params.depth / truth[tissue].sum(axis=1).mean()
    truth *= depth_factor
    var = genes.assign(expressed_in=expressed_in, level=levels * depth_factor, kernel_scale=kernel_scales)
    var["gene_type"] = pd.Categorical(var["gene_type"], categories=["marker", "shared", "housekeeping"])
    for k, name in enumerate(params.domains):
        var[f"{PROFILE_PREFIX}{name}"] = levels * profiles[k] * depth_factor
    return truth, var


def _summary(
    truth: np.ndarray,
    expected: np.ndarray,
    counts: np.ndarray,
    tissue: np.ndarray,
    markers: np.ndarray,
    rng: np.random.Generator,
) -> dict[str, float | int]:
    """Realised figures of the sample; the RMSEs over tissue spots compare the diffusion's bias with the
    Poisson noise alone (a Poisson draw of the truth itself)."""
    on_tissue, marker_block = truth[tissue], np.ix_(tissue, markers)
    return {
        "n_spots": int(tissue.size),
        "n_tissue_spots": int(tissue.sum()),
        "tissue_fraction": float(tissue.mean()),
        "background_share": float(counts[~tissue].sum() / max(counts.sum(), 1)),
        "expected_background_share": float(expected[~tissue].sum() / expected.sum()),
        "mean_umis_per_tissue_spot": float(counts[tissue].sum(axis=1).mean()),
        "marker_rmse_raw_vs_truth": _rmse(counts[marker_block], truth[marker_block]),
        "marker_rmse_poisson_vs_truth": _rmse(rng.poisson(truth[marker_block]), truth[marker_block]),
        "rmse_raw_vs_truth": _rmse(counts[tissue], on_tissue),
        "rmse_poisson_vs_truth": _rmse(rng.poisson(on_tissue), on_tissue),
    }


def _scalefactors(params: SimulationParams, grid: _Grid) -> dict[str, float]:
    """Space Ranger scale factors: images of at most 2,000 and 600 pixels a side."""
    spot_diameter = params.spot_diameter_um * params.pixels_per_um
    return {
        "spot_diameter_fullres": spot_diameter,
        "fiducial_diameter_fullres": spot_diameter * FIDUCIAL_TO_SPOT_DIAMETER,
        "tissue_hires_scalef": HIRES_MAX_SIDE / max(grid.full_shape),
        "tissue_lowres_scalef": LOWRES_MAX_SIDE / max(grid.full_shape),
    }


def simulate(params: SimulationParams | None = None) -> SimulatedSample:
    """Simulate a sample in memory; see the module docstring for the model.

    Returns
    -------
    SimulatedSample whose ``truth`` holds, besides the layout of ``docs/architecture.md``:
    ``obs['density']`` (relative cell density), ``obsm['spatial']`` (full-resolution pixels, x then y),
    ``var['expressed_in']`` (domains of marker and shared genes), ``var['level']`` (expected count in the
    gene's top domain at mean density), ``var['profile_{domain}']`` (expected count in each domain at mean
    density), ``var['kernel_cutoff']`` (neighbour radius in pitches) and
    ``uns['summary']`` (tissue fraction, background share of UMIs, RMSE of raw counts and of a Poisson draw
    of the truth against the truth over tissue spots, for marker genes and for all genes).
    """
    params = params or SimulationParams()
    streams = np.random.SeedSequence(params.seed).spawn(7)
    anatomy_rng, gene_rng, noise_rng, count_rng, image_rng, check_rng, reference_rng = map(
        np.random.default_rng, streams
    )

    grid = _grid(params)
    anatomy, tissue = _draw_anatomy(params, grid, anatomy_rng)
    x, y = grid.coords[:, 0], grid.coords[:, 1]
    domain = anatomy.domain(x, y, tissue)
    density = anatomy.density(x, y, domain)

    truth, var = _draw_truth(params, gene_table(params), density, domain, gene_rng, noise_rng)
    scales = var["kernel_scale"].to_numpy()
    expected, var["kernel_cutoff"] = _diffuse_in_batches(truth, grid.coords, tissue, scales, params)
    expected = np.maximum(expected, 0.0)  # rounding can leave -1e-17 where nothing arrives
    counts = count_rng.poisson(expected)
    markers = (var["gene_type"] == "marker").to_numpy()
    summary = _summary(truth, expected, counts, tissue, markers, check_rng)

    # The matrix lists barcodes sorted, as Space Ranger writes it; the positions stay in grid order.
    barcodes = visium_barcodes(grid.array_row, grid.array_col)
    order = np.argsort(barcodes, kind="stable")
    names = params.domains
    obs = pd.DataFrame(
        {
            "in_tissue": tissue,
            "array_row": grid.array_row,
            "array_col": grid.array_col,
            "domain": pd.Categorical.from_codes(
                np.where(domain >= 0, domain, len(names)), [*names, BACKGROUND]
            ),
            "density": density,
        },
        index=barcodes,
    ).iloc[order]
    var.index.name = None
    truth_adata = AnnData(
        X=truth[order].astype(np.float32),
        obs=obs,
        var=var,
        layers={"expected": expected[order].astype(np.float32)},
        obsm={"spatial": np.column_stack([grid.pxl_col, grid.pxl_row])[order].astype(np.float64)},
        uns={"simulation": params.to_dict(), "summary": summary},
    )

    scalefactors = _scalefactors(params, grid)
    hires = _render_he(
        anatomy,
        params,
        grid.full_shape,
        scalefactors["tissue_hires_scalef"],
        density_bound=1.5 * float(density.max()),  # the spot grid samples the smooth density finely
        rng=image_rng,
    )
    lowres = _downsample(
        hires, tuple(round(n * scalefactors["tissue_lowres_scalef"]) for n in grid.full_shape)
    )
    positions = pd.DataFrame(
        {
            "barcode": barcodes,
            "in_tissue": tissue.astype(np.int64),
            "array_row": grid.array_row,
            "array_col": grid.array_col,
            "pxl_row_in_fullres": grid.pxl_row,
            "pxl_col_in_fullres": grid.pxl_col,
        }
    )
    return SimulatedSample(
        counts=sp.csr_matrix(counts[order]),
        truth=truth_adata,
        positions=positions,
        scalefactors=scalefactors,
        hires_image=hires,
        lowres_image=lowres,
        reference=simulate_reference(domain_profiles(truth_adata), reference_rng),
    )


def simulate_reference(
    profiles: pd.DataFrame, rng: np.random.Generator, *, n_cells: int = REFERENCE_CELLS
) -> AnnData:
    r"""A single-cell reference of a simulated sample: ``n_cells`` cells of each type.

    Cell :math:`c` of type :math:`k` draws :math:`x_{cg} \sim \mathrm{Poisson}(n_c\, e_g\, \pi_{kg}\,
    \epsilon_{cg} / \sum_h e_h \pi_{kh})` from the type's profile :math:`\pi_k`, with a log-normal cell size
    :math:`n_c` around :data:`REFERENCE_DEPTH` UMIs, a log-normal capture efficiency :math:`e_g` per gene (the
    reference is another platform) and log-normal cell noise :math:`\epsilon`.

    Parameters
    ----------
    profiles
        ``(G, types)`` expected expression of each gene in each type (the truth's domain profiles); the
        index holds the gene names, a ``gene_ids`` column is not expected.
    rng
        Random stream.

    Returns
    -------
    ``(cells, G)`` AnnData: CSR counts in ``X``, the type in ``obs['cell_type']``, the genes of ``profiles``.
    """
    types = [str(t) for t in profiles.columns]
    n_genes = profiles.shape[0]
    capture = np.exp(REFERENCE_CAPTURE_SD * rng.standard_normal(n_genes))
    shares = profiles.to_numpy(np.float64).T * capture
    shares /= shares.sum(axis=1, keepdims=True)
    labels = np.repeat(np.arange(len(types)), n_cells)
    sd = REFERENCE_CELL_SD
    sizes = REFERENCE_DEPTH * np.exp(sd * rng.standard_normal(len(labels)) - sd**2 / 2)
    noise = np.exp(sd * rng.standard_normal((len(labels), n_genes)) - sd**2 / 2)
    counts = rng.poisson(sizes[:, None] * shares[labels] * noise)
    obs = pd.DataFrame(
        {"cell_type": pd.Categorical.from_codes(labels, types)},
        index=[f"cell{i + 1}" for i in range(len(labels))],
    )
    return AnnData(
        X=sp.csr_matrix(counts.astype(np.float32)), obs=obs, var=pd.DataFrame(index=profiles.index)
    )


def domain_profiles(truth: AnnData) -> pd.DataFrame:
    """``(G, domains)`` the truth's domain profiles (``var['profile_{domain}']``)."""
    columns = [c for c in truth.var.columns if c.startswith(PROFILE_PREFIX)]
    return truth.var[columns].rename(columns=lambda c: c.removeprefix(PROFILE_PREFIX))


def output_folder(outdir: str | PathLike[str]) -> Path:
    """``outdir`` as a folder for a simulated sample, created if needed.

    Raises
    ------
    InputError
        When ``outdir`` is a file.
    """
    outdir = Path(outdir)
    if outdir.exists() and not outdir.is_dir():
        raise InputError(outdir, "exists and is not a folder; give a folder for the simulated sample")
    outdir.mkdir(parents=True, exist_ok=True)
    return outdir


def write_outs_of_truth(
    folder: Path,
    counts: sp.spmatrix,
    truth: AnnData,
    positions: pd.DataFrame,
    scalefactors: Mapping[str, Any],
    *,
    hires_image: np.ndarray,
    lowres_image: np.ndarray,
    library_id: str,
) -> None:
    """Space Ranger ``outs`` of simulated ``counts`` (spots x genes) whose barcodes and genes are the
    ``truth``'s (:func:`undiffuse.io.writers.write_spaceranger_outs`)."""
    from .io.writers import write_spaceranger_outs

    write_spaceranger_outs(
        folder,
        counts,
        truth.obs_names.tolist(),
        truth.var["gene_ids"].tolist(),
        truth.var_names.tolist(),
        positions,
        scalefactors,
        hires_image=hires_image,
        lowres_image=lowres_image,
        library_id=library_id,
    )


def write_sample(outdir: str | PathLike[str], sample: SimulatedSample) -> Path:
    """Write a simulated sample as ``outdir/outs`` (Space Ranger layout), ``outdir/truth.h5ad`` and its
    single-cell reference ``outdir/reference.h5ad``.

    Each appears only when complete: a failure leaves none behind (nor changes older ones).

    Returns
    -------
    The ``outs`` folder.
    """

    outdir = output_folder(outdir)
    truth = sample.truth
    with atomic_paths([(outdir / "truth.h5ad", False), (outdir / "reference.h5ad", False)]) as (
        truth_tmp,
        ref_tmp,
    ):
        truth.write_h5ad(truth_tmp)
        sample.reference.write_h5ad(ref_tmp)
        write_outs_of_truth(
            outdir / "outs",
            sample.counts,
            truth,
            sample.positions,
            sample.scalefactors,
            hires_image=sample.hires_image,
            lowres_image=sample.lowres_image,
            library_id=truth.uns["simulation"]["sample_id"],
        )
    return outdir / "outs"


def simulate_sample(
    outdir: str | PathLike[str], params: SimulationParams | None = None, /, **overrides: Any
) -> Path:
    """Simulate a sample and write it as a Space Ranger ``outs/`` folder plus ``truth.h5ad``.

    Writes ``outdir/outs/raw_feature_bc_matrix.h5``, ``outdir/outs/spatial/{tissue_positions.csv,
    scalefactors_json.json, tissue_hires_image.png, tissue_lowres_image.png}``, ``outdir/reference.h5ad``
    (:func:`simulate_reference`) and ``outdir/truth.h5ad``
    (layout in ``docs/architecture.md``), each only once complete.

    Parameters
    ----------
    outdir
        Output folder (created if needed).
    params
        Base parameters (default: the :class:`SimulationParams` defaults).
    **overrides
        Any field of :class:`SimulationParams`, e.g. ``n_rows=24, bleed=0.5, seed=7``.

    Returns
    -------
    The ``outs`` folder.

    Raises
    ------
    ConfigError
        On an unknown or invalid parameter.
    """
    params = SimulationParams.from_dict(params.to_dict() if params else {}, **overrides)
    return write_sample(outdir, simulate(params))
