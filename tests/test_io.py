"""Readers: every accepted input form gives the canonical AnnData; real fixtures; simulator round trip."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import anndata
import h5py
import matplotlib
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from PIL import Image

from undiffuse.io import read_sample
from undiffuse.io.positions import POSITION_COLUMNS

matplotlib.use("Agg")

MOUSE_BRAIN = "visium_mouse_brain_raw_top100"
SECTION1 = Path("visium_fixtures") / "section1" / "outs"
HD_SQUARE = Path("visium_fixtures") / "hd_binned_fixture" / "square_002um"


def assert_canonical(adata: anndata.AnnData) -> None:
    """The contract of docs/architecture.md."""
    assert sp.isspmatrix_csr(adata.X) and adata.X.dtype == np.float32
    assert np.all(adata.X.data >= 0) and np.all(adata.X.data == np.round(adata.X.data))
    assert adata.obs["in_tissue"].dtype == bool
    assert adata.obs["array_row"].dtype == np.int64 and adata.obs["array_col"].dtype == np.int64
    coords = adata.obsm["spatial"]
    assert coords.dtype == np.float64 and coords.shape == (adata.n_obs, 2) and np.all(np.isfinite(coords))
    info = adata.uns["undiffuse"]
    assert set(info) >= {"sample_id", "platform", "spot_pitch_px", "source"}
    assert info["platform"] in {"visium", "visium_hd"} and info["spot_pitch_px"] > 0
    library = adata.uns["spatial"][info["sample_id"]]
    assert set(library) == {"images", "scalefactors", "metadata"}
    assert {"spot_diameter_fullres", "tissue_hires_scalef", "tissue_lowres_scalef"} <= set(
        library["scalefactors"]
    )
    for image in library["images"].values():
        assert image.dtype == np.float32 and image.ndim == 3 and image.shape[2] == 3
        assert 0.0 <= image.min() and image.max() <= 1.0
    assert adata.var_names.is_unique
    assert {"gene_ids", "feature_types"} <= set(adata.var.columns)


def copy_outs(source: Path, tmp_path: Path, name: str = "sample") -> Path:
    """A writable copy of an ``outs/`` folder, under ``tmp_path/name/outs``."""
    target = tmp_path / name / "outs"
    shutil.copytree(source, target)
    for path in target.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return target


@pytest.mark.realdata
def test_mouse_brain_reads_as_documented(shared_data):
    adata = read_sample(shared_data / MOUSE_BRAIN)
    assert_canonical(adata)
    assert adata.shape == (4992, 100)
    assert int(adata.obs["in_tissue"].sum()) == 2702
    info = adata.uns["undiffuse"]
    assert info["sample_id"] == MOUSE_BRAIN and info["platform"] == "visium" and info["matrix"] == "raw"
    # Visium spots are 100 um apart; Space Ranger 1 placed this slide at about 0.73 um per pixel.
    assert info["spot_pitch_px"] == pytest.approx(137.0, rel=0.01)
    library = adata.uns["spatial"][MOUSE_BRAIN]
    assert list(library["images"]) == ["lowres"] and library["images"]["lowres"].shape == (600, 576, 3)
    assert library["metadata"]["library_ids"] == "V1_Adult_Mouse_Brain"
    assert float(adata.X.sum()) == pytest.approx(35.4e6, rel=0.01)
    positions = pd.read_csv(
        shared_data / MOUSE_BRAIN / "outs" / "spatial" / "tissue_positions_list.csv", header=None, index_col=0
    ).loc[adata.obs_names]
    # obsm['spatial'] is (x, y) = (pxl_col, pxl_row).
    np.testing.assert_array_equal(adata.obsm["spatial"], positions[[5, 4]].to_numpy(dtype=np.float64))


@pytest.mark.realdata
@pytest.mark.slow
def test_mouse_brain_plots_with_scanpy(shared_data):
    import matplotlib.pyplot as plt
    import scanpy as sc

    adata = read_sample(shared_data / MOUSE_BRAIN)
    sc.pl.spatial(adata, color="in_tissue", show=False)
    axes = plt.gcf().axes
    assert axes and axes[0].images, "sc.pl.spatial drew no image"
    plt.close("all")


@pytest.mark.realdata
def test_visiumio_section1_h5_and_mtx_agree(shared_data):
    from_h5 = read_sample(shared_data / SECTION1)
    from_mtx = read_sample(shared_data / SECTION1 / "raw_feature_bc_matrix")
    for adata in (from_h5, from_mtx):
        assert_canonical(adata)
        assert adata.n_obs == 50 and int(adata.obs["in_tissue"].sum()) == 22
    assert from_h5.n_vars == 49 and from_mtx.n_vars == 50
    assert from_h5.uns["undiffuse"]["sample_id"] == "section1"
    # The fixture's MTX has one gene more than its h5 (and one renamed), and other counts: the two come
    # from different subsamples, so each is checked against its own file.
    assert pd.Index(from_h5.var["gene_ids"]).isin(from_mtx.var["gene_ids"]).all()
    np.testing.assert_array_equal(from_h5.obs_names, from_mtx.obs_names)
    entries = np.loadtxt(
        shared_data / SECTION1 / "raw_feature_bc_matrix" / "matrix.mtx", skiprows=2, dtype=int
    )
    expected = np.zeros((50, 50), dtype=np.float32)
    np.add.at(expected, (entries[:, 1] - 1, entries[:, 0] - 1), entries[:, 2])
    np.testing.assert_array_equal(from_mtx.X.toarray(), expected)
    assert float(from_h5.X.sum()) == 607.0
    # A scattered subset of the lattice still gets Visium's pitch (from the array indices).
    assert from_h5.uns["undiffuse"]["spot_pitch_px"] == pytest.approx(137.6, rel=0.01)


@pytest.mark.realdata
def test_gzipped_mtx_reads_like_plain(shared_data, tmp_path):
    outs = copy_outs(shared_data / SECTION1, tmp_path)
    (outs / "raw_feature_bc_matrix.h5").unlink()
    mtx = outs / "raw_feature_bc_matrix"
    for path in list(mtx.iterdir()):
        with open(path, "rb") as plain, gzip.open(path.with_name(path.name + ".gz"), "wb") as packed:
            packed.write(plain.read())
        path.unlink()
    gzipped = read_sample(outs)
    plain = read_sample(shared_data / SECTION1 / "raw_feature_bc_matrix")
    assert gzipped.uns["undiffuse"]["matrix"] == "raw"
    np.testing.assert_array_equal(gzipped.X.toarray(), plain.X.toarray())
    np.testing.assert_array_equal(gzipped.var["gene_ids"], plain.var["gene_ids"])


@pytest.mark.realdata
@pytest.mark.parametrize("form", ["csv_with_header", "parquet"])
def test_positions_forms_agree(shared_data, tmp_path, form):
    outs = copy_outs(shared_data / SECTION1, tmp_path)
    spatial = outs / "spatial"
    table = pd.read_csv(
        spatial / "tissue_positions_list.csv", header=None, names=["barcode", *POSITION_COLUMNS]
    )
    (spatial / "tissue_positions_list.csv").unlink()
    if form == "parquet":
        table.to_parquet(spatial / "tissue_positions.parquet", index=False)
    else:
        table.to_csv(spatial / "tissue_positions.csv", index=False)
    adata = read_sample(outs)
    reference = read_sample(shared_data / SECTION1)
    assert_canonical(adata)
    np.testing.assert_array_equal(adata.obsm["spatial"], reference.obsm["spatial"])
    np.testing.assert_array_equal(adata.obs["in_tissue"], reference.obs["in_tissue"])
    np.testing.assert_array_equal(adata.obs["array_col"], reference.obs["array_col"])


@pytest.mark.realdata
@pytest.mark.parametrize("images", [("hires",), ("hires", "lowres"), ()])
def test_image_forms(shared_data, tmp_path, images):
    import matplotlib.pyplot as plt
    import scanpy as sc

    outs = copy_outs(shared_data / SECTION1, tmp_path, name="section1")
    spatial = outs / "spatial"
    scalefactors = json.loads((spatial / "scalefactors_json.json").read_text())
    if "hires" in images:
        # A stand-in hires image: the lowres one, placed by its own scale factor.
        shutil.copy(spatial / "tissue_lowres_image.png", spatial / "tissue_hires_image.png")
        scalefactors["tissue_hires_scalef"] = scalefactors["tissue_lowres_scalef"]
        (spatial / "scalefactors_json.json").write_text(json.dumps(scalefactors))
    if "lowres" not in images:
        (spatial / "tissue_lowres_image.png").unlink()
    adata = read_sample(outs)
    assert_canonical(adata)
    assert sorted(adata.uns["spatial"]["section1"]["images"]) == sorted(images)
    sc.pl.spatial(adata, color="in_tissue", img_key=images[0] if images else None, show=False)
    plt.close("all")


@pytest.mark.realdata
def test_visium_hd_square_bins(shared_data):
    adata = read_sample(shared_data / HD_SQUARE)
    assert_canonical(adata)
    info = adata.uns["undiffuse"]
    assert info["platform"] == "visium_hd" and info["matrix"] == "filtered"
    assert adata.shape == (10, 10) and adata.obs["in_tissue"].all()
    assert info["sample_id"] == "hd_binned_fixture_square_002um"
    scalefactors = adata.uns["spatial"][info["sample_id"]]["scalefactors"]
    # The pitch of 2 um bins, from the lattice, matches bin_size_um / microns_per_pixel.
    assert info["spot_pitch_px"] == pytest.approx(
        scalefactors["bin_size_um"] / scalefactors["microns_per_pixel"], rel=0.01
    )
    assert adata.var_names[0] == "Xkr4" and adata.var["gene_ids"].iloc[0] == "ENSMUSG00000051951"


@pytest.mark.realdata
def test_h5ad_round_trip(shared_data, tmp_path):
    adata = read_sample(shared_data / SECTION1)
    path = tmp_path / "section1.h5ad"
    adata.write_h5ad(path)
    again = read_sample(path)
    assert_canonical(again)
    np.testing.assert_array_equal(again.X.toarray(), adata.X.toarray())
    pd.testing.assert_frame_equal(again.obs, adata.obs)
    np.testing.assert_array_equal(again.obsm["spatial"], adata.obsm["spatial"])
    np.testing.assert_array_equal(
        again.uns["spatial"]["section1"]["images"]["lowres"],
        adata.uns["spatial"]["section1"]["images"]["lowres"],
    )
    assert again.uns["undiffuse"]["spot_pitch_px"] == adata.uns["undiffuse"]["spot_pitch_px"]


@pytest.mark.slow
def test_scanpy_style_h5ad_with_counts_layer(tiny_sample, tmp_path):
    adata = read_sample(tiny_sample / "outs")
    normalised = adata.copy()
    normalised.layers["counts"] = adata.X.copy()
    normalised.X = normalised.X.multiply(1.0 / np.maximum(adata.X.sum(axis=1), 1)).tocsr()
    normalised.obs["cluster"] = "a"
    path = tmp_path / "scanpy.h5ad"
    normalised.write_h5ad(path)
    again = read_sample(path, sample_id=adata.uns["undiffuse"]["sample_id"])
    assert_canonical(again)
    np.testing.assert_array_equal(again.X.toarray(), adata.X.toarray())
    assert list(again.obs.columns) == ["in_tissue", "array_row", "array_col"]


@pytest.mark.slow
def test_simulated_sample_round_trip(tiny_sample):
    """The reader gives back exactly what the simulator wrote: counts, barcodes, genes, tissue labels."""
    outs = tiny_sample / "outs"
    adata = read_sample(tiny_sample)
    assert_canonical(adata)
    truth = anndata.read_h5ad(tiny_sample / "truth.h5ad")
    np.testing.assert_array_equal(adata.obs_names, truth.obs_names)
    np.testing.assert_array_equal(adata.var_names, truth.var_names)
    with h5py.File(outs / "raw_feature_bc_matrix.h5", "r") as handle:
        group = handle["matrix"]
        n_genes, n_spots = group["shape"][:]
        written = sp.csc_matrix(
            (group["data"][:], group["indices"][:], group["indptr"][:]), shape=(n_genes, n_spots)
        ).T.toarray()
        barcodes = [b.decode() for b in group["barcodes"][:]]
    np.testing.assert_array_equal(adata.obs_names, barcodes)
    np.testing.assert_array_equal(adata.X.toarray(), written.astype(np.float32))
    positions = pd.read_csv(outs / "spatial" / "tissue_positions.csv", index_col="barcode").loc[
        adata.obs_names
    ]
    np.testing.assert_array_equal(adata.obs["in_tissue"], positions["in_tissue"].to_numpy() == 1)
    np.testing.assert_array_equal(adata.obs["in_tissue"], truth.obs["domain"].to_numpy() != "background")
    np.testing.assert_array_equal(
        adata.obsm["spatial"], positions[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(np.float64)
    )
    assert sorted(adata.uns["spatial"][adata.uns["undiffuse"]["sample_id"]]["images"]) == ["hires", "lowres"]
    assert adata.uns["undiffuse"]["sample_id"] == tiny_sample.name


@pytest.mark.slow
def test_fullres_image_becomes_hires(tiny_sample, tmp_path):
    adata = read_sample(tiny_sample)
    library = adata.uns["spatial"][adata.uns["undiffuse"]["sample_id"]]
    hires = library["images"]["hires"]
    scale = library["scalefactors"]["tissue_hires_scalef"]
    size = (round(hires.shape[1] / scale), round(hires.shape[0] / scale))
    fullres = tmp_path / "fullres.png"
    Image.fromarray((hires * 255).astype(np.uint8)).resize(size).save(fullres, compress_level=1)
    with_image = read_sample(tiny_sample, image=fullres)
    new_library = with_image.uns["spatial"][with_image.uns["undiffuse"]["sample_id"]]
    new_hires = new_library["images"]["hires"]
    assert max(new_hires.shape[:2]) == 2000
    assert new_library["scalefactors"]["tissue_hires_scalef"] == pytest.approx(new_hires.shape[1] / size[0])
    assert with_image.uns["undiffuse"]["image"] == str(fullres)

    # The same tissue lands under the same spots: compare the images at the spot centres.
    def at_spots(lib: dict) -> np.ndarray:
        px = np.round(adata.obsm["spatial"] * lib["scalefactors"]["tissue_hires_scalef"]).astype(int)
        return lib["images"]["hires"][px[:, 1], px[:, 0]].mean(axis=1)

    assert np.corrcoef(at_spots(library), at_spots(new_library))[0, 1] > 0.95


@pytest.mark.slow
def test_reads_scanpy_read_visium_output(tiny_sample, tmp_path):
    import scanpy as sc

    written = sc.read_visium(tiny_sample / "outs", count_file="raw_feature_bc_matrix.h5")
    path = tmp_path / "read_visium.h5ad"
    written.write_h5ad(path)
    adata = read_sample(path)
    direct = read_sample(tiny_sample / "outs" / "raw_feature_bc_matrix.h5")
    assert_canonical(adata)
    np.testing.assert_array_equal(adata.obs_names, direct.obs_names)
    np.testing.assert_array_equal(adata.X.toarray(), direct.X.toarray())
    np.testing.assert_array_equal(adata.obs["in_tissue"], direct.obs["in_tissue"])
    np.testing.assert_array_equal(adata.obsm["spatial"], direct.obsm["spatial"])
    assert adata.uns["undiffuse"]["spot_pitch_px"] == direct.uns["undiffuse"]["spot_pitch_px"]
