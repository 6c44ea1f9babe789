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
#: Step (pitches) of the radial profile on which the kept radius is measured, out to FINE_PROFILE_RANGE; beyond
#: it the steps grow geometrically by PROFILE_GROWTH.
PROFILE_STEP = 0.05
FINE_PROFILE_RANGE = 5.0
PROFILE_GROWTH = 1.01


def on_slide(values: torch.Tensor, tissue_rows: torch.Tensor, n_spots: int) -> torch.Tensor:
    """``(N, ...)`` values given on the ``(T, ...)`` spots ``tissue_rows`` (a field kept on tissue only), zero
    elsewhere."""
    return values.new_zeros((n_spots, *values.shape[1:])).index_copy_(0, tissue_rows, values)


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

    def bind(self, log_weights: LogWeights, *, tissue_dependent: bool | None = None) -> Kernel:
        """The row-normalised kernel of these log weights.

        ``tissue_dependent``: whether the weights towards background targets (``crosses``) are a kernel of their
        own. ``None`` decides by comparing them with the weights towards tissue; ``True`` keeps both even where
        they are equal now, so that gradients can tell them apart; ``False`` takes the weights towards tissue
        for every target.
        """


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

    def bind(self, log_weights: LogWeights, *, tissue_dependent: bool | None = None) -> PairKernel:
        crosses = self.crosses if tissue_dependent is not False else torch.zeros_like(self.crosses)
        return PairKernel.from_log_weights(log_weights(self.distance, crosses), self.pairs, self.n_spots)


# --------------------------------------------------------------------------------------------------- lattice


