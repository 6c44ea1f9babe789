"""Merging chunk outputs: merged = direct whatever the chunking, pass-through, provenance, errors."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from undiffuse.chunks import split_genes
from undiffuse.errors import InputError
from undiffuse.merge import (
    PARAMETER_COLUMNS,
    PARAMETER_TABLE_COLUMNS,
    merge_chunks,
    merge_sample,
    read_wall_times,
)
from undiffuse.moran import gene_morans_i, scan_quantiles, write_quantile_table

#: Few epochs and a short kernel radius: the merge is under test, not the quality of the correction.
FAST = dict(
    epochs=2, em_iterations=4, tail_iterations=1, cutoff=3.0, image_size=32, device="cpu", progress=False
)
N_SELECTED = 5


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
    from undiffuse.correct import correct

    return correct(prepared, genes=list(quantiles.index), q_init=quantiles["q_init"], config=correction)


@pytest.fixture(scope="module")
def chunked(prepared, quantiles, correction):
    """Chunk AnnDatas for several chunk sizes, as the correct_chunk jobs make them."""
    from undiffuse.correct import correct

    outputs = {}
    for chunk_size in (2, 3):
        outputs[chunk_size] = [
            correct(prepared, genes=genes, q_init=quantiles["q_init"], config=correction).to_anndata(prepared)
            for genes in split_genes(list(quantiles.index), chunk_size)
        ]
    return outputs


@pytest.mark.parametrize("chunk_size", [2, 3])
@pytest.mark.slow
def test_merged_equals_direct_correction_whatever_the_chunk_size(prepared, direct, chunked, chunk_size):
    merged = merge_chunks(prepared, chunked[chunk_size])
    corrected = merged[:, direct.genes].X.toarray()
    scale = np.abs(direct.corrected).max(axis=0)
    np.testing.assert_allclose(corrected, direct.corrected, rtol=0, atol=1e-5 * scale.max())
    np.testing.assert_allclose(
        merged.var.loc[direct.genes, list(PARAMETER_COLUMNS)].to_numpy(),
        direct.params.loc[direct.genes, list(PARAMETER_COLUMNS)].to_numpy(),
        rtol=1e-4,
        atol=1e-6,
    )


@pytest.mark.slow
def test_unselected_genes_pass_through_as_raw_counts(prepared, chunked):
    merged = merge_chunks(prepared, chunked[2])
    passed = ~prepared.var["selected"].to_numpy()
    assert merged.var["passed_through"].to_numpy().tolist() == passed.tolist()
    np.testing.assert_array_equal(merged.X[:, passed].toarray(), prepared.X[:, passed].toarray())
    np.testing.assert_array_equal(merged.layers["counts"].toarray(), prepared.X.toarray())
    np.testing.assert_array_equal(
        merged.layers["corrected"][:, passed].toarray(), prepared.X[:, passed].toarray()
    )
    assert (merged.var.loc[passed, list(PARAMETER_COLUMNS)] == 0).all().all()  # the identity model
    assert merged.var_names.equals(prepared.var_names) and merged.obs_names.equals(prepared.obs_names)


@pytest.mark.slow
def test_merged_annotations(prepared, chunked):
    merged = merge_chunks(prepared, chunked[3])
    assert sp.issparse(merged.X) and merged.X.dtype == np.float32
    np.testing.assert_allclose(merged.var["moran_before"], gene_morans_i(prepared).to_numpy())
    passed = merged.var["passed_through"].to_numpy()
    np.testing.assert_array_equal(merged.var["moran_after"][passed], merged.var["moran_before"][passed])
    assert not np.allclose(merged.var["moran_after"][~passed], merged.var["moran_before"][~passed])
    assert sorted(merged.uns["loss_history"]["chunk"].unique()) == [0, 1]
    assert {"epoch", "total", "moran"} <= set(merged.uns["loss_history"].columns)
    assert {"chunk", "distance", "weight"} <= set(merged.uns["kernel_profile"].columns)
    assert "spatial" in merged.uns and merged.uns["spatial"].keys() == prepared.uns["spatial"].keys()
    assert any(column.startswith("phi_") for column in merged.var.columns)  # every learned column is kept
    assert "wall_time_s" not in merged.uns["correction"]


@pytest.mark.slow
def test_merged_genes_can_be_rediffused_like_a_direct_result(prepared, direct, chunked):
    from undiffuse.correct import rediffuse

    merged = merge_chunks(prepared, chunked[2])[:, direct.genes].copy()
    merged.layers["corrected"] = merged.layers["corrected"].toarray()  # rediffuse reads a dense layer
    from_merged = rediffuse(merged)
    from_direct = rediffuse(direct.to_anndata(prepared))
    np.testing.assert_allclose(from_merged, from_direct, rtol=1e-4, atol=1e-4 * np.abs(from_direct).max())


@pytest.mark.slow
def test_merged_output_works_with_scanpy_and_squidpy(prepared, chunked, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import scanpy as sc
    import squidpy as sq

    merged = merge_chunks(prepared, chunked[3])
    gene = merged.var_names[~merged.var["passed_through"].to_numpy()][0]
    (axes,) = sc.pl.spatial(merged, color=gene, show=False)
    assert axes.get_title() == gene and axes.images  # the spots over the sample's H&E image
    # squidpy's Moran's I of the corrected layer, on its own hexagonal graph, is what merge recorded.
    sq.gr.spatial_neighbors(merged, coord_type="grid", n_neighs=6)
    reference = sq.gr.spatial_autocorr(merged, mode="moran", layer="corrected", n_perms=None, copy=True)["I"]
    finite = reference.dropna()
    assert len(finite) >= merged.n_vars - 1
    np.testing.assert_allclose(merged.var.loc[finite.index, "moran_after"], finite, atol=1e-5)


@pytest.fixture()
def sample_files(tmp_path, prepared, quantiles, chunked):
    paths = {"prepared": tmp_path / "prepared.h5ad", "quantiles": tmp_path / "quantiles.tsv"}
    prepared.write_h5ad(paths["prepared"])
    write_quantile_table(quantiles.reset_index(), paths["quantiles"])
    paths["chunks"] = []
    for index, chunk in enumerate(chunked[3]):
        path = tmp_path / "chunks" / f"chunk_{index}.h5ad"
        path.parent.mkdir(exist_ok=True)
        chunk.write_h5ad(path)
        paths["chunks"].append(path)
    return paths


@pytest.mark.slow
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
    assert np.isfinite(merged.X.data).all()

    table = pd.read_csv(table_path, sep="\t", keep_default_na=False)
    assert list(table.columns) == ["gene", *PARAMETER_TABLE_COLUMNS]
    assert table["gene"].tolist() == merged.var_names.tolist()
    np.testing.assert_allclose(table["q"], merged.var["q"], rtol=1e-6)


@pytest.mark.slow
def test_merge_sample_refuses_incomplete_or_foreign_chunks(sample_files, prepared, tmp_path):
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
    with pytest.raises(InputError, match="not found"):
        merge_sample(args[0], [tmp_path / "nothing.h5ad"], *args[1:])
    assert not out.exists() and not table.exists()


@pytest.mark.slow
def test_merge_refuses_non_finite_values(prepared, chunked, tmp_path):
    from undiffuse.merge import write_outputs

    broken = chunked[3][0].copy()
    broken.layers["corrected"][0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        merge_chunks(prepared, [broken, *chunked[3][1:]])
    merged = merge_chunks(prepared, chunked[3])
    merged.var.loc[merged.var_names[0], "q"] = np.inf
    with pytest.raises(ValueError, match="NaN or Inf"):
        write_outputs(merged, tmp_path / "c.h5ad", tmp_path / "p.tsv")
    assert not (tmp_path / "c.h5ad").exists()


def test_merge_with_no_selected_gene_passes_everything_through(prepared):
    merged = merge_chunks(prepared, [])
    assert merged.var["passed_through"].all()
    np.testing.assert_array_equal(merged.X.toarray(), prepared.X.toarray())


@pytest.mark.slow
def test_cli_merge_and_its_errors(sample_files, tmp_path, capsys):
    from undiffuse.cli import main

    out = tmp_path / "cli" / "corrected.h5ad"
    command = ["merge", str(sample_files["prepared"]), str(sample_files["quantiles"])]
    assert main([*command, *map(str, sample_files["chunks"]), "-o", str(out)]) == 0
    assert out.is_file() and (out.parent / "parameters.tsv").is_file()
    assert main([*command, "-o", str(tmp_path / "x.h5ad")]) == 2
    error = capsys.readouterr().err
    assert "do not cover its genes" in error and str(sample_files["quantiles"]) in error


@pytest.mark.slow
def test_sparse_chunks_merge_like_dense_ones_and_stay_sparse(prepared, chunked):
    """Chunks whose corrected values are stored sparse (as a Visium HD chunk may be) merge to the same
    matrix; off-tissue zeros of corrected genes are not stored, and the raw counts are kept beside."""
    dense = merge_chunks(prepared, chunked[2])
    sparse_chunks = []
    for chunk in chunked[2]:
        copy = chunk.copy()
        copy.layers["corrected"] = sp.csr_matrix(np.asarray(chunk.layers["corrected"]))
        sparse_chunks.append(copy)
    merged = merge_chunks(prepared, sparse_chunks)
    np.testing.assert_array_equal(merged.X.toarray(), dense.X.toarray())
    assert sp.isspmatrix_csr(merged.X) and sp.isspmatrix_csr(merged.layers["corrected"])
    np.testing.assert_array_equal(merged.layers["counts"].toarray(), prepared.X.toarray())
    corrected_genes = ~merged.var["passed_through"].to_numpy()
    background = ~prepared.obs["tissue"].to_numpy(bool)
    assert merged.X[background][:, corrected_genes].nnz == 0
    assert merged.X.nnz < merged.n_obs * merged.n_vars
