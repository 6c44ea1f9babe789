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
    values: np.ndarray,
    *,
    rows: np.ndarray | None = None,
    n_rows: int | None = None,
    dtype: npt.DTypeLike = np.float32,
    block_rows: int = 4096,
) -> sp.csr_matrix:
    """``(M, G)`` dense values as a CSR matrix of ``dtype``, converted a block of rows at a time: SciPy's direct
    conversion first lists every non-zero's row and column as 64-bit integers, gigabytes for a Visium HD
    call.

    ``rows`` (increasing) places the values at those rows of an ``(n_rows, G)`` matrix whose other rows are
    empty (a field kept on tissue spots only); by default they are its rows ``0 .. M - 1``.
    """
    values = np.asarray(values)
    n_values, n_columns = values.shape
    rows = np.arange(n_values) if rows is None else np.asarray(rows, dtype=np.int64)
    n_rows = n_values if n_rows is None else n_rows
    if len(rows) != n_values or (len(rows) and (rows[0] < 0 or rows[-1] >= n_rows)):
        raise ValueError(f"rows must hold {n_values} rows of {n_rows}")
    if (np.diff(rows) <= 0).any():
        raise ValueError("rows must be increasing")
    blocks = [slice(start, start + block_rows) for start in range(0, n_values, block_rows)]
    row_ends = np.zeros(n_rows + 1, dtype=np.int64)
    for block in blocks:
        row_ends[rows[block] + 1] = np.count_nonzero(values[block], axis=1)
    np.cumsum(row_ends, out=row_ends)
    # One allocation of the result, filled block by block; rows between a block's are empty, so its
    # entries are one span.
    index_dtype = np.int32 if max(row_ends[-1], n_columns) < 2**31 else np.int64
    data = np.empty(row_ends[-1], dtype=dtype)
    indices = np.empty(row_ends[-1], dtype=index_dtype)
    for block in blocks:
        part = values[block]
        at, columns = np.nonzero(part)
        placed = rows[block]
        span = slice(row_ends[placed[0]], row_ends[placed[-1] + 1])
        data[span] = part[at, columns]
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
