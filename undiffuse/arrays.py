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