class _KernelConvolution(torch.autograd.Function):
    r"""Circular convolution of ``(G, Pin, Fi, Fj)`` grids with ``(G, P, 2 pi + 1, 2 pj + 1)`` kernels by FFT,
    with its gradients written out.

    Forward: :math:`Y_p = w_p \circledast U` (``Pin = 1``, one output plane per kernel), or with ``sum_planes``
    :math:`Y = \sum_p w_p \circledast U_p` (``Pin = P``). Backward, from :math:`\bar Y`: the input's gradient is
    the correlation with the kernels, :math:`\bar U = \mathcal F^{-1}(\overline{\hat w}\, \hat{\bar Y})`, and
    the kernels' is the correlation of :math:`\bar Y` with the input, cropped to the kernel's box. Autograd
    through the FFTs reaches the same numbers with complex-to-complex transforms and more element-wise passes.
    """

    @staticmethod
    def forward(ctx, grid, box, spectra, fft_shape, sum_planes, grid_spectrum):
        spectrum = torch.fft.rfft2(grid) if grid_spectrum is None else grid_spectrum
        product = spectra * spectrum
        if sum_planes:
            product = product.sum(1, keepdim=True)
        ctx.save_for_backward(spectra, spectrum)
        ctx.fft_shape, ctx.sum_planes, ctx.box_shape = fft_shape, sum_planes, tuple(box.shape[-2:])
        return torch.fft.irfft2(product, s=fft_shape)

    @staticmethod
    def backward(ctx, grad):
        spectra, spectrum = ctx.saved_tensors
        grad_spectrum = torch.fft.rfft2(grad)
        grad_grid = grad_box = None
        if ctx.needs_input_grad[0]:
            back = spectra.conj() * grad_spectrum
            if not ctx.sum_planes:
                back = back.sum(1, keepdim=True)
            grad_grid = torch.fft.irfft2(back, s=ctx.fft_shape)
        if ctx.needs_input_grad[1]:
            correlation = torch.fft.irfft2(grad_spectrum * spectrum.conj(), s=ctx.fft_shape)
            box_i, box_j = ctx.box_shape
            # The kernel's offset (a - pi, b - pj) sits at that grid index modulo the grid (kernel_spectrum).
            centred = torch.roll(correlation, shifts=((box_i - 1) // 2, (box_j - 1) // 2), dims=(-2, -1))
            grad_box = centred[..., :box_i, :box_j]
        return grad_grid, grad_box, None, None, None, None


class LatticeKernel:
    """A kernel as FFT spectra on the lattice; see the module doc for the operations.

    The kernels have one plane (the same kernel towards every spot) or two (towards tissue and towards
    background cells). ``push`` transforms the source field once and returns both planes in one inverse FFT;
    ``pull`` scatters tissue and background values to their planes and transforms them in one FFT.

    Parameters
    ----------
    operator
        The lattice operator.
    box
        ``(G, P, 2 pi + 1, 2 pj + 1)`` kernel weights on the box of lattice offsets (differentiable).
    fft_shape
        ``(Fi, Fj)`` FFT grid.
    """

    def __init__(self, operator: LatticeOperator, box: torch.Tensor, fft_shape: tuple[int, int]) -> None:
        self.operator, self.box, self.fft_shape = operator, box, fft_shape
        self.n_planes = int(box.shape[1])
        self.spectra = kernel_spectrum(box.detach(), fft_shape)
        masks = operator.mask_spectra(fft_shape, self.n_planes)
        # Only tissue spots send mass, so the normaliser is kept on them alone: a Visium HD call keeps the
        # kernels of all its genes for the low-rank model.
        normaliser = operator.gather(
            self._convolve(None, sum_planes=True, grid_spectrum=masks), tissue_only=True
        )
        self.normaliser = normaliser.clamp_min(torch.finfo(normaliser.dtype).tiny)

    def _convolve(self, grid, *, sum_planes: bool, grid_spectrum=None) -> torch.Tensor:
        return _KernelConvolution.apply(
            grid, self.box, self.spectra, self.fft_shape, sum_planes, grid_spectrum
        )

    def push(self, field: torch.Tensor) -> torch.Tensor:
        op = self.operator
        sources = field.index_select(0, op.tissue_rows) / self.normaliser
        grid = self._convolve(op.scatter(sources, self.fft_shape, 1, tissue_only=True), sum_planes=False)
        # Round-off of the FFT leaves values of order 1e-7 of the largest where the exact result is ~0.
        return op.gather(grid).clamp_min(0.0)

    def pull(self, values: torch.Tensor) -> torch.Tensor:
        op = self.operator
        grid = self._convolve(op.scatter(values, self.fft_shape, self.n_planes), sum_planes=True)
        inside = op.gather(grid, tissue_only=True).clamp_min(0.0) / self.normaliser
        return on_slide(inside, op.tissue_rows, values.shape[0])


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
        #: ``(N_t,)`` indices of the tissue spots, the only sources.
        self.tissue_rows = torch.nonzero(self.tissue).reshape(-1)
        self._flat_index: dict[tuple[tuple[int, int], int, bool], torch.Tensor] = {}
        self._mask_spectra: dict[tuple[int, int], torch.Tensor] = {}
        self._profile: tuple[torch.Tensor, torch.Tensor] | None = None
        self.last_radius: float | None = None

    # spots <-> FFT grid (the lattice array at the grid's origin, zero padding after it). With two planes a
    # tissue spot sits in the first and a background spot in the second.
    def _flat(self, fft_shape: tuple[int, int], n_planes: int, tissue_only: bool = False) -> torch.Tensor:
        key = (fft_shape, n_planes, tissue_only)
        if key not in self._flat_index:
            index = torch.as_tensor(self.lattice.index, device=self.device)
            flat = index[:, 0] * fft_shape[1] + index[:, 1]
            if n_planes == 2:
                flat = flat + (~self.tissue).to(flat.dtype) * (fft_shape[0] * fft_shape[1])
            self._flat_index[key] = flat[self.tissue_rows] if tissue_only else flat
        return self._flat_index[key]

    def scatter(
        self, values: torch.Tensor, fft_shape: tuple[int, int], n_planes: int, *, tissue_only: bool = False
    ) -> torch.Tensor:
        """``(N, G)`` -> ``(G, n_planes, Fi, Fj)``, zero in empty cells, in the padding and, with two planes, in
        the other plane; with ``tissue_only``, ``(N_t, G)`` values of the tissue spots, zero on the others."""
        grid = torch.zeros(
            (n_planes * fft_shape[0] * fft_shape[1], values.shape[1]),
            dtype=values.dtype,
            device=values.device,
        )
        # Copying whole rows of the spots-by-genes values and transposing the grid once is several times faster
        # than writing the transposed values into a genes-by-cells grid.
        grid.index_copy_(0, self._flat(fft_shape, n_planes, tissue_only), values)
        return grid.T.contiguous().reshape(values.shape[1], n_planes, *fft_shape)

    def gather(self, grid: torch.Tensor, *, tissue_only: bool = False) -> torch.Tensor:
        """``(G, n_planes, Fi, Fj)`` -> ``(N, G)``, each spot from its plane (``(N_t, G)``, the tissue spots,
        with ``tissue_only``)."""
        n_planes, fft_shape = int(grid.shape[1]), (int(grid.shape[2]), int(grid.shape[3]))
        flat = self._flat(fft_shape, n_planes, tissue_only)
        return grid.reshape(grid.shape[0], -1).index_select(1, flat).T

    @staticmethod
    def _planes(
        log_weights: LogWeights, distance: torch.Tensor, tissue_dependent: bool | None
    ) -> torch.Tensor:
        """``(P, M, G)`` log weights towards tissue targets and, as a second plane, towards background targets;
        one plane where they are one kernel (``tissue_dependent`` false, or ``None`` and equal). Each plane is
        its own call, so that equal weights compare equal bit for bit."""
        flags = torch.zeros(distance.shape, dtype=torch.bool, device=distance.device)
        inside = log_weights(distance, flags)
        if tissue_dependent is False:
            return inside[None]
        outside = log_weights(distance, ~flags)
        if tissue_dependent is None and torch.equal(inside, outside):
            return inside[None]
        return torch.stack([inside, outside])

    def _profile_distances(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Distances (pitches, float64) out to the slide's diameter at which kernel profiles are integrated,
        and the width each stands for: steps of :data:`PROFILE_STEP` out to :data:`FINE_PROFILE_RANGE`, then
        growing by :data:`PROFILE_GROWTH` (a tail's mass varies on the scale of the distance)."""
        if self._profile is None:
            diameter = self.lattice.diameter
            fine = np.arange(0.0, min(FINE_PROFILE_RANGE, diameter) + PROFILE_STEP / 2, PROFILE_STEP)
            coarse = fine[-1] * PROFILE_GROWTH ** np.arange(
                1, 2 + np.log(diameter / fine[-1]) / np.log(PROFILE_GROWTH)
            )
            distance = np.concatenate([fine, coarse[coarse < diameter * PROFILE_GROWTH]])
            width = np.gradient(distance)
            self._profile = tuple(torch.as_tensor(a, device=self.device) for a in (distance, width))
        return self._profile

    def kept_radius(self, log_weights: LogWeights, *, tissue_dependent: bool | None = None) -> torch.Tensor:
        """``(G,)`` radius (pitches) each gene's kernel is kept to: ``cutoff``, or where its tail mass falls
        below ``tolerance``, at most the slide's diameter. Per gene, so that no gene's kernel depends on the
        others in its batch."""
        diameter = self.lattice.diameter
        with torch.no_grad():
            distance, width = self._profile_distances()
            if self.cutoff is not None:
                n_genes = self._planes(log_weights, distance[:1].to(self.dtype), False).shape[2]
                return torch.full((n_genes,), min(float(self.cutoff), diameter), dtype=torch.float64)
            logw = self._planes(log_weights, distance.to(self.dtype), tissue_dependent).to(torch.float64)
            # Mass in an annulus grows with its radius: weight the profile by the distance.
            mass = torch.exp(logw - logw.amax(dim=1, keepdim=True)) * (distance * width)[:, None]
            tail = torch.flip(torch.cumsum(torch.flip(mass, [1]), 1), [1]) / mass.sum(
                1, keepdim=True
            ).clamp_min(1e-300)
            beyond = (tail > self.tolerance).sum(dim=1).clamp_max(len(distance) - 1)
            radius = distance[beyond].amax(dim=0)
        return radius.clamp_max(diameter).cpu()

    def bind(self, log_weights: LogWeights, *, tissue_dependent: bool | None = None) -> LatticeKernel:
        radius = self.kept_radius(log_weights, tissue_dependent=tissue_dependent)
        self.last_radius = float(radius.max())
        half_i, half_j = self.lattice.half_widths(self.last_radius)
        n_i, n_j = self.lattice.shape
        fft_shape = (fast_fft_size(n_i + half_i), fast_fft_size(n_j + half_j))
        offsets = torch.as_tensor(self.lattice.offset_distance(half_i, half_j), device=self.device)
        distance = offsets.to(self.dtype).reshape(-1)
        within = offsets.reshape(1, -1, 1) <= radius.to(offsets.device)[None, None, :] * (1 + 1e-9)
        logw = self._planes(log_weights, distance, tissue_dependent)
        # One shift per gene for both kernels keeps their ratio; the normaliser takes out the rest.
        shift = logw.detach().amax(dim=(0, 1))
        weights = torch.where(within, torch.exp(logw - shift), torch.zeros((), dtype=logw.dtype))
        box = (2 * half_i + 1, 2 * half_j + 1)
        # (planes, offsets, G) -> (G, planes, box)
        return LatticeKernel(self, weights.permute(2, 0, 1).reshape(-1, len(logw), *box), fft_shape)

    def mask_spectra(self, fft_shape: tuple[int, int], n_planes: int) -> torch.Tensor:
        """``(n_planes, Fi, Fj // 2 + 1)`` spectra of the tissue and the background masks (one plane: of
        every spot)."""
        key = (fft_shape, n_planes)
        if key not in self._mask_spectra:
            tissue = self.tissue.to(self.dtype)
            masks = (
                torch.stack([tissue, 1.0 - tissue], dim=1)
                if n_planes == 2
                else torch.ones_like(tissue)[:, None]
            )
            grid = self.scatter(masks, fft_shape, 1)[:, 0]
            self._mask_spectra[key] = torch.fft.rfft2(grid)
        return self._mask_spectra[key]


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
