r"""The spot lattice: Visium's hexagonal grid and Visium HD's square bins as a 2-D array.

Spots of both platforms sit on a regular lattice: every spot centre is :math:`x_0 + A\,(i, j)^\top` for
integer lattice indices :math:`(i, j)` and a :math:`2 \times 2` basis :math:`A` whose columns are two
shortest non-parallel spot-to-spot steps (in spot pitches: 60 degrees apart on Visium, 90 on Visium HD).
In these indices the slide is a 2-D array, with empty cells where the capture area has no spot (the corners of
the sheared hexagonal grid), and the distance between two spots depends only on their index difference
:math:`|A\,(\Delta i, \Delta j)^\top|`. A radial kernel applied on the spots is therefore a 2-D convolution,
which a batched FFT (:func:`torch.fft.rfft2`) computes at a cost independent of the kernel's width.

The lattice is found from the coordinates alone (:func:`fit_lattice`), so every sample with lattice
coordinates gets it, whatever its rotation or reader; samples whose spots are not on a lattice get ``None``
and the correction uses neighbour pairs instead.

Shapes: ``N`` spots, ``G`` genes, ``I x J`` lattice array, ``Fi x Fj`` FFT grid.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
from scipy.spatial import cKDTree

#: Largest distance (pitches) of a spot from its lattice position for the coordinates to count as a lattice.
LATTICE_TOLERANCE = 0.15
#: Spots used to find the two basis steps.
BASIS_SAMPLE = 2000


@dataclass(frozen=True)
class Lattice:
    """Spots on a 2-D lattice.

    Attributes
    ----------
    index
        ``(N, 2)`` int64 lattice indices :math:`(i, j)` of the spots, from 0.
    shape
        ``(I, J)`` extent of the lattice array holding every spot.
    basis
        ``(2, 2)`` float64; column ``k`` is the displacement (spot pitches) of one step along index ``k``.
    """

    index: np.ndarray
    shape: tuple[int, int]
    basis: np.ndarray

    @property
    def n_spots(self) -> int:
        return int(self.index.shape[0])

    @property
    def line_spacing(self) -> tuple[float, float]:
        """Distance between adjacent lines of constant ``i`` and of constant ``j`` (pitches)."""
        area = abs(float(np.linalg.det(self.basis)))
        return area / float(np.linalg.norm(self.basis[:, 1])), area / float(np.linalg.norm(self.basis[:, 0]))

    @property
    def diameter(self) -> float:
        """Largest distance between two cells of the lattice array (pitches)."""
        i, j = self.shape[0] - 1, self.shape[1] - 1
        corners = self.basis @ np.array([[i, i], [j, -j]], dtype=np.float64)
        return float(np.linalg.norm(corners, axis=0).max())

    def half_widths(self, radius: float) -> tuple[int, int]:
        """Index half-widths ``(pi, pj)`` of the smallest box of offsets holding the disc of ``radius``;
        never wider than the array, since no two spots are farther apart."""
        spacing_i, spacing_j = self.line_spacing
        half_i = min(int(np.ceil(radius / spacing_i - 1e-9)), self.shape[0] - 1)
        half_j = min(int(np.ceil(radius / spacing_j - 1e-9)), self.shape[1] - 1)
        return max(half_i, 0), max(half_j, 0)

    def offset_distance(self, half_i: int, half_j: int) -> np.ndarray:
        """``(2 half_i + 1, 2 half_j + 1)`` distance (pitches) of every index offset in the box."""
        di, dj = np.meshgrid(
            np.arange(-half_i, half_i + 1, dtype=np.float64),
            np.arange(-half_j, half_j + 1, dtype=np.float64),
            indexing="ij",
        )
        steps = np.stack([di.ravel(), dj.ravel()])
        return np.linalg.norm(self.basis @ steps, axis=0).reshape(di.shape)


#: Lattices of the last coordinate arrays fitted: callers such as the simulator diffuse many gene batches on the
#: same spots, and a fit of a whole Visium HD slide at 2 um takes tens of seconds.
_FITTED: dict[tuple, Lattice | None] = {}
_FITTED_KEPT = 2


def fit_lattice(coords: np.ndarray, *, tolerance: float = LATTICE_TOLERANCE) -> Lattice | None:
    """The lattice the spots sit on, or ``None`` when they do not sit on one.

    Parameters
    ----------
    coords
        ``(N, 2)`` spot centres in spot pitches (nearest neighbours about 1 apart).
    tolerance
        Largest allowed distance of a spot from its fitted lattice position, in pitches.

    Returns
    -------
    The lattice with the basis refined by least squares over all spots, or ``None`` when fewer than three spots
    are given, no two non-parallel unit steps exist, a spot is farther than ``tolerance`` from its lattice
    position, or two spots share a cell.
    """
    coords = np.ascontiguousarray(coords, dtype=np.float64)
    key = (coords.shape, hashlib.sha1(coords.view(np.uint8)).hexdigest(), tolerance)
    if key not in _FITTED:
        while len(_FITTED) >= _FITTED_KEPT:
            _FITTED.pop(next(iter(_FITTED)))
        _FITTED[key] = _fit(coords, tolerance)
    return _FITTED[key]


def _fit(coords: np.ndarray, tolerance: float) -> Lattice | None:
    if coords.ndim != 2 or coords.shape[0] < 3 or not np.isfinite(coords).all():
        return None
    basis = _unit_steps(coords)
    if basis is None:
        return None
    origin = coords[0]
    index = np.rint(np.linalg.solve(basis, (coords - origin).T).T).astype(np.int64)
    # Refine basis and origin over all spots; rounding first keeps the fit linear.
    design = np.column_stack([index, np.ones(len(index))])
    solution, *_ = np.linalg.lstsq(design, coords, rcond=None)
    basis, origin = solution[:2].T, solution[2]
    residual = np.linalg.norm(coords - origin - index @ basis.T, axis=1)
    if residual.max() > tolerance:
        return None
    basis, index = _smallest_array(basis, index)
    index -= index.min(axis=0)
    shape = (int(index[:, 0].max()) + 1, int(index[:, 1].max()) + 1)
    flat = index[:, 0] * shape[1] + index[:, 1]
    if np.bincount(flat, minlength=shape[0] * shape[1]).max() > 1:
        return None
    return Lattice(index, shape, basis)


#: Integer changes of basis (determinant +-1) between pairs of shortest steps: on the hexagonal lattice the
#: two steps may be 60 or 120 degrees apart, and the array of a rectangular capture area is then a third larger.
_BASIS_CHANGES = tuple(
    np.array(change)
    for change in (
        [[1, 0], [0, 1]],
        [[1, -1], [0, 1]],
        [[1, 1], [0, 1]],
        [[1, 0], [-1, 1]],
        [[1, 0], [1, 1]],
    )
)


def _smallest_array(basis: np.ndarray, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The basis of shortest steps, and the spots' indices in it, whose lattice array has the fewest cells:
    the FFT grid, and so the cost of every kernel application, scales with it."""
    shortest = np.linalg.norm(basis, axis=0).max()
    best = None
    for change in _BASIS_CHANGES:
        candidate = basis @ change
        if np.linalg.norm(candidate, axis=0).max() > 1.2 * shortest:
            continue
        # coords = basis @ index = (basis @ change) @ (change^-1 @ index); change^-1 is an integer matrix.
        inverse = np.rint(np.linalg.inv(change)).astype(np.int64)
        moved = index @ inverse.T
        cells = int(np.prod(np.ptp(moved, axis=0) + 1))
        if best is None or cells < best[0]:
            best = (cells, candidate, moved)
    return best[1], best[2]


