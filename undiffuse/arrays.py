"""Matrix conversions shared by the package.

NumPy and SciPy only, so that the modules that read and score results do not load torch.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp


def as_dense(
    matrix: npt.ArrayLike | sp.spmatrix | sp.sparray, *, dtype: npt.DTypeLike = np.float64
) -> np.ndarray:
    """A dense NumPy array of ``matrix`` (sparse, dense or an AnnData view of either), as ``dtype``.

    A dense input of the right dtype is returned without a copy.
    """
    return np.asarray(matrix.toarray() if sp.issparse(matrix) else matrix, dtype=dtype)


def dense_to_csr(
    values: np.ndarray, *, dtype: npt.DTypeLike = np.float32, block_rows: int = 16_384
) -> sp.csr_matrix:
    """``(N, G)`` dense values as a CSR matrix of ``dtype``, converted a block of rows at a time: SciPy's direct
    conversion first lists every non-zero's row and column as 64-bit integers, gigabytes for a Visium HD
    call."""
    values = np.asarray(values)
    if values.shape[0] <= block_rows:
        return sp.csr_matrix(values, dtype=dtype)
    blocks = [
        sp.csr_matrix(values[i : i + block_rows], dtype=dtype) for i in range(0, values.shape[0], block_rows)
    ]
    return sp.vstack(blocks, format="csr")


def group_indicator(labels: npt.ArrayLike, n_groups: int | None = None) -> sp.csr_matrix:
    """``(B, N)`` 0/1 matrix whose product with ``(N, G)`` values sums them within each group.

    ``labels`` ``(N,)`` gives each row's group in ``0 .. B - 1``; rows labelled -1 belong to none. ``B`` is
    ``n_groups``, by default the largest label plus one.
    """
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if n_groups is None:
        n_groups = int(labels.max()) + 1 if labels.size else 0
    assigned = np.flatnonzero(labels >= 0)
    return sp.csr_matrix(
        (np.ones(assigned.size), (labels[assigned], assigned)), shape=(n_groups, labels.shape[0])
    )
