"""The spatial layer's shared accessors: the tissue mask, the first ring, dense matrices."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from anndata import AnnData

from undiffuse.arrays import as_dense, dense_to_csr
from undiffuse.errors import InputError
from undiffuse.spatial import adjacency, tissue_spots


def spots(**columns) -> AnnData:
    adata = AnnData(X=np.ones((3, 1)), obs=pd.DataFrame(columns, index=["a", "b", "c"]))
    adata.uns["undiffuse"] = {"source": "prepared.h5ad"}
    return adata


def test_tissue_spots_prefers_the_prepared_mask_over_space_rangers_calls():
    both = spots(tissue=[True, False, False], in_tissue=[1, 1, 0])
    np.testing.assert_array_equal(tissue_spots(both), [True, False, False])
    np.testing.assert_array_equal(tissue_spots(both, key="in_tissue"), [True, True, False])
    np.testing.assert_array_equal(tissue_spots(spots(in_tissue=[0, 1, 1])), [False, True, True])


@pytest.mark.parametrize(
    ("adata", "key", "message"),
    [
        (spots(other=[1, 1, 1]), None, r"no tissue calls \(obs\['tissue'\] or obs\['in_tissue'\]\)"),
        (spots(tissue=[True, True, True]), "mask", r"no tissue calls \(obs\['mask'\]\)"),
        (spots(tissue=[False, False, False]), None, r"no spot is in tissue \(obs\['tissue'\]"),
    ],
)
def test_tissue_spots_errors_name_the_file(adata, key, message):
    with pytest.raises(InputError, match=message) as caught:
        tissue_spots(adata, key=key)
    assert caught.value.path == "prepared.h5ad"
    with pytest.raises(InputError) as named:
        tissue_spots(adata, key=key, source="other.h5ad")
    assert named.value.path == "other.h5ad"


def test_first_ring_has_six_neighbours_on_the_hexagonal_grid():
    rows, cols = np.divmod(np.arange(49), 7)
    coords = np.column_stack([cols + 0.5 * (rows % 2), rows * np.sqrt(3) / 2])
    degree = np.asarray(adjacency(coords).sum(axis=1)).ravel()
    assert degree.max() == 6 and degree[24] == 6


def test_as_dense_of_sparse_dense_and_views():
    values = np.array([[0.0, 2.0], [3.0, 0.0]])
    for matrix in (values, sp.csr_matrix(values), sp.csc_array(values)):
        dense = as_dense(matrix)
        assert isinstance(dense, np.ndarray) and dense.dtype == np.float64
        np.testing.assert_array_equal(dense, values)
    view = AnnData(X=sp.csr_matrix(values))[:, [1]]
    np.testing.assert_array_equal(as_dense(view.X, dtype=np.float32), [[2.0], [0.0]])
    counts = np.array([[1, 2]], dtype=np.int64)
    assert as_dense(counts, dtype=None) is counts


@pytest.mark.parametrize("block_rows", [7, 999, 1000, 4096])
def test_dense_to_csr_by_blocks_matches_scipy(block_rows):
    rng = np.random.default_rng(0)
    values = (rng.random((1000, 37)) < 0.3) * rng.random((1000, 37))
    values[5] = 0.0
    converted = dense_to_csr(values, block_rows=block_rows)
    converted.check_format(full_check=True)
    assert converted.dtype == np.float32 and converted.has_sorted_indices
    np.testing.assert_array_equal(converted.toarray(), values.astype(np.float32))


@pytest.mark.parametrize("block_rows", [3, 4096])
def test_dense_to_csr_places_rows_among_empty_ones(block_rows):
    rng = np.random.default_rng(1)
    rows = np.sort(rng.choice(50, size=20, replace=False))
    values = (rng.random((20, 6)) < 0.5) * rng.random((20, 6))
    converted = dense_to_csr(values, rows=rows, n_rows=50, block_rows=block_rows)
    converted.check_format(full_check=True)
    expected = np.zeros((50, 6), dtype=np.float32)
    expected[rows] = values
    np.testing.assert_array_equal(converted.toarray(), expected)
    with pytest.raises(ValueError, match="increasing"):
        dense_to_csr(values, rows=rows[::-1], n_rows=50)
    with pytest.raises(ValueError, match="rows must hold"):
        dense_to_csr(values, rows=rows + 40, n_rows=50)
