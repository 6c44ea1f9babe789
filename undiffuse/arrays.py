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
    values: np.ndarray, *, dtype: npt.DTypeLike = np.float32, block_rows: int = 4096
) -> sp.csr_matrix:
    """``(N, G)`` dense values as a CSR matrix of ``dtype``, converted a block of rows at a time: SciPy's direct
    conversion first lists every non-zero's row and column as 64-bit integers, gigabytes for a Visium HD
    call."""
    values = np.asarray(values)
    n_rows, n_columns = values.shape
    row_ends = np.zeros(n_rows + 1, dtype=np.int64)
    for start in range(0, n_rows, block_rows):
        row_ends[start + 1 : start + block_rows + 1] = np.count_nonzero(
            values[start : start + block_rows], axis=1
        )
    np.cumsum(row_ends, out=row_ends)
    # One allocation of the result, filled block by block.
    index_dtype = np.int32 if max(row_ends[-1], n_columns) < 2**31 else np.int64
    data = np.empty(row_ends[-1], dtype=dtype)
    indices = np.empty(row_ends[-1], dtype=index_dtype)
    for start in range(0, n_rows, block_rows):
        block = values[start : start + block_rows]
        rows, columns = np.nonzero(block)
        span = slice(row_ends[start], row_ends[min(start + block_rows, n_rows)])
        data[span] = block[rows, columns]
        indices[span] = columns
    return sp.csr_matrix((data, indices, row_ends.astype(index_dtype)), shape=(n_rows, n_columns))


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
