"""Merging chunk files: merged = direct whatever the chunking, pass-through, one-way data flow, provenance,
errors."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from undiffuse.chunks import read_chunk, split_genes, write_chunk
from undiffuse.correct import KEY, PARAMETER_COLUMNS, parameter_column, parameter_table
from undiffuse.errors import InputError
from undiffuse.merge import (
    MORAN_AT_Q_INIT,
    MORAN_CORRECTED,
    MORAN_RAW,
    PARAMETER_TABLE_COLUMNS,
    _merged_provenance,
    merge_chunks,
    merge_sample,
    read_wall_times,
)
from undiffuse.moran import gene_morans_i, scan_quantiles
from undiffuse.quantiles import write_quantile_table

#: Every test here corrects a sample first.
pytestmark = pytest.mark.slow

#: Few epochs and a short kernel radius: the merge is under test, not the quality of the correction.
FAST = dict(
    epochs=2, em_iterations=4, tail_iterations=1, cutoff=3.0, image_size=32, device="cpu", progress=False
)
N_SELECTED = 5
LEARNED = [parameter_column(name) for name in PARAMETER_COLUMNS]


@pytest.fixture(scope="module")
def prepared(tiny_sample):
    """The tiny sample as prepare would leave it: a tissue mask and a few selected genes."""
    from undiffuse.io import read_sample

    adata = read_sample(tiny_sample / "outs")
    adata.obs["tissue"] = adata.obs["in_tissue"].to_numpy(bool)
    totals = np.asarray(adata.X.sum(axis=0)).ravel()
    selected = np.zeros(adata.n_vars, dtype=bool)
    selected[np.argsort(-totals)[:N_SELECTED]] = True
    adata.var["selected"] = selected
    return adata


@pytest.fixture(scope="module")
def quantiles(prepared):
    return scan_quantiles(prepared).set_index("gene")


@pytest.fixture(scope="module")
def correction():
    from undiffuse.correct import CorrectionConfig

    return CorrectionConfig(**FAST)


@pytest.fixture(scope="module")
def direct(prepared, quantiles, correction):
    """One correct() call on all selected genes of the prepared sample."""
    from undiffuse.correct import correct

    return correct(
        prepared, genes=list(quantiles.index), q_init=quantiles["q_init"], config=correction, copy=True
    )


@pytest.fixture(scope="module")
def chunk_files(prepared, quantiles, correction, tmp_path_factory):
    """Chunk files for several chunk sizes, as the correct_chunk jobs write them."""
    from undiffuse.correct import correct

    files = {}
    for chunk_size in (2, 3):
        folder = tmp_path_factory.mktemp(f"chunks{chunk_size}")
        files[chunk_size] = []
        for index, genes in enumerate(split_genes(list(quantiles.index), chunk_size)):
            chunk = prepared.copy()
            correct(chunk, genes=genes, q_init=quantiles["q_init"], config=correction)
            path = folder / f"chunk_{index}.h5ad"
            write_chunk(chunk[:, genes], path, index=index, chunk_size=chunk_size)
            files[chunk_size].append(path)
    return files


def merged_from(prepared, quantiles, paths):
    merged = prepared.copy()
    merge_chunks(merged, [read_chunk(path) for path in paths], quantiles=quantiles)
    return merged


def dense(matrix):
    return matrix.toarray() if sp.issparse(matrix) else np.asarray(matrix)


def test_chunk_files_hold_only_corrected_columns_and_parameters(prepared, chunk_files):
    chunk = read_chunk(chunk_files[3][0])
    assert chunk.n_obs == prepared.n_obs and chunk.n_vars <= 3
    assert not chunk.layers and not chunk.obsm and chunk.obs.columns.empty
    assert set(chunk.uns) == {"undiffuse"} and set(chunk.uns["undiffuse"]) == {"correction", "chunk"}
    assert all(column.startswith("undiffuse_") for column in chunk.var.columns)
    # Zero off tissue: at most (genes x spots) values are stored, and the background holds none.
    background = ~prepared.obs["tissue"].to_numpy(bool)
    assert sp.issparse(chunk.X) and chunk.X.nnz <= chunk.n_obs * chunk.n_vars
    assert chunk.X[background].nnz == 0


@pytest.mark.parametrize("chunk_size", [2, 3])
def test_merged_equals_direct_correction_whatever_the_chunk_size(
    prepared, quantiles, direct, chunk_files, chunk_size
):
    merged = merged_from(prepared, quantiles, chunk_files[chunk_size])
    expected = dense(direct.layers["corrected"])
    np.testing.assert_allclose(
        dense(merged.layers["corrected"]), expected, rtol=0, atol=1e-5 * np.abs(expected).max()
    )
    genes = list(quantiles.index)
    np.testing.assert_allclose(
        parameter_table(merged, genes).drop(columns="corrected").to_numpy(),
        parameter_table(direct, genes).drop(columns="corrected").to_numpy(),
        rtol=1e-4,
        atol=1e-6,
    )
    assert merged.var["undiffuse_corrected"].equals(direct.var["undiffuse_corrected"])


def test_unselected_genes_keep_their_raw_counts(prepared, quantiles, chunk_files):
    merged = merged_from(prepared, quantiles, chunk_files[2])
    passed = ~prepared.var["selected"].to_numpy()
    assert merged.var["undiffuse_corrected"].to_numpy().tolist() == (~passed).tolist()
    corrected = dense(merged.layers["corrected"])
    np.testing.assert_array_equal(corrected[:, passed], prepared.X[:, passed].toarray())
    assert not np.allclose(corrected[:, ~passed], prepared.X[:, ~passed].toarray())
    np.testing.assert_array_equal(merged.X.toarray(), prepared.X.toarray())  # X keeps the raw counts
    assert (merged.var.loc[passed, LEARNED] == 0).all().all()  # the identity model
    assert merged.var_names.equals(prepared.var_names) and merged.obs_names.equals(prepared.obs_names)


def test_merged_annotations_read_the_scan_and_compute_moran_after_once(prepared, quantiles, chunk_files):
    merged = merged_from(prepared, quantiles, chunk_files[3])
    assert sp.isspmatrix_csr(merged.layers["corrected"]) and merged.layers["corrected"].dtype == np.float32
    scanned = list(quantiles.index)
    # Raw Moran's I is the scan's for the scanned genes (read, not computed again) and equals a fresh one.
    np.testing.assert_array_equal(merged.var.loc[scanned, MORAN_RAW], quantiles["moran_raw"])
    np.testing.assert_allclose(merged.var[MORAN_RAW], gene_morans_i(prepared).to_numpy(), atol=1e-12)
    np.testing.assert_array_equal(merged.var.loc[scanned, MORAN_AT_Q_INIT], quantiles["moran_at_q_init"])
    after = gene_morans_i(merged, layer="corrected").to_numpy()
    np.testing.assert_allclose(merged.var[MORAN_CORRECTED], after, atol=1e-12)
    changed = merged.var["undiffuse_corrected"].to_numpy()
    assert not np.allclose(merged.var[MORAN_CORRECTED][changed], merged.var[MORAN_RAW][changed])
    provenance = merged.uns["undiffuse"]["correction"]
    assert sorted(provenance["loss_history"]["chunk"].unique()) == [0, 1]
    assert {"epoch", "total", "moran"} <= set(provenance["loss_history"].columns)
    assert {"chunk", "distance", "weight"} <= set(provenance["kernel_profile"].columns)
    assert "spatial" in merged.uns and merged.uns["spatial"].keys() == prepared.uns["spatial"].keys()
    assert merged.varm["undiffuse_phi"].shape[0] == merged.n_vars


def test_merged_genes_can_be_rediffused_like_a_direct_result(prepared, quantiles, direct, chunk_files):
    from undiffuse.correct import rediffuse

    genes = list(quantiles.index)
    from_merged = rediffuse(merged_from(prepared, quantiles, chunk_files[2])[:, genes].copy())
    from_direct = rediffuse(direct[:, genes].copy())
    np.testing.assert_allclose(from_merged, from_direct, rtol=1e-4, atol=1e-4 * np.abs(from_direct).max())


def test_merged_output_works_with_scanpy_and_squidpy(prepared, quantiles, chunk_files, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import scanpy as sc
    import squidpy as sq

    merged = merged_from(prepared, quantiles, chunk_files[3])
    gene = merged.var_names[merged.var["undiffuse_corrected"].to_numpy()][0]
    sc.pl.spatial(merged, color=gene, layer="corrected", show=False, save=False)
    sq.gr.spatial_neighbors(merged, coord_type="grid", n_neighs=6)
    sq.gr.spatial_autocorr(merged, mode="moran", genes=[gene], layer="corrected", n_perms=None)
    np.testing.assert_allclose(
        merged.uns["moranI"].loc[gene, "I"], merged.var.loc[gene, MORAN_CORRECTED], rtol=1e-6
    )


@pytest.fixture()
def sample_files(tmp_path, prepared, quantiles, chunk_files):
    paths = {"prepared": tmp_path / "prepared.h5ad", "quantiles": tmp_path / "quantiles.tsv"}
    prepared.write_h5ad(paths["prepared"])
    write_quantile_table(quantiles.reset_index(), paths["quantiles"])
    paths["chunks"] = chunk_files[3]
    return paths


def test_merge_sample_writes_outputs_with_provenance(sample_files, tmp_path):
    from undiffuse import __version__
    from undiffuse.config import load_config

    config = load_config()
    benchmark = tmp_path / "bench.tsv"
    benchmark.write_text("s\th:m:s\tmax_rss\n2.5\t0:00:02\t100\n")
    wall_times = read_wall_times(
        {"prepare": benchmark, "correct_chunk_0": benchmark, "correct_chunk_1": benchmark}
    )
    out, table_path = tmp_path / "corrected.h5ad", tmp_path / "parameters.tsv"
    merge_sample(
        sample_files["prepared"],
        sample_files["chunks"],
        sample_files["quantiles"],
        out,
        table_path,
        config=config,
        wall_times=wall_times,
    )
    merged = ad.read_h5ad(out)
    provenance = merged.uns["undiffuse"]["provenance"]
    assert provenance["package_version"] == __version__
    assert json.loads(provenance["config"]) == json.loads(json.dumps(config))
    assert provenance["seed"] == config["correct"]["seed"]
    assert provenance["wall_times_s"]["correct_chunk_total"] == pytest.approx(5.0)
    assert merged.uns["undiffuse"]["correction"]["version"] == __version__
    assert set(merged.layers) == {"corrected"}

    table = pd.read_csv(table_path, sep="\t", keep_default_na=False)
    assert list(table.columns) == ["gene", *PARAMETER_TABLE_COLUMNS]
    assert table["gene"].tolist() == merged.var_names.tolist()
    np.testing.assert_allclose(table["q"], merged.var["undiffuse_q"], rtol=1e-6)
    np.testing.assert_allclose(table["moran_after"], merged.var[MORAN_CORRECTED], rtol=1e-6)
    assert table["passed_through"].tolist() == (~merged.var["undiffuse_corrected"]).tolist()


def test_merge_sample_refuses_incomplete_or_foreign_chunks(sample_files, tmp_path):
    out, table = tmp_path / "corrected.h5ad", tmp_path / "parameters.tsv"
    args = (sample_files["prepared"], sample_files["quantiles"], out, table)
    with pytest.raises(InputError, match="do not cover its genes: missing"):
        merge_sample(args[0], sample_files["chunks"][:1], *args[1:])
    foreign = ad.read_h5ad(sample_files["chunks"][0])
    foreign.obs_names = [f"other-{name}" for name in foreign.obs_names]
    foreign_path = tmp_path / "foreign.h5ad"
    foreign.write_h5ad(foreign_path)
    with pytest.raises(InputError, match="prepared spots"):
        merge_sample(args[0], [foreign_path, *sample_files["chunks"][1:]], *args[1:])
    with pytest.raises(InputError, match="chunk not found"):
        merge_sample(args[0], [tmp_path / "nothing.h5ad"], *args[1:])
    not_a_chunk = tmp_path / "prepared_copy.h5ad"
    ad.read_h5ad(sample_files["prepared"]).write_h5ad(not_a_chunk)
    with pytest.raises(InputError, match="not a chunk file"):
        merge_sample(args[0], [not_a_chunk], *args[1:])
    assert not out.exists() and not table.exists()


def test_merge_refuses_non_finite_values(prepared, quantiles, chunk_files, tmp_path):
    from undiffuse.merge import write_outputs

    chunks = [read_chunk(path) for path in chunk_files[3]]
    broken = chunks[0].copy()
    broken.X = broken.X.toarray()
    broken.X[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        merge_chunks(prepared.copy(), [broken, *chunks[1:]], quantiles=quantiles)
    merged = merged_from(prepared, quantiles, chunk_files[3])
    merged.var.loc[merged.var_names[0], "undiffuse_q"] = np.inf
    with pytest.raises(ValueError, match="NaN or Inf"):
        write_outputs(merged, tmp_path / "c.h5ad", tmp_path / "p.tsv")
    assert not (tmp_path / "c.h5ad").exists()


def test_merge_with_no_selected_gene_keeps_every_gene_raw(prepared, quantiles):
    merged = prepared.copy()
    merge_chunks(merged, [], quantiles=quantiles.iloc[:0])
    assert not merged.var["undiffuse_corrected"].any()
    np.testing.assert_array_equal(merged.layers["corrected"].toarray(), prepared.X.toarray())
    np.testing.assert_allclose(merged.var[MORAN_RAW], merged.var[MORAN_CORRECTED])


def test_cli_merge_and_its_errors(sample_files, tmp_path, capsys):
    from undiffuse.cli import main

    out = tmp_path / "cli" / "corrected.h5ad"
    command = ["merge", str(sample_files["prepared"]), str(sample_files["quantiles"])]
    assert main([*command, *map(str, sample_files["chunks"]), "-o", str(out)]) == 0
    assert out.is_file() and (out.parent / "parameters.tsv").is_file()
    assert main([*command, "-o", str(tmp_path / "x.h5ad")]) == 2
    error = capsys.readouterr().err
    assert "do not cover its genes" in error and str(sample_files["quantiles"]) in error


def test_merged_provenance_lists_each_chunks_rank_where_chunks_chose_their_own():
    def chunk(index, rank, deviance, own_field="none"):
        part = ad.AnnData(np.zeros((2, 1), dtype=np.float32))
        history = pd.DataFrame({"epoch": [0], "total": [1.0]})
        profile = pd.DataFrame({"distance": [0.0], "weight": [1.0]})
        config = {
            "programmes": rank,
            "programmes_held_out_deviance": deviance,
            "programmes_own_field_genes": own_field,
            "epochs": 25,
        }
        part.uns[KEY] = {
            "correction": {"config": config, "loss_history": history, "kernel_profile": profile},
            "chunk": {"index": index},
        }
        return part

    same = _merged_provenance([chunk(0, 8, "4: 2, 8: 1"), chunk(1, 8, "4: 2, 8: 1")])
    assert same["config"]["programmes"] == 8 and same["config"]["epochs"] == 25
    differ = _merged_provenance([chunk(0, 8, "4: 2, 8: 1"), chunk(1, 4, "4: 1, 8: 2")])
    assert differ["config"]["programmes"] == "chunk 0: 8; chunk 1: 4"
    assert differ["config"]["programmes_held_out_deviance"] == "chunk 0: 4: 2, 8: 1; chunk 1: 4: 1, 8: 2"
    assert len(differ["loss_history"]) == 2
    # The genes that kept their own fields are listed from every chunk, as one list.
    assert differ["config"]["programmes_own_field_genes"] == "none"
    listed = _merged_provenance([chunk(0, 8, "", "a, b"), chunk(1, 8, "", "none"), chunk(2, 8, "", "c")])
    assert listed["config"]["programmes_own_field_genes"] == "a, b, c"