def _unit_steps(coords: np.ndarray) -> np.ndarray | None:
    """``(2, 2)`` two shortest non-parallel spot-to-spot steps (columns), from a sample of spots."""
    local = coords
    if len(coords) > 4 * BASIS_SAMPLE:
        # A square patch of about 4 * BASIS_SAMPLE spots around the median spot: its inner spots have all their
        # neighbours inside it, and no tree over a whole HD slide is needed.
        spacing = np.sqrt(np.prod(np.ptp(coords, axis=0)) / len(coords))
        centre = np.median(coords, axis=0)
        half = spacing * np.sqrt(BASIS_SAMPLE)
        local = coords[(np.abs(coords - centre) <= half).all(axis=1)]
        inner = local[(np.abs(local - centre) <= 0.5 * half).all(axis=1)]
    else:
        inner = local
    rng = np.random.default_rng(0)
    sample = inner if len(inner) <= BASIS_SAMPLE else inner[rng.choice(len(inner), BASIS_SAMPLE, False)]
    if len(local) < 3:
        return None
    distance, neighbour = cKDTree(local).query(sample, k=min(7, len(local)))
    steps = local[neighbour[:, 1:]] - sample[:, None, :]
    lengths = distance[:, 1:]
    unit = np.median(lengths[:, 0])
    keep = np.abs(lengths - unit) < 0.2 * unit
    steps = steps[keep]
    if len(steps) < 2:
        return None
    # Directions modulo 180 degrees; a step and its reverse are one direction.
    angle = np.mod(np.arctan2(steps[:, 1], steps[:, 0]), np.pi)
    steps = np.where((np.arctan2(steps[:, 1], steps[:, 0]) < 0)[:, None], -steps, steps)
    first = _direction_cluster(angle, angle[0])
    rest = ~first
    if not rest.any():
        return None
    second = _direction_cluster(angle, angle[rest][0]) & rest
    a1, a2 = _mean_step(steps[first]), _mean_step(steps[second])
    if abs(np.cross(a1, a2)) < 0.3 * np.linalg.norm(a1) * np.linalg.norm(a2):
        return None
    return np.column_stack([a1, a2])


