"""Moran's I (torch, vectorised) against hand-computed values and squidpy; the quantile scan."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from anndata import AnnData

from undiffuse.errors import InputError
from undiffuse.moran import (
    DEFAULT_QUANTILE_GRID,
    SpatialWeights,
    gene_morans_i,
    morans_i,
    morans_i_numpy,
    quantile_grid,
    scan_quantiles,
    spatial_weights,
)
from undiffuse.quantiles import read_quantile_table, write_quantile_table


def path_weights(n: int) -> SpatialWeights:
    """Row-normalised weights of a path graph 0 - 1 - ... - n-1."""
    edges = sp.diags([np.ones(n - 1), np.ones(n - 1)], [-1, 1], shape=(n, n)).tocsr()
    degree = np.asarray(edges.sum(axis=1)).ravel()
    return SpatialWeights.from_scipy(sp.diags(1.0 / degree) @ edges)


def hex_grid(n_rows: int, n_cols: int) -> np.ndarray:
    """Visium-like hexagonal lattice in spot pitches: odd rows shifted by half a pitch."""
    rows, cols = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    x = cols + 0.5 * (rows % 2)
    y = rows * np.sqrt(3) / 2
    return np.column_stack([x.ravel(), y.ravel()])


def grid_adata(values: np.ndarray, coords: np.ndarray, tissue: np.ndarray) -> AnnData:
    adata = AnnData(X=sp.csr_matrix(values.astype(np.float32)))
    adata.var_names = [f"g{k}" for k in range(values.shape[1])]
    adata.obsm["spatial"] = coords * 100.0  # 100 px per pitch
    adata.uns["undiffuse"] = {"spot_pitch_px": 100.0}
    adata.obs["tissue"] = tissue
    return adata


def test_hand_computed_path_graph():
    # z = x - 2.5 = (-1.5, -0.5, 0.5, 1.5): z'z = 5, z'Wz = 0.75 + 0.25 + 0.25 + 0.75 = 2, N = S0 = 4.
    values = torch.tensor([[1.0, 1.0], [2.0, -1.0], [3.0, 1.0], [4.0, -1.0]], dtype=torch.float64)
    scores = morans_i(values, path_weights(4))
    # Second column alternates: z'Wz = -4 and z'z = 4, so I = -1.
    np.testing.assert_allclose(scores.numpy(), [0.4, -1.0], atol=1e-12)


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support:UserWarning")
def test_one_dimensional_input_and_torch_sparse_weights():
    weights = path_weights(4)
    dense = torch.zeros((4, 4), dtype=torch.float64)
    dense[weights.source, weights.target] = weights.weight
    field = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    assert morans_i(field, dense.to_sparse_csr()).item() == pytest.approx(0.4, abs=1e-12)
    assert morans_i(field, weights).ndim == 0


def test_constant_columns_give_zero_and_finite_gradients():
    values = torch.tensor(
        [[3.0, 0.0, 0.1], [3.0, 0.0, 0.1], [3.0, 0.0, 0.1], [3.0, 0.0, 0.1]]
    ).requires_grad_(True)
    scores = morans_i(values, path_weights(4).to(dtype=torch.float32))
    assert torch.equal(scores.detach(), torch.zeros(3))
    scores.sum().backward()
    assert torch.isfinite(values.grad).all()


def test_differentiable_gradcheck():
    generator = torch.Generator().manual_seed(0)
    values = torch.rand((4, 3), dtype=torch.float64, generator=generator).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: morans_i(v, path_weights(4)), (values,))


def test_weights_are_the_row_normalised_first_ring():
    coords = hex_grid(6, 6)
    weights = spatial_weights(coords)
    matrix = sp.csr_matrix(
        (weights.weight.numpy(), (weights.source.numpy(), weights.target.numpy())), shape=(36, 36)
    )
    degree = np.diff(sp.csr_matrix(matrix > 0).indptr)
    assert degree.max() == 6 and degree.min() >= 2  # interior spots see the 6-ring, corners fewer
    np.testing.assert_allclose(np.asarray(matrix.sum(axis=1)).ravel(), 1.0)


@pytest.mark.slow
def test_agrees_with_squidpy_on_a_simulated_sample(tiny_sample):
    squidpy = pytest.importorskip("squidpy")
    from undiffuse.io import read_sample

    adata = read_sample(tiny_sample / "outs")
    ours = gene_morans_i(adata)
    squidpy.gr.spatial_neighbors(adata, coord_type="grid", n_neighs=6)
    reference = squidpy.gr.spatial_autocorr(adata, mode="moran", n_perms=None, copy=True)["I"]
    finite = reference.notna()  # squidpy gives NaN for a gene with no count at all; ours gives 0
    np.testing.assert_allclose(ours[finite.index[finite]], reference[finite], atol=1e-6)
    assert ours.notna().all()


@pytest.mark.realdata
@pytest.mark.slow
def test_agrees_with_squidpy_on_real_mouse_brain(shared_data):
    squidpy = pytest.importorskip("squidpy")
    sample_dir = shared_data / "visium_mouse_brain_raw_top100"
    if not sample_dir.is_dir():
        pytest.skip(f"real data not available: {sample_dir} is absent")
    from undiffuse.io import read_sample

    adata = read_sample(sample_dir / "outs")
    ours = gene_morans_i(adata)
    squidpy.gr.spatial_neighbors(adata, coord_type="grid", n_neighs=6)
    graph = adata.obsp["spatial_connectivities"]
    mine = spatial_weights(adata)
    assert graph.nnz == mine.source.shape[0]  # same first-ring graph: 6 neighbours inside, fewer on edges
    reference = squidpy.gr.spatial_autocorr(adata, mode="moran", n_perms=None, copy=True)["I"]
    assert len(reference) == 100
    np.testing.assert_allclose(ours[reference.index], reference, atol=1e-6)


def test_numpy_wrapper_batches_consistently():
    rng = np.random.default_rng(3)
    coords = hex_grid(8, 9)
    values = sp.csr_matrix(rng.poisson(2.0, size=(72, 11)).astype(np.float32))
    weights = spatial_weights(coords)
    np.testing.assert_allclose(
        morans_i_numpy(values, weights, batch_size=2), morans_i_numpy(values.toarray(), weights), atol=1e-12
    )


def brute_force_scan(adata: AnnData, grid) -> pd.DataFrame:
    """One gene, one cutoff at a time: quantile over tissue spots, Moran's I over all spots."""
    weights = spatial_weights(adata)
    dense = adata.X.toarray().astype(np.float64)
    tissue = adata.obs["tissue"].to_numpy(bool)
    rows = []
    for column, gene in enumerate(adata.var_names):
        x = dense[:, column]
        scores = [morans_i_numpy((x * (x >= np.quantile(x[tissue], q)))[:, None], weights)[0] for q in grid]
        best = int(np.argmax(scores))
        rows.append((gene, grid[best], scores[best], morans_i_numpy(x[:, None], weights)[0]))
    return pd.DataFrame(rows, columns=["gene", "q_init", "moran_at_q_init", "moran_raw"])


