"""SpatialData in and out: spatialdata-io reads what undiffuse's own readers read, and corrected.zarr holds
corrected.h5ad, the images and the super-resolved maps where spatialdata and spatialdata-plot find them."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import yaml
from packaging.requirements import Requirement
from scipy.stats import spearmanr

from undiffuse.errors import InputError
from undiffuse.io import read_sample
from undiffuse.io.spatialdata import (
    HD_FEATURE_SLICE,
    INSTANCE_KEY,
    REGION_KEY,
    TABLE,
    read_spatialdata_io,
    write_spatialdata,
)

spatialdata = pytest.importorskip("spatialdata", reason="the spatialdata extra is not installed")
pytest.importorskip("spatialdata_io", reason="the spatialdata extra is not installed")

REAL = "visium_mouse_brain_raw_top100"
#: Small enough for seconds, with a background rim (as in test_hd.py).


def dense(matrix) -> np.ndarray:
    return matrix.toarray() if sp.issparse(matrix) else np.asarray(matrix)


def library(adata: ad.AnnData) -> dict:
    return adata.uns["spatial"][adata.uns["undiffuse"]["sample_id"]]


def assert_same_sample(ours: ad.AnnData, theirs: ad.AnnData, *, coordinate_rtol: float = 0.0) -> None:
    """Counts, barcodes, genes, tissue flags, array indices, coordinates, images and scale factors agree."""
    assert theirs.uns["undiffuse"]["reader"] == "spatialdata-io"
    assert ours.obs_names.equals(theirs.obs_names)
    assert ours.var_names.equals(theirs.var_names)
    assert ours.var["gene_ids"].equals(theirs.var["gene_ids"])
    assert theirs.X.dtype == ours.X.dtype == np.float32
    assert (ours.X != theirs.X).nnz == 0
    for column in ("in_tissue", "array_row", "array_col"):
        np.testing.assert_array_equal(
            ours.obs[column].to_numpy(), theirs.obs[column].to_numpy(), err_msg=column
        )
    np.testing.assert_allclose(theirs.obsm["spatial"], ours.obsm["spatial"], rtol=coordinate_rtol, atol=0)
    assert library(ours)["scalefactors"] == library(theirs)["scalefactors"]
    assert library(ours)["images"].keys() == library(theirs)["images"].keys()
    for key, image in library(ours)["images"].items():
        np.testing.assert_array_equal(library(theirs)["images"][key], image, err_msg=key)
    assert ours.uns["undiffuse"]["platform"] == theirs.uns["undiffuse"]["platform"]
    assert ours.uns["undiffuse"]["spot_pitch_px"] == pytest.approx(theirs.uns["undiffuse"]["spot_pitch_px"])


# --------------------------------------------------------------------------------------------------- reading


@pytest.mark.realdata
def test_spatialdata_io_reads_the_real_sample_as_undiffuse_does(shared_data):
    outs = shared_data / REAL / "outs"
    ours, theirs = read_sample(outs), read_spatialdata_io(outs)
    assert_same_sample(ours, theirs)
    # The figures of ../shared/data/README: 4,992 spots of 100 genes, 2,702 in tissue, 35.4 M UMIs.
    assert theirs.shape == (4992, 100)
    assert int(theirs.obs["in_tissue"].sum()) == 2702
    assert theirs.X.sum() == pytest.approx(35.4e6, rel=0.002)
    assert set(library(theirs)["images"]) == {"lowres"}


@pytest.fixture(scope="module")
def hd_outs(hd_sample):
    """``outs/`` of the small simulated Visium HD sample (with the ``feature_slice.h5`` spatialdata-io reads)."""
    return hd_sample / "outs"


@pytest.mark.slow
@pytest.mark.parametrize("bin_um", [8, 16])
def test_spatialdata_io_reads_simulated_visium_hd_as_undiffuse_does(hd_outs, bin_um):
    square = hd_outs / "binned_outputs" / f"square_{bin_um:03d}um"
    ours, theirs = read_sample(square), read_spatialdata_io(square)
    # undiffuse's positions reader parses numbers from text, which can land one float64 ulp away.
    assert_same_sample(ours, theirs, coordinate_rtol=1e-12)
    assert theirs.uns["undiffuse"]["platform"] == "visium_hd"
    assert theirs.obs_names.str.startswith(f"s_{bin_um:03d}um_").all()
    assert 0 < theirs.obs["in_tissue"].mean() < 1


@pytest.mark.realdata
def test_spatialdata_io_needs_the_feature_slice_of_hd_outs(tmp_path, shared_data):
    square = tmp_path / "outs" / "binned_outputs" / "square_002um"
    shutil.copytree(shared_data / "visium_fixtures" / "hd_binned_fixture" / "square_002um", square)
    with pytest.raises(InputError) as raised:
        read_spatialdata_io(square)
    message = str(raised.value)
    assert message.startswith(f"{tmp_path / 'outs' / HD_FEATURE_SLICE}: file does not exist")
    assert "\n" not in message


@pytest.mark.realdata
def test_bad_inputs_are_one_line_errors_naming_the_path(tmp_path, shared_data):
    empty = tmp_path / "not_outs"
    empty.mkdir()
    mtx_outs = shared_data / "visium_fixtures" / "section1" / "outs"
    cases = {
        tmp_path / "missing": "does not exist",
        empty: "holds no feature-barcode matrix",
        mtx_outs / "raw_feature_bc_matrix": "is a Matrix Market folder, which spatialdata-io",
    }
    for path, problem in cases.items():
        with pytest.raises(InputError) as raised:
            read_spatialdata_io(path)
        assert str(raised.value).startswith(f"{path}: {problem}"), str(raised.value)
        assert "\n" not in str(raised.value)


# --------------------------------------------------------------------------------------------------- writing


@pytest.fixture(scope="module")
def corrected_file(tmp_path_factory, shared_data):
    """A corrected.h5ad of the real sample in merge's layout: X the raw counts, the corrected values in layer
    corrected. The values are the raw counts scaled per gene, which is all the writer needs: it must copy them."""
    adata = read_sample(shared_data / REAL / "outs")
    scale = np.linspace(0.5, 1.0, adata.n_vars, dtype=np.float32)
    adata.layers["corrected"] = sp.csr_matrix(adata.X.multiply(scale[None, :]), dtype=np.float32)
    adata.obs["tissue"] = adata.obs["in_tissue"].to_numpy(bool)
    path = tmp_path_factory.mktemp("corrected") / "corrected.h5ad"
    adata.write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def superres_2x(corrected_file, tmp_path_factory):
    """superres_2x.h5ad of three genes, as rule superres writes it (few epochs: the layout is under test)."""
    from undiffuse.superres import superresolve, write_result

    corrected = ad.read_h5ad(corrected_file)
    result = superresolve(corrected, factor=2, genes=list(corrected.var_names[:3]), epochs=2, threads=1)
    return write_result(result, corrected, tmp_path_factory.mktemp("superres") / "superres_2x.h5ad")


@pytest.fixture(scope="module")
def store(corrected_file, superres_2x, tmp_path_factory):
    path = tmp_path_factory.mktemp("store") / "corrected.zarr"
    write_spatialdata(ad.read_h5ad(corrected_file), path, superres={2: ad.read_h5ad(superres_2x)})
    return path


@pytest.mark.slow
@pytest.mark.realdata
def test_store_table_equals_corrected_h5ad(store, corrected_file):
    sdata = spatialdata.read_zarr(store)
    table, corrected = sdata.tables[TABLE], ad.read_h5ad(corrected_file)
    assert table.obs_names.equals(corrected.obs_names)
    assert table.var_names.equals(corrected.var_names)
    np.testing.assert_array_equal(dense(table.X), dense(corrected.X))
    assert set(table.layers) == set(corrected.layers)
    for name in corrected.layers:
        np.testing.assert_array_equal(dense(table.layers[name]), dense(corrected.layers[name]), err_msg=name)
    np.testing.assert_array_equal(dense(table.X), dense(read_sample(corrected.uns["undiffuse"]["source"]).X))
    np.testing.assert_array_equal(table.obsm["spatial"], corrected.obsm["spatial"])
    for column in corrected.obs.columns:
        np.testing.assert_array_equal(table.obs[column].to_numpy(), corrected.obs[column].to_numpy())
    assert library(table)["scalefactors"] == library(corrected)["scalefactors"]
    assert "images" not in library(table), "the images are image elements, not copies inside the table"


@pytest.mark.slow
@pytest.mark.realdata
def test_store_places_spots_images_and_superres_maps_in_full_resolution_pixels(
    store, corrected_file, superres_2x
):
    from spatialdata.transformations import get_transformation

    sdata = spatialdata.read_zarr(store)
    corrected = ad.read_h5ad(corrected_file)
    sample_id = corrected.uns["undiffuse"]["sample_id"]
    scalefactors = library(corrected)["scalefactors"]

    # The table annotates the spots, one circle per row, at obsm['spatial'].
    spots = sdata.shapes[sample_id]
    table = sdata.tables[TABLE]
    assert table.uns["spatialdata_attrs"] == {
        "region": sample_id,
        "region_key": REGION_KEY,
        "instance_key": INSTANCE_KEY,
    }
    assert list(table.obs[INSTANCE_KEY]) == list(spots.index)
    np.testing.assert_allclose(
        np.column_stack([spots.geometry.x, spots.geometry.y]), corrected.obsm["spatial"]
    )
    np.testing.assert_allclose(spots["radius"], scalefactors["spot_diameter_fullres"] / 2)

    # The lowres image is the PNG, scaled back to full resolution by its scale factor.
    lowres = sdata.images[f"{sample_id}_lowres_image"]
    pixels = np.asarray(lowres.transpose("y", "x", "c").data) / 255.0
    np.testing.assert_allclose(pixels, library(corrected)["images"]["lowres"], atol=0.5 / 255)
    to_fullres = get_transformation(lowres, to_coordinate_system=sample_id).to_affine_matrix(
        ("x", "y"), ("x", "y")
    )
    np.testing.assert_allclose(np.diag(to_fullres)[:2], 1 / scalefactors["tissue_lowres_scalef"])

    # Each super-resolved gene is a channel; pixel (row, col) of the grid lands on its centre.
    maps = ad.read_h5ad(superres_2x)
    image = sdata.images[f"{sample_id}_superres_2x"]
    assert list(image.coords["c"].values) == list(maps.var_names)
    grid = np.asarray(image.data)
    rows, cols = maps.obs["array_row"].to_numpy(), maps.obs["array_col"].to_numpy()
    np.testing.assert_array_equal(grid[:, rows, cols].T, dense(maps.X))
    outside = np.ones(grid.shape[1:], dtype=bool)
    outside[rows, cols] = False
    assert not grid[:, outside].any(), "pixels outside tissue are zero"
    affine = get_transformation(image, to_coordinate_system=sample_id).to_affine_matrix(
        ("x", "y"), ("x", "y")
    )
    centres = np.column_stack([cols + 0.5, rows + 0.5, np.ones(len(rows))]) @ affine.T
    np.testing.assert_allclose(centres[:, :2], maps.obsm["spatial"])


@pytest.mark.slow
@pytest.mark.realdata
def test_spatialdata_plot_draws_the_store_as_it_is(store, corrected_file):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import spatialdata_plot  # noqa: F401  (registers the .pl accessor)

    sdata = spatialdata.read_zarr(store)
    sample_id = ad.read_h5ad(corrected_file).uns["undiffuse"]["sample_id"]
    table = sdata.tables[TABLE]
    gene = table.var_names[0]
    fig, ax = plt.subplots()
    sdata.pl.render_shapes(sample_id, color=gene).pl.show(coordinate_systems=sample_id, ax=ax)
    (patches,) = ax.collections
    assert len(patches.get_paths()) == table.n_obs
    # viridis's green channel rises with the value: the spots are coloured by their raw counts, in order.
    green = patches.get_facecolor()[:, 1]
    counts = dense(table[:, gene].X).ravel()
    assert spearmanr(green, counts).statistic > 0.99
    plt.close(fig)


@pytest.mark.realdata
def test_writer_refuses_a_table_without_the_corrected_layer(tmp_path, shared_data):
    adata = read_sample(shared_data / REAL / "outs")
    source = tmp_path / "corrected.h5ad"
    with pytest.raises(InputError) as raised:
        write_spatialdata(adata, tmp_path / "corrected.zarr", source=source)
    assert str(raised.value).startswith(f"{source}: has no layer 'corrected' with the corrected values")
    assert not (tmp_path / "corrected.zarr").exists()


# -------------------------------------------------------------------------------------------- workflow, envs

REPO = Path(__file__).resolve().parents[1]
#: Turns rule spatialdata on, with rule superres at one factor (few epochs).
SWITCHED_ON = "spatialdata:\n  enabled: true\nsuperres:\n  enabled: true\n  factors: [2]\n  epochs: 2\n"


def snakemake(workdir: Path, *args: str, extra_config: str | None = None) -> subprocess.CompletedProcess:
    """snakemake on the repository's Snakefile and its tiny test config, in ``workdir``."""
    configs = [str(REPO / "config" / "test" / "config.yaml")]
    if extra_config is not None:
        configs.append(str(workdir / "switch.yaml"))
        (workdir / "switch.yaml").write_text(extra_config)
    command = [sys.executable, "-m", "snakemake", *args, "--snakefile", str(REPO / "Snakefile")]
    command += ["--directory", str(workdir), "--cores", "1", "--configfile", *configs]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def planned(output: str) -> dict[str, int]:
    table = output.split("Job stats:", 1)[1] if "Job stats:" in output else ""
    return {rule: int(count) for rule, count in re.findall(r"^(\w+)\s+(\d+)\s*$", table, flags=re.M)}