def _direction_cluster(angle: np.ndarray, centre: float, width: float = np.deg2rad(15)) -> np.ndarray:
    gap = np.abs(np.mod(angle - centre + np.pi / 2, np.pi) - np.pi / 2)
    return gap < width


def _mean_step(steps: np.ndarray) -> np.ndarray:
    # Steps near 0 and 180 degrees are one direction: flip those that point the other way before averaging.
    reference = steps[0]
    signs = np.where(steps @ reference < 0, -1.0, 1.0)
    return (steps * signs[:, None]).mean(axis=0)


def fast_fft_size(n: int) -> int:
    """Smallest integer ``>= n`` whose prime factors are 2, 3, 5 and 7 (fast FFT lengths)."""
    n = max(int(n), 1)
    while True:
        m = n
        for p in (2, 3, 5, 7):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


def kernel_spectrum(kernel: torch.Tensor, fft_shape: tuple[int, int]) -> torch.Tensor:
    """``(..., 2 pi + 1, 2 pj + 1)`` kernels centred on their middle -> ``(..., Fi, Fj // 2 + 1)`` real spectra,
    with the zero offset at the FFT grid's origin and negative offsets wrapped to the end.

    A radial kernel takes the same value at offsets ``d`` and ``-d``, so its spectrum is real; the imaginary
    part, round-off alone, is dropped, which halves the memory of the spectra a Visium HD call keeps."""
    half_i, half_j = (kernel.shape[-2] - 1) // 2, (kernel.shape[-1] - 1) // 2
    padded = torch.nn.functional.pad(
        kernel, (0, fft_shape[1] - kernel.shape[-1], 0, fft_shape[0] - kernel.shape[-2])
    )
    centred = torch.roll(padded, shifts=(-half_i, -half_j), dims=(-2, -1))
    return torch.fft.rfft2(centred, s=fft_shape).real.contiguous()