def test_scan_picks_the_cutoff_that_removes_scattered_noise():
    rng = np.random.default_rng(0)
    coords = hex_grid(20, 20)
    centre = coords.mean(axis=0)
    disc = np.hypot(*(coords - centre).T) < 5.5  # about a quarter of the spots
    noise = rng.uniform(1.0, 50.0, size=coords.shape[0])
    field = np.where(disc, 100.0, noise)
    adata = grid_adata(field[:, None], coords, np.ones(coords.shape[0], dtype=bool))

    table = scan_quantiles(adata, ["g0"])

    # The best cutoff is the smallest candidate above all the noise: it leaves exactly the disc.
    quantiles = np.quantile(field, DEFAULT_QUANTILE_GRID)
    expected = min(
        q for q, cutoff in zip(DEFAULT_QUANTILE_GRID, quantiles, strict=True) if cutoff > noise.max()
    )
    assert table.loc[0, "q_init"] == pytest.approx(expected)
    clean_disc = morans_i_numpy((100.0 * disc)[:, None], spatial_weights(coords))[0]
    assert table.loc[0, "moran_at_q_init"] == pytest.approx(clean_disc, abs=1e-9)
    assert table.loc[0, "moran_at_q_init"] > table.loc[0, "moran_raw"] + 0.05


