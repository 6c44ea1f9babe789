"""The spatial layer: which spots are tissue, spot pitch, coordinates in spot pitches, neighbour pairs within a
radius and the first-ring graph.

Every distance the package uses is measured in spot pitches (centre-to-centre distance of adjacent spots:
100 um on Visium, the bin size on Visium HD), so that kernels and cutoffs transfer between platforms.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from anndata import AnnData
from scipy.spatial import cKDTree

from .errors import InputError

SPATIAL_KEY = "spatial"

#: Neighbour radius (spot pitches) of the first ring: 6 neighbours at 1 pitch on the hexagonal Visium grid, 4 on
#: square bins, and none of the next ring (sqrt(2) or sqrt(3) pitches away).
FIRST_RING_RADIUS = 1.2

#: ``obs`` columns of the tissue mask, by preference: the mask ``undiffuse prepare`` makes, then Space
#: Ranger's calls.
TISSUE_KEYS = ("tissue", "in_tissue")


def tissue_spots(adata: AnnData, *, key: str | None = None, source: str | None = None) -> np.ndarray:
    """``(N,)`` boolean tissue mask of the spots: ``obs[key]``, by default the first of :data:`TISSUE_KEYS`.

    Parameters
    ----------
    adata
        Spots x genes.
    key
        ``obs`` column to read instead of the default.
    source
        File named in errors; default ``uns['undiffuse']['source']``.

    Raises
    ------
    InputError
        The column is missing, or it selects no spot.
    """
    if source is None:
        source = adata.uns.get("undiffuse", {}).get("source")
    keys = (key,) if key else TISSUE_KEYS
    found = next((k for k in keys if k in adata.obs), None)
    if found is None:
        wanted = " or ".join(f"obs[{k!r}]" for k in keys)
        raise InputError(source, f"no tissue calls ({wanted}); run `undiffuse prepare` on the sample first")
    mask = adata.obs[found].to_numpy().astype(bool)
    if not mask.any():
        raise InputError(
            source, f"no spot is in tissue (obs[{found!r}] is false everywhere); check the tissue calls"
        )
    return mask


def spot_pitch(coords: np.ndarray) -> float:
    """Centre-to-centre distance of adjacent spots, in the units of ``coords``.

    Parameters
    ----------
    coords
        ``(N, 2)`` spot centres.

    Returns
    -------
    The median nearest-neighbour distance, which is the lattice pitch for Visium (hexagonal) and Visium HD
    (square) grids, whatever the image resolution.
    """
    coords = np.asarray(coords, dtype=np.float64)
    if coords.ndim != 2 or coords.shape[0] < 2:
        raise ValueError("spot_pitch needs at least two spots with 2-D coordinates")
    distances, _ = cKDTree(coords).query(coords, k=2)
    nearest = distances[:, 1]
    pitch = float(np.median(nearest[nearest > 0])) if np.any(nearest > 0) else 0.0
    if not np.isfinite(pitch) or pitch <= 0:
        raise ValueError("spot coordinates are degenerate: all spots share one position")
    return pitch


def pitch_coordinates(adata: AnnData) -> np.ndarray:
    """``(N, 2)`` spot centres in spot pitches, from ``adata.obsm['spatial']``.

    Uses ``adata.uns['undiffuse']['spot_pitch_px']`` when the reader recorded it, otherwise measures it.
    """
    coords = np.asarray(adata.obsm[SPATIAL_KEY], dtype=np.float64)
    pitch = adata.uns.get("undiffuse", {}).get("spot_pitch_px")
    return coords / (float(pitch) if pitch else spot_pitch(coords))


@dataclass(frozen=True)
class NeighbourPairs:
    """Directed pairs ``source -> target`` of spots closer than a radius, self pairs included.

    Attributes
    ----------
    source, target
        ``(E,)`` int64 spot indices.
    distance
        ``(E,)`` float64 distances in spot pitches.
    n_spots
        Number of spots ``N`` the indices refer to.
    """

    source: np.ndarray
    target: np.ndarray
    distance: np.ndarray
    n_spots: int

    @property
    def n_pairs(self) -> int:
        return int(self.source.shape[0])


def neighbour_pairs(
    coords: np.ndarray,
    radius: float,
    *,
    sources: np.ndarray | None = None,
    include_self: bool = True,
) -> NeighbourPairs:
    """All directed pairs of spots within ``radius`` of each other, as sparse edge lists.

    Memory is ``O(N r^2)``: no ``N x N`` matrix is built.

    Parameters
    ----------
    coords
        ``(N, 2)`` spot centres, in the unit of ``radius`` (normally spot pitches).
    radius
        Cutoff distance, inclusive.
    sources
        Optional boolean ``(N,)`` mask: keep only pairs whose source is in it (e.g. tissue spots).
    include_self
        Keep the pairs ``i -> i`` at distance 0.

    Returns
    -------
    NeighbourPairs sorted by source, then target.
    """
    coords = np.asarray(coords, dtype=np.float64)
    n = coords.shape[0]
    tree = cKDTree(coords)
    # A small tolerance keeps lattice points that sit exactly on the cutoff despite rounding.
    dist = tree.sparse_distance_matrix(tree, radius * (1 + 1e-9), output_type="coo_matrix").tocsr()
    if include_self:
        # sparse_distance_matrix drops zero distances; setdiag stores the self pairs as explicit zeros.
        dist.setdiag(0.0)
    coo = dist.tocoo()
    source, target, distance = coo.row.astype(np.int64), coo.col.astype(np.int64), coo.data.astype(np.float64)
    keep = np.ones(source.shape[0], dtype=bool)
    if not include_self:
        keep &= source != target
    if sources is not None:
        keep &= np.asarray(sources, dtype=bool)[source]
    source, target, distance = source[keep], target[keep], distance[keep]
    order = np.lexsort((target, source))
    return NeighbourPairs(source[order], target[order], distance[order], n)


def adjacency(
    coords: np.ndarray, *, radius: float = FIRST_RING_RADIUS, row_normalise: bool = False
) -> sp.csr_matrix:
    """Binary spatial weights between spots within ``radius`` (default: the first ring), no self pairs.

    With coordinates in spot pitches and the default radius this is the 6-neighbour hexagonal ring on Visium
    and the 4-neighbour ring on square bins, as ``squidpy.gr.spatial_neighbors(coord_type='grid')`` gives.
    """
    pairs = neighbour_pairs(coords, radius, include_self=False)
    weights = sp.csr_matrix(
        (np.ones(pairs.n_pairs), (pairs.source, pairs.target)), shape=(pairs.n_spots, pairs.n_spots)
    )
    if row_normalise:
        degree = np.asarray(weights.sum(axis=1)).ravel()
        weights = sp.diags(np.divide(1.0, degree, out=np.zeros_like(degree), where=degree > 0)) @ weights
    return weights.tocsr()


def distance_to_mask(coords: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Distance of every spot to the nearest spot in ``mask`` (0 inside it), in the unit of ``coords``."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        raise ValueError("the mask selects no spot")
    distance, _ = cKDTree(coords[mask]).query(coords, k=1)
    distance[mask] = 0.0
    return distance