@pytest.mark.workflow
def test_switch_adds_one_spatialdata_job_per_sample(tmp_path):
    off = snakemake(tmp_path, "-n")
    on = snakemake(tmp_path, "-n", extra_config=SWITCHED_ON)
    assert off.returncode == 0 and on.returncode == 0, off.stderr[-2000:] + on.stderr[-2000:]
    samples = planned(on.stdout)["prepare"]
    assert "spatialdata" not in planned(off.stdout)
    assert planned(on.stdout)["spatialdata"] == samples == 3


@pytest.mark.workflow
@pytest.mark.realdata
def test_rule_writes_a_store_whose_table_equals_corrected_h5ad(tmp_path, corrected_file, superres_2x):
    folder = tmp_path / "results" / "alpha"
    (folder / "superres").mkdir(parents=True)
    shutil.copy(corrected_file, folder / "corrected.h5ad")
    shutil.copy(superres_2x, folder / "superres" / "superres_2x.h5ad")
    # Only rule spatialdata runs: the inputs stand in for merge's and superres's outputs.
    result = snakemake(
        tmp_path, "results/alpha/corrected.zarr", "--allowed-rules", "spatialdata", extra_config=SWITCHED_ON
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sdata = spatialdata.read_zarr(folder / "corrected.zarr")
    corrected = ad.read_h5ad(folder / "corrected.h5ad")
    table = sdata.tables[TABLE]
    assert table.obs_names.equals(corrected.obs_names) and table.var_names.equals(corrected.var_names)
    np.testing.assert_array_equal(dense(table.X), dense(corrected.X))
    np.testing.assert_array_equal(dense(table.layers["corrected"]), dense(corrected.layers["corrected"]))
    np.testing.assert_array_equal(table.obsm["spatial"], corrected.obsm["spatial"])
    sample_id = corrected.uns["undiffuse"]["sample_id"]
    assert f"{sample_id}_superres_2x" in sdata.images and f"{sample_id}_lowres_image" in sdata.images


def test_spatialdata_extra_is_pinned_alike_in_pyproject_the_envs_and_this_environment():
    from importlib.metadata import version

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    pins = {}
    for line in extras["spatialdata"]:
        requirement = Requirement(line)
        (specifier,) = requirement.specifier
        assert specifier.operator == "==", f"pyproject.toml: {line} is not pinned exactly"
        pins[requirement.name] = specifier.version
    assert set(pins) == {"spatialdata", "spatialdata-io"}
    pulled, pending = set(), ["dev"]
    while pending:  # the extras that `.[dev]` installs, through undiffuse[...] self-references
        for line in extras[pending.pop()]:
            requirement = Requirement(line)
            if requirement.name == "undiffuse":
                pending += sorted(requirement.extras - pulled)
                pulled |= requirement.extras
    assert "spatialdata" in pulled, "make test and CI install .[dev]: it must pull the extra"
    for name, pinned in pins.items():
        assert version(name) == pinned, f"{name} {version(name)} installed, pyproject.toml pins {pinned}"
    env = yaml.safe_load((REPO / "envs" / "merge.yaml").read_text())  # rule spatialdata's env
    listed = dict(line.split("==") for line in env["dependencies"] if isinstance(line, str) and "==" in line)
    assert {name: listed.get(name) for name in pins} == pins
