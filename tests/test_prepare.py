"""The prepare step end to end: outputs, their contents, the CLI, and the real mouse brain."""

from __future__ import annotations

import json

import anndata
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import stats

from undiffuse.cli import main
from undiffuse.io import read_sample
from undiffuse.prepare import prepare_sample

QC_FILES = {
    "qc.json",
    "qc.tsv",
    "background_decay.tsv",
    "tissue_mask.png",
    "total_counts.png",
    "background_decay.png",
}


def assert_outputs(outdir, adata) -> dict:
    assert (outdir / "prepared.h5ad").is_file()
    assert {path.name for path in (outdir / "qc").iterdir()} == QC_FILES
    for name in QC_FILES:
        if name.endswith(".png"):
            with Image.open(outdir / "qc" / name) as image:
                assert image.size[0] > 300 and image.size[1] > 300
    qc = json.loads((outdir / "qc" / "qc.json").read_text())
    table = pd.read_csv(outdir / "qc" / "qc.tsv", sep="\t", keep_default_na=False)
    assert table.shape[0] == 1 and list(table.columns) == list(qc)
    assert table["arc_score"].iloc[0] == pytest.approx(qc["arc_score"])
    for key, value in qc.items():
        assert value is not None, key
        if isinstance(value, float):
            assert np.isfinite(value), key
    written = anndata.read_h5ad(outdir / "prepared.h5ad")
    info = written.uns["undiffuse"]
    assert (
        info["diffusion_cutoff"] == qc["diffusion_cutoff"]
        and info["diffusion_scale"] == qc["diffusion_scale"]
    )
    assert dict(info["qc"]).keys() == qc.keys()
    for frame in (written.obs, written.var):
        numeric = frame.select_dtypes("number")
        assert np.all(np.isfinite(numeric.to_numpy(dtype=np.float64)))
    assert {"tissue", "distance_to_tissue", "total_counts", "n_genes_by_counts"} <= set(written.obs.columns)
    assert {"selected", "total_counts"} <= set(written.var.columns)
    assert written.obs["tissue"].dtype == bool and written.var["selected"].dtype == bool
    np.testing.assert_array_equal(written.X.toarray(), adata.X.toarray())
    return qc


@pytest.mark.slow
def test_prepare_simulated_sample(tiny_sample, tmp_path):
    outdir = tmp_path / "results" / "tiny"
    adata = prepare_sample(tiny_sample / "outs", outdir, min_counts=1, n_top_genes=10, sample_id="tiny")
    raw = read_sample(tiny_sample / "outs")
    # Genes not selected pass through unchanged: the prepared counts are the raw counts.
    np.testing.assert_array_equal(adata.X.toarray(), raw.X.toarray())
    qc = assert_outputs(outdir, adata)
    assert qc["sample_id"] == "tiny" and "tiny" in adata.uns["spatial"]
    assert qc["n_genes_selected"] == 10 and int(adata.var["selected"].sum()) == 10
    assert qc["n_tissue_spots"] + qc["n_background_spots"] == adata.n_obs
    tissue = adata.obs["tissue"].to_numpy()
    np.testing.assert_array_equal(tissue, raw.obs["in_tissue"].to_numpy())
    assert np.all(adata.obs["distance_to_tissue"].to_numpy()[tissue] == 0)
    assert np.all(adata.obs["distance_to_tissue"].to_numpy()[~tissue] >= 1 - 1e-6)
    assert qc["mask_jaccard"] > 0.9 and qc["tissue_source"] == "in_tissue"


@pytest.mark.slow
def test_simulated_diffusion_scale_is_recovered(tiny_sample, tmp_path):
    """The Gaussian-equivalent scale from the background decay matches the simulator's kernel."""
    adata = prepare_sample(tiny_sample, tmp_path / "out", min_counts=1)
    truth = anndata.read_h5ad(tiny_sample / "truth.h5ad")
    assert truth.uns["simulation"]["kernel"] == "gaussian"
    true_scale = float(np.median(truth.var["kernel_scale"]))
    info = adata.uns["undiffuse"]
    assert info["qc"]["decay_fitted"]
    assert info["diffusion_scale"] == pytest.approx(true_scale, rel=0.25)
    assert info["diffusion_cutoff"] >= 2 * info["diffusion_scale"]


@pytest.mark.slow
def test_cli_prepare(tiny_sample, tmp_path, capsys):
    genes = tmp_path / "genes.txt"
    names = read_sample(tiny_sample).var_names[:3].tolist()
    genes.write_text("\n".join(names) + "\n")
    outdir = tmp_path / "out"
    status = main(["prepare", str(tiny_sample), str(outdir), "--genes", str(genes), "--refine-mask"])
    assert status == 0
    assert "ARC score" in capsys.readouterr().out
    written = anndata.read_h5ad(outdir / "prepared.h5ad")
    assert written.var_names[written.var["selected"].to_numpy()].tolist() == names
    qc = json.loads((outdir / "qc" / "qc.json").read_text())
    assert qc["tissue_source"] == "image" and qc["refine_mask"] is True and qc["gene_list"] == str(genes)


@pytest.mark.slow
def test_rerun_replaces_outputs(tiny_sample, tmp_path):
    outdir = tmp_path / "out"
    prepare_sample(tiny_sample, outdir, min_counts=1, n_top_genes=5)
    (outdir / "qc" / "stale.txt").write_text("old")
    prepare_sample(tiny_sample, outdir, min_counts=1, n_top_genes=8)
    assert {path.name for path in (outdir / "qc").iterdir()} == QC_FILES
    assert json.loads((outdir / "qc" / "qc.json").read_text())["n_genes_selected"] == 8
    assert not [path for path in outdir.iterdir() if path.name.startswith(".")]


@pytest.mark.realdata
@pytest.mark.slow
def test_mouse_brain_qc(shared_data, tmp_path):
    source = shared_data / "visium_mouse_brain_raw_top100"
    outdir = tmp_path / "mouse_brain"
    adata = prepare_sample(source, outdir, n_top_genes=50)
    qc = assert_outputs(outdir, adata)
    assert qc["n_spots"] == 4992 and qc["n_tissue_spots"] == 2702 and qc["n_background_spots"] == 2290
    # The ARC score, recomputed from the counts: background UMIs per spot over mean UMIs of a tissue spot.
    totals = np.asarray(adata.X.sum(axis=1)).ravel().astype(np.float64)
    tissue = adata.obs["in_tissue"].to_numpy()
    expected = totals[~tissue].sum() / totals.size / totals[tissue].mean()
    assert qc["arc_score"] == pytest.approx(expected) and 0.03 < qc["arc_score"] < 0.1
    assert qc["background_umi_fraction"] == pytest.approx(0.087, abs=0.002)
    # The background decay falls with distance from the tissue.
    decay = pd.read_csv(outdir / "qc" / "background_decay.tsv", sep="\t")
    reliable = decay[decay["n_spots"] >= 20]
    rho = stats.spearmanr(reliable["distance"], reliable["median_umis"]).statistic
    assert rho < -0.9
    near, far = decay["median_umis"].iloc[0], decay.loc[decay["distance"] > 6, "median_umis"].median()
    assert near > 3 * far  # README: about 2,100 within 1.5 pitches, about 600 beyond 6
    assert qc["decay_fitted"] and 3 <= qc["diffusion_cutoff"] <= 15 and 0.25 <= qc["diffusion_scale"]
    assert qc["mask_jaccard"] > 0.95
    assert int(adata.var["selected"].sum()) == 50