def test_scan_takes_quantiles_over_tissue_and_moran_over_all_spots():
    rng = np.random.default_rng(1)
    coords = hex_grid(14, 12)
    tissue = coords[:, 0] < 7
    values = rng.poisson(
        np.where(tissue, 20.0, 2.0)[:, None] * rng.uniform(0.2, 3.0, size=(1, 6)), size=(168, 6)
    )
    adata = grid_adata(values, coords, tissue)
    grid = quantile_grid(start=0.0, stop=0.9, step=0.1)

    table = scan_quantiles(adata, grid=grid, batch_size=4)
    pd.testing.assert_frame_equal(table, brute_force_scan(adata, grid), check_exact=False, atol=1e-9)

    # Background counts do not move the cutoffs: raising them changes Moran's I but not the tissue quantiles.
    louder = adata.copy()
    louder.X = sp.csr_matrix(np.where(tissue[:, None], values, values + 1).astype(np.float32))
    pd.testing.assert_frame_equal(
        scan_quantiles(louder, grid=grid), brute_force_scan(louder, grid), check_exact=False, atol=1e-9
    )


def test_scan_defaults_to_selected_genes_and_validates_the_grid():
    coords = hex_grid(6, 6)
    adata = grid_adata(np.arange(108, dtype=float).reshape(36, 3) % 7, coords, np.ones(36, dtype=bool))
    adata.var["selected"] = [True, False, True]
    assert scan_quantiles(adata)["gene"].tolist() == ["g0", "g2"]
    with pytest.raises(ValueError, match="grid"):
        scan_quantiles(adata, grid=[0.5, 1.5])


def test_quantile_grid():
    assert quantile_grid() == DEFAULT_QUANTILE_GRID
    assert len(DEFAULT_QUANTILE_GRID) == 20 and DEFAULT_QUANTILE_GRID[-1] == 0.95
    assert quantile_grid(start=0.5, stop=0.5, step=0.1) == (0.5,)
    with pytest.raises(ValueError):
        quantile_grid(step=0)


def test_quantile_table_round_trip(tmp_path):
    table = pd.DataFrame(
        {"gene": ["NA", "Actb"], "q_init": [0.1, 0.0], "moran_at_q_init": [0.5, 0.4], "moran_raw": [0.3, 0.4]}
    )
    path = tmp_path / "quantiles.tsv"
    write_quantile_table(table, path)
    back = read_quantile_table(path)
    assert back.index.tolist() == ["NA", "Actb"]  # a gene called NA stays a name
    np.testing.assert_allclose(back["q_init"], [0.1, 0.0])
    with pytest.raises(ValueError, match="NaN"):
        write_quantile_table(table.assign(q_init=[np.nan, 0.0]), tmp_path / "bad.tsv")
    assert not (tmp_path / "bad.tsv").exists()
    (tmp_path / "broken.tsv").write_text("gene\tq\nA\t0.1\n")
    with pytest.raises(InputError, match="missing columns"):
        read_quantile_table(tmp_path / "broken.tsv")


def test_cli_init_quantiles(tmp_path, capsys):
    from undiffuse.cli import main

    coords = hex_grid(8, 8)
    rng = np.random.default_rng(5)
    adata = grid_adata(rng.poisson(5.0, size=(64, 4)), coords, coords[:, 0] < 5)
    adata.var["selected"] = [True, True, False, True]
    prepared, out = tmp_path / "prepared.h5ad", tmp_path / "quantiles.tsv"
    adata.write_h5ad(prepared)
    config = tmp_path / "config.yaml"
    config.write_text("init_quantiles:\n  grid: {start: 0.0, stop: 0.5, step: 0.25}\n")

    assert main(["init-quantiles", str(prepared), str(out), "--config", str(config)]) == 0
    table = read_quantile_table(out)
    assert table.index.tolist() == ["g0", "g1", "g3"]
    assert set(table["q_init"]) <= {0.0, 0.25, 0.5}

    del adata.obs["tissue"]
    adata.write_h5ad(prepared)
    assert main(["init-quantiles", str(prepared), str(tmp_path / "other.tsv")]) == 2
    assert "not a prepared sample" in capsys.readouterr().err
    assert not (tmp_path / "other.tsv").exists()
