r"""Diffusion kernels applied on a sample's spots: by FFT on the spot lattice, or on neighbour pairs.

A kernel is given by its log weights as a function of distance and of whether a pair crosses the tissue
boundary, batched over genes (:data:`LogWeights`). Sources are the tissue spots; targets are all spots. The
row-normalised kernel

.. math::

    P_{ij} = \frac{w_{ij}}{\sum_k w_{ik}}, \qquad
    w_{ij} = \begin{cases} k_0(|r_i - r_j|) & j \text{ in tissue} \\ k_1(|r_i - r_j|) & j \text{ off tissue}
    \end{cases}, \qquad i \text{ in tissue},

(:math:`k_1` differs from :math:`k_0` only through the tissue term of the cost weights) is applied as
:math:`P^\top z` (``push``: where the molecules of a tissue field go) and :math:`P y` (``pull``: the adjoint,
used by EM). Both operators below compute exactly this; only the cost differs.

:class:`LatticeOperator`
    On the spot lattice (:mod:`undiffuse.lattice`), with :math:`T` the tissue and :math:`B` the background
    cells, the normaliser is :math:`n = k_0 * T + k_1 * B`, ``push`` is :math:`T \odot k_0 * (z / n) + B
    \odot k_1 * (z / n)` and ``pull`` is :math:`(k_0 * (T y) + k_1 * (B y)) / n` on tissue, each convolution a
    batched FFT. The kernels are radial, hence symmetric, so convolution and correlation agree. There is no
    cutoff radius: the kernel is kept out to the radius beyond which it holds less than ``tolerance`` of its
    mass (at most the whole slide), and the FFT grid is padded only that far. Cost:
    :math:`O(G\, F \log F)` for an FFT grid of :math:`F` cells, whatever the kernel's width.
:class:`PairOperator`
    On directed pairs within a cutoff radius, as ``(E, G)`` arrays (:mod:`undiffuse.sparse_ops`). Cost and
    memory :math:`O(G\, N R^2)`. The fallback for spots that are not on a lattice.

With the same truncation radius both give the same numbers (tested to 1e-6 relative).

Shapes: ``N`` spots, ``G`` genes, ``E`` pairs, ``M`` distances.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, Protocol

import numpy as np
import torch

from .lattice import Lattice, fast_fft_size, fit_lattice, kernel_spectrum
from .sparse_ops import pull, push, segment_logsumexp
from .spatial import neighbour_pairs

#: ``(distance (M,), crosses (M,) bool) -> (M, G)`` unnormalised log kernel weights.
LogWeights = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
OperatorKind = Literal["auto", "lattice", "pairs"]

#: Share of a kernel's mass that may lie beyond the radius it is kept to on the lattice.
DEFAULT_TOLERANCE = 1e-6
#: Step (pitches) of the radial profile on which the kept radius is measured.
PROFILE_STEP = 0.05


class Kernel(Protocol):
    """A row-normalised kernel bound to its parameters."""

    def push(self, field: torch.Tensor) -> torch.Tensor:
        r""":math:`P^\top z`: ``(N, G)`` field on tissue -> ``(N, G)`` on all spots."""

    def pull(self, values: torch.Tensor) -> torch.Tensor:
        r""":math:`P y`: ``(N, G)`` on all spots -> ``(N, G)`` on tissue (zero elsewhere)."""


class DiffusionOperator(Protocol):
    """Sample geometry that binds kernels to its spots."""

    n_spots: int
    tissue: torch.Tensor

    def bind(self, log_weights: LogWeights) -> Kernel: ...


# ----------------------------------------------------------------------------------------------------- pairs


class PairKernel:
    """A kernel as ``(E, G)`` values on neighbour pairs."""

    def __init__(self, values: torch.Tensor, pairs: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.values, self.pairs = values, pairs

    @classmethod
    def from_log_weights(
        cls, log_weights: torch.Tensor, pairs: tuple[torch.Tensor, torch.Tensor], n_spots: int
    ) -> PairKernel:
        """Row-normalise ``(E, G)`` log weights per source spot, in the log domain (no overflow)."""
        source = pairs[0]
        return cls(torch.exp(log_weights - segment_logsumexp(log_weights, source, n_spots)[source]), pairs)

    def push(self, field: torch.Tensor) -> torch.Tensor:
        return push(self.values, self.pairs, field)

    def pull(self, values: torch.Tensor) -> torch.Tensor:
        return pull(self.values, self.pairs, values)


class PairOperator:
    """Kernels on the directed pairs (tissue source -> any target) within ``cutoff`` pitches.

    Parameters
    ----------
    coords
        ``(N, 2)`` spot centres in pitches.
    tissue
        ``(N,)`` boolean tissue mask.
    cutoff
        Neighbour radius in pitches.
    """

    kind = "pairs"

    def __init__(
        self, coords: np.ndarray, tissue: np.ndarray, cutoff: float, *, device=None, dtype=torch.float32
    ) -> None:
        pairs = neighbour_pairs(coords, cutoff, sources=np.asarray(tissue, dtype=bool))
        self.n_spots = pairs.n_spots
        self.cutoff = float(cutoff)
        self.tissue = torch.as_tensor(np.asarray(tissue, dtype=bool), device=device)
        self.pairs = (
            torch.as_tensor(pairs.source, device=device),
            torch.as_tensor(pairs.target, device=device),
        )
        self.distance = torch.as_tensor(pairs.distance, dtype=dtype, device=device)
        self.crosses = self.tissue[self.pairs[0]] != self.tissue[self.pairs[1]]

    @property
    def n_pairs(self) -> int:
        return int(self.distance.shape[0])

    def bind(self, log_weights: LogWeights) -> PairKernel:
        return PairKernel.from_log_weights(log_weights(self.distance, self.crosses), self.pairs, self.n_spots)


# --------------------------------------------------------------------------------------------------- lattice


class LatticeKernel:
    """A kernel as FFT spectra on the lattice; see the module doc for the operations."""

    def __init__(
        self,
        operator: LatticeOperator,
        spectra: tuple[torch.Tensor, torch.Tensor | None],
        normaliser: torch.Tensor,
        fft_shape: tuple[int, int],
    ) -> None:
        self.operator, self.spectra, self.normaliser, self.fft_shape = (
            operator,
            spectra,
            normaliser,
            fft_shape,
        )

    def _forward(self, values: torch.Tensor) -> torch.Tensor:
        return torch.fft.rfft2(self.operator.scatter(values, self.fft_shape))

    def _inverse(self, spectrum: torch.Tensor) -> torch.Tensor:
        grid = torch.fft.irfft2(spectrum, s=self.fft_shape)
        # Round-off of the FFT leaves values of order 1e-7 of the largest where the exact result is ~0.
        return self.operator.gather(grid).clamp_min(0.0)

    def push(self, field: torch.Tensor) -> torch.Tensor:
        op = self.operator
        spectrum = self._forward(field / self.normaliser)
        inside, outside = self.spectra
        into_tissue = self._inverse(inside * spectrum)
        if outside is None:
            return into_tissue
        return torch.where(op.tissue[:, None], into_tissue, self._inverse(outside * spectrum))

    def pull(self, values: torch.Tensor) -> torch.Tensor:
        op = self.operator
        inside, outside = self.spectra
        tissue = op.tissue[:, None]
        if outside is None:
            spectrum = inside * self._forward(values)
        else:
            zero = torch.zeros((), dtype=values.dtype, device=values.device)
            from_tissue = self._forward(torch.where(tissue, values, zero))
            from_background = self._forward(torch.where(tissue, zero, values))
            spectrum = inside * from_tissue + outside * from_background
        gathered = self._inverse(spectrum) / self.normaliser
        return torch.where(tissue, gathered, torch.zeros_like(gathered))


class LatticeOperator:
    """Kernels applied by FFT convolution on the spot lattice.

    Parameters
    ----------
    lattice
        The spots' lattice (:func:`undiffuse.lattice.fit_lattice`).
    tissue
        ``(N,)`` boolean tissue mask.
    cutoff
        Optional truncation radius in pitches (as the pair operator's); ``None`` keeps each kernel out to the
        radius beyond which less than ``tolerance`` of its mass lies.
    tolerance
        See ``cutoff``.
    """

    kind = "lattice"

    def __init__(
        self,
        lattice: Lattice,
        tissue: np.ndarray,
        *,
        cutoff: float | None = None,
        tolerance: float = DEFAULT_TOLERANCE,
        device=None,
        dtype=torch.float32,
    ) -> None:
        self.lattice = lattice
        self.n_spots = lattice.n_spots
        self.cutoff = cutoff
        self.tolerance = float(tolerance)
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.tissue = torch.as_tensor(np.asarray(tissue, dtype=bool), device=self.device)
        self._flat_index: dict[tuple[int, int], torch.Tensor] = {}
        self._mask_spectra: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.last_radius: float | None = None

    # spots <-> FFT grid (the lattice array at the grid's origin, zero padding after it)
    def _flat(self, fft_shape: tuple[int, int]) -> torch.Tensor:
        if fft_shape not in self._flat_index:
            index = torch.as_tensor(self.lattice.index, device=self.device)
            self._flat_index[fft_shape] = index[:, 0] * fft_shape[1] + index[:, 1]
        return self._flat_index[fft_shape]

    def scatter(self, values: torch.Tensor, fft_shape: tuple[int, int]) -> torch.Tensor:
        """``(N, G)`` -> ``(G, Fi, Fj)``, zero in empty cells and in the padding."""
        grid = torch.zeros(
            (values.shape[1], fft_shape[0] * fft_shape[1]), dtype=values.dtype, device=values.device
        )
        return grid.index_copy(1, self._flat(fft_shape), values.T).reshape(values.shape[1], *fft_shape)

    def gather(self, grid: torch.Tensor) -> torch.Tensor:
        """``(G, Fi, Fj)`` -> ``(N, G)``."""
        return grid.reshape(grid.shape[0], -1).index_select(1, self._flat(tuple(grid.shape[1:]))).T

    def kept_radius(self, log_weights: LogWeights) -> torch.Tensor:
        """``(G,)`` radius (pitches) each gene's kernel is kept to: ``cutoff``, or where its tail mass falls
        below ``tolerance``, at most the slide's diameter. Per gene, so that no gene's kernel depends on the
        others in its batch."""
        diameter = self.lattice.diameter
        with torch.no_grad():
            distance = torch.arange(0.0, diameter + PROFILE_STEP, PROFILE_STEP, dtype=torch.float64)
            distance = distance.to(device=self.device, dtype=self.dtype)
            flags = torch.zeros(distance.shape, dtype=torch.bool, device=self.device)
            if self.cutoff is not None:
                n_genes = log_weights(distance[:1], flags[:1]).shape[1]
                return torch.full((n_genes,), min(float(self.cutoff), diameter), dtype=torch.float64)
            radius = None
            for crosses in (False, True):
                logw = log_weights(distance, flags | crosses).to(torch.float64)
                # Mass in an annulus grows with its radius: weight the profile by the distance.
                mass = torch.exp(logw - logw.amax(dim=0, keepdim=True)) * distance.to(torch.float64)[:, None]
                tail = torch.flip(torch.cumsum(torch.flip(mass, [0]), 0), [0]) / mass.sum(0).clamp_min(1e-300)
                beyond = (tail > self.tolerance).sum(dim=0).clamp_max(len(distance) - 1)
                kept = distance.to(torch.float64)[beyond]
                radius = kept if radius is None else torch.maximum(radius, kept)
        return radius.clamp_max(diameter).cpu()

    def bind(self, log_weights: LogWeights) -> LatticeKernel:
        radius = self.kept_radius(log_weights)
        self.last_radius = float(radius.max())
        half_i, half_j = self.lattice.half_widths(self.last_radius)
        n_i, n_j = self.lattice.shape
        fft_shape = (fast_fft_size(n_i + half_i), fast_fft_size(n_j + half_j))
        offsets = torch.as_tensor(self.lattice.offset_distance(half_i, half_j), device=self.device)
        distance = offsets.to(self.dtype).reshape(-1)
        within = offsets.reshape(-1, 1) <= radius.to(offsets.device)[None, :] * (1 + 1e-9)
        inside = log_weights(distance, torch.zeros(distance.shape, dtype=torch.bool, device=self.device))
        outside = log_weights(distance, torch.ones(distance.shape, dtype=torch.bool, device=self.device))
        same = torch.equal(inside, outside)
        # One shift per gene for both kernels keeps their ratio; the normaliser takes out the rest.
        shift = inside.detach().amax(dim=0) if same else torch.maximum(inside, outside).detach().amax(dim=0)
        box = (2 * half_i + 1, 2 * half_j + 1)

        def spectrum(logw: torch.Tensor) -> torch.Tensor:
            weights = torch.where(within, torch.exp(logw - shift), torch.zeros_like(logw))
            return kernel_spectrum(weights.T.reshape(-1, *box), fft_shape)

        spectra = (spectrum(inside), None if same else spectrum(outside))
        tissue_spectrum, background_spectrum = self._masks(fft_shape)
        total = spectra[0] * (
            tissue_spectrum if spectra[1] is not None else tissue_spectrum + background_spectrum
        )
        if spectra[1] is not None:
            total = total + spectra[1] * background_spectrum
        normaliser = self.gather(torch.fft.irfft2(total, s=fft_shape))
        tiny = torch.finfo(normaliser.dtype).tiny
        # Off tissue no mass leaves, so the normaliser there is never used; 1 keeps divisions finite.
        normaliser = torch.where(
            self.tissue[:, None], normaliser.clamp_min(tiny), torch.ones_like(normaliser)
        )
        return LatticeKernel(self, spectra, normaliser, fft_shape)

    def _masks(self, fft_shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        if fft_shape not in self._mask_spectra:
            tissue = self.tissue.to(self.dtype)[:, None]
            spectra = torch.fft.rfft2(self.scatter(torch.cat([tissue, 1.0 - tissue], dim=1), fft_shape))
            self._mask_spectra[fft_shape] = (spectra[0:1], spectra[1:2])
        return self._mask_spectra[fft_shape]


def build_operator(
    coords: np.ndarray,
    tissue: np.ndarray,
    *,
    kind: OperatorKind = "auto",
    cutoff: float | None = None,
    fallback_cutoff: float | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    device=None,
    dtype=torch.float32,
) -> LatticeOperator | PairOperator:
    """The diffusion operator of a sample.

    Parameters
    ----------
    coords
        ``(N, 2)`` spot centres in pitches.
    tissue
        ``(N,)`` boolean tissue mask (the sources).
    kind
        ``auto``: the lattice operator when the spots sit on a lattice, else pairs; ``lattice`` fails when they
        do not; ``pairs`` always uses pairs.
    cutoff
        Truncation radius (pitches) of either operator; ``None``: none on the lattice.
    fallback_cutoff
        Radius of the pair operator when ``cutoff`` is ``None``.
    tolerance
        Mass a lattice kernel may lose beyond its kept radius when there is no cutoff.
    """
    if kind not in ("auto", "lattice", "pairs"):
        raise ValueError(f"unknown operator {kind!r}; expected 'auto', 'lattice' or 'pairs'")
    lattice = fit_lattice(coords) if kind != "pairs" else None
    if lattice is not None:
        return LatticeOperator(
            lattice, tissue, cutoff=cutoff, tolerance=tolerance, device=device, dtype=dtype
        )
    if kind == "lattice":
        raise ValueError("the spots do not sit on a regular lattice; use the pair operator")
    radius = cutoff if cutoff is not None else fallback_cutoff
    if radius is None:
        raise ValueError("the spots are not on a lattice and the pair operator needs a cutoff radius")
    return PairOperator(coords, tissue, radius, device=device, dtype=dtype)
