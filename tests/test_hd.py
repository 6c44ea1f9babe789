"""Visium HD: the simulator's bins and truth, prepare and QC on bins, and bad HD input.

One small simulated HD sample (512 um square, 8 genes) is shared by the module; every bad-input case breaks a
copy of its ``square_008um`` folder.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import anndata
import h5py
import matplotlib
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from conftest import SMALL_HD
from matplotlib.collections import PathCollection
from matplotlib.image import AxesImage
from PIL import Image

from undiffuse.cli import main
from undiffuse.errors import ConfigError, InputError
from undiffuse.io import read_sample
from undiffuse.io.matrix import read_10x_h5
from undiffuse.io.visium_hd import hd_barcodes
from undiffuse.io.writers import write_10x_h5
from undiffuse.prepare import prepare_sample
from undiffuse.simulate_hd import (
    BIN_SIZES_UM,
    FRAME_UM,
    VISIUM_SPOT_UM,
    HDSimulationParams,
    SquareGrid,
    bin_folder,
    marker_table_hd,
    render_truth,
    simulate_hd,
)

matplotlib.use("Agg")


def _bins(sample: Path, bin_um: int) -> Path:
    return sample / "outs" / "binned_outputs" / bin_folder(bin_um)


def _truth(sample: Path, bin_um: int) -> anndata.AnnData:
    return anndata.read_h5ad(sample / "truth" / f"{bin_folder(bin_um)}.h5ad")


# --------------------------------------------------------------------------------------------- simulator


@pytest.mark.parametrize("bin_um", BIN_SIZES_UM)
@pytest.mark.slow
def test_bin_folders_read_as_square_bins(hd_sample, bin_um):
    folder = _bins(hd_sample, bin_um)
    adata = read_sample(folder)
    info = adata.uns["undiffuse"]
    n_side = int(SMALL_HD["width_um"]) // bin_um
    assert adata.n_obs == n_side**2 and info["platform"] == "visium_hd" and info["matrix"] == "raw"
    scalefactors = adata.uns["spatial"][info["sample_id"]]["scalefactors"]
    assert scalefactors["bin_size_um"] == bin_um
    assert info["spot_pitch_px"] == pytest.approx(bin_um / scalefactors["microns_per_pixel"], rel=1e-6)
    in_tissue = adata.obs["in_tissue"].to_numpy()
    assert 0.2 < in_tissue.mean() < 0.7
    # The filtered matrix is the raw one restricted to the tissue bins, in the same order.
    filtered = read_10x_h5(folder / "filtered_feature_bc_matrix.h5")
    assert list(filtered.barcodes) == list(adata.obs_names[in_tissue])
    assert (filtered.counts != adata.X[in_tissue]).nnz == 0
    positions = pd.read_parquet(folder / "spatial" / "tissue_positions.parquet")
    assert list(positions["barcode"]) == list(adata.obs_names)
    row, col = positions["array_row"].iat[5], positions["array_col"].iat[5]
    assert positions["barcode"].iat[5] == f"s_{bin_um:03d}um_{row:05d}_{col:05d}-1"


@pytest.mark.slow
def test_coarse_bins_are_sums_of_2um_bins(hd_sample):
    fine = read_sample(_bins(hd_sample, 2))
    fine_truth = _truth(hd_sample, 2)
    grid = SquareGrid(2.0, 256, 256)
    for bin_um in (8, 16):
        aggregate = grid.aggregation(bin_um // 2)
        coarse = read_sample(_bins(hd_sample, bin_um))
        assert abs(aggregate @ fine.X - coarse.X).max() == 0
        truth = _truth(hd_sample, bin_um)
        assert np.allclose((aggregate @ fine_truth.X).toarray(), truth.X.toarray(), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_truth_lives_in_cells_and_diffusion_keeps_gene_totals(hd_sample):
    fine = _truth(hd_sample, 2)
    truth = fine.X.tocsr()
    outside_cells = np.flatnonzero(fine.obs["cell"].to_numpy() < 0)
    assert truth[outside_cells].nnz == 0
    assert not np.any(np.asarray(truth.sum(axis=1)).ravel()[~fine.obs["in_tissue"].to_numpy()])
    # The cell map holds every molecule of the truth.
    cells = anndata.read_h5ad(hd_sample / "truth" / "cells.h5ad")
    assert np.allclose(cells.X.sum(axis=0), truth.sum(axis=0), rtol=1e-4)
    diameters = 2 * np.sqrt(cells.obs["area_um2"].to_numpy() / np.pi)
    assert 9.0 < np.median(diameters) < 20.0
    assert set(fine.obs["compartment"].cat.categories) == {"none", "nucleus", "cytoplasm"}
    # Diffusion keeps each gene's total; the counts are Poisson draws of the expectation.
    coarse = _truth(hd_sample, 8)
    expected_totals = coarse.layers["expected"].sum(axis=0, dtype=np.float64)
    assert np.allclose(expected_totals, np.asarray(coarse.X.sum(axis=0)).ravel(), rtol=1e-4)
    counts = read_sample(_bins(hd_sample, 8)).X
    count_totals = np.asarray(counts.sum(axis=0)).ravel()
    assert np.all(np.abs(count_totals - expected_totals) <= 5 * np.sqrt(expected_totals) + 1)
    summary = coarse.uns["summary"]
    assert 0.005 < summary["background_share"] < 0.2
    assert summary["background_share"] == pytest.approx(summary["expected_background_share"], abs=0.01)


@pytest.mark.slow
def test_markers_are_expressed_in_their_cell_type_only(hd_sample):
    cells = anndata.read_h5ad(hd_sample / "truth" / "cells.h5ad")
    markers = cells.var.index[cells.var["gene_type"] == "marker"]
    table = marker_table_hd(HDSimulationParams(**SMALL_HD))
    assert len(markers) > 0 and table["gene"].tolist() == markers.tolist()
    assert table["cell_type"].tolist() == cells.var.loc[markers, "marker_of"].tolist()
    for gene in markers:
        own = (cells.obs["cell_type"] == cells.var.at[gene, "marker_of"]).to_numpy()
        values = cells[:, gene].X.toarray().ravel()
        assert values[own].min() > 0 and values[~own].max() == 0


@pytest.mark.slow
def test_image_shows_the_nuclei(hd_sample):
    folder = _bins(hd_sample, 2)
    image = np.asarray(Image.open(folder / "spatial" / "tissue_hires_image.png"), dtype=np.float64)
    scalef = read_sample(folder).uns["spatial"]
    scalef = next(iter(scalef.values()))["scalefactors"]["tissue_hires_scalef"]
    cells = anndata.read_h5ad(hd_sample / "truth" / "cells.h5ad")
    centres = np.round(cells.obsm["spatial"] * scalef).astype(int)
    at_nuclei = image[centres[:, 1], centres[:, 0]].mean(axis=1)
    glass = image[:5, :5].mean()
    # Haematoxylin darkens every nucleus well below the tissue around it and the glass.
    fine = _truth(hd_sample, 2)
    gaps = fine.obs["in_tissue"].to_numpy() & (fine.obs["cell"].to_numpy() < 0)
    gap_px = np.round(fine.obsm["spatial"][gaps] * scalef).astype(int)
    between = image[gap_px[:, 1], gap_px[:, 0]].mean(axis=1)
    assert np.median(at_nuclei) < np.median(between) - 30 < glass - 30


@pytest.mark.slow
def test_renderer_is_reusable_on_coarser_grids():
    """A 10 um grid sampled at 2 um is the sum of the 2 um rendering (the later Visium view's base)."""
    sample = simulate_hd(HDSimulationParams(width_um=320.0, height_um=320.0, n_genes=6, seed=1))
    cells = sample.cell_map
    fine, _ = render_truth(cells, SquareGrid(2.0, 160, 160))
    assert np.allclose(fine.toarray(), sample.levels[2].truth.X.toarray(), rtol=1e-5, atol=1e-6)
    coarse, _ = render_truth(cells, SquareGrid(10.0, 32, 32), supersample=5)
    assert np.allclose(coarse.toarray(), (SquareGrid(2.0, 160, 160).aggregation(5) @ fine).toarray())


@pytest.mark.slow
def test_one_seed_gives_one_sample_and_another_seed_another():
    small = dict(width_um=256.0, height_um=256.0, n_genes=6)
    first, again = simulate_hd(HDSimulationParams(**small)), simulate_hd(HDSimulationParams(**small))
    other = simulate_hd(HDSimulationParams(**small, seed=1))
    assert (first.levels[2].counts != again.levels[2].counts).nnz == 0
    assert np.array_equal(first.hires_image, again.hires_image)
    assert (first.levels[2].counts != other.levels[2].counts).nnz > 0


def test_barcodes_follow_space_ranger():
    barcodes = hd_barcodes(8, np.array([0, 12, 3249]), np.array([7, 34, 0]))
    assert barcodes.astype(str).tolist() == [
        "s_008um_00000_00007-1",
        "s_008um_00012_00034-1",
        "s_008um_03249_00000-1",
    ]


def test_params_reject_bad_sizes_and_unknown_keys():
    with pytest.raises(ConfigError, match="multiple of 16"):
        HDSimulationParams(width_um=500.0)
    with pytest.raises(ConfigError, match="unknown HD simulation parameter"):
        HDSimulationParams.from_dict({"n_rows": 3})
    with pytest.raises(ConfigError, match="unknown HD simulation preset"):
        HDSimulationParams.from_dict(preset="huge")
    assert HDSimulationParams.from_dict(preset="full").width_um == 6496.0


@pytest.mark.slow
def test_cli_simulates_hd_and_rejects_visium_options(tmp_path, capsys):
    out = tmp_path / "hd"
    args = ["simulate", str(out), "--platform", "visium_hd", "--width-um", "256", "--height-um", "256"]
    assert main([*args, "--n-genes", "6", "--seed", "2"]) == 0
    assert "background share" in capsys.readouterr().out
    for bin_um in BIN_SIZES_UM:
        assert (_bins(out, bin_um) / "raw_feature_bc_matrix.h5").is_file()
        assert (out / "truth" / f"{bin_folder(bin_um)}.h5ad").is_file()
    assert main(["simulate", str(tmp_path / "bad"), "--platform", "visium_hd", "--n-rows", "20"]) == 2
    assert "--n-rows" in capsys.readouterr().err
    assert main(["simulate", str(tmp_path / "bad"), "--platform", "visium_hd", "--width-um", "300"]) == 2
    assert "multiple of 16" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


# --------------------------------------------------------------------------------------------- prepare, QC


@pytest.fixture(scope="module")
def prepared_hd(hd_sample, tmp_path_factory) -> tuple[anndata.AnnData, Path]:
    outdir = tmp_path_factory.mktemp("prepared_hd") / "sample"
    adata = prepare_sample(_bins(hd_sample, 8), outdir, min_counts=1)
    return adata, outdir


@pytest.mark.slow
def test_prepare_keeps_background_bins_and_sparse_counts(prepared_hd, hd_sample):
    adata, outdir = prepared_hd
    assert sp.issparse(adata.X) and adata.n_obs == 64 * 64
    qc = adata.uns["undiffuse"]["qc"]
    assert qc["platform"] == "visium_hd" and qc["has_background"]
    truth = _truth(hd_sample, 8)
    assert qc["background_umi_fraction"] == pytest.approx(truth.uns["summary"]["background_share"], rel=1e-9)
    assert (outdir / "prepared.h5ad").is_file()
    assert sp.issparse(anndata.read_h5ad(outdir / "prepared.h5ad").X)


@pytest.mark.slow
def test_image_tissue_mask_recovers_the_simulated_tissue(prepared_hd):
    qc = prepared_hd[0].uns["undiffuse"]["qc"]
    assert qc["mask_jaccard"] > 0.95


@pytest.mark.slow
def test_decay_is_fitted_in_microns_and_finds_the_simulated_kernel(prepared_hd, hd_sample):
    adata, outdir = prepared_hd
    qc = adata.uns["undiffuse"]["qc"]
    truth = _truth(hd_sample, 8)
    lengths = truth.var["kernel_length_um"].to_numpy()
    assert qc["decay_statistic"] == "mean" and qc["spot_pitch_um"] == 8.0
    assert qc["decay_fitted"] and qc["decay_kernel"] == truth.uns["simulation"]["kernel"]
    assert lengths.min() <= qc["decay_kernel_scale_um"] <= lengths.max()
    assert qc["diffusion_scale_um"] == pytest.approx(qc["diffusion_scale"] * 8.0)
    decay = pd.read_csv(outdir / "qc" / "background_decay.tsv", sep="\t")
    assert np.allclose(decay["distance_um"], decay["distance"] * 8.0)
    assert decay["mean_umis"].iloc[0] > 3 * decay["mean_umis"].iloc[-5:].mean()


@pytest.mark.slow
def test_decay_agrees_across_bin_sizes(hd_sample, tmp_path):
    """The same tissue binned at 2 and 8 um gives one diffusion length in microns."""
    fine = prepare_sample(_bins(hd_sample, 2), tmp_path / "fine", min_counts=1)
    coarse = prepare_sample(_bins(hd_sample, 8), tmp_path / "coarse", min_counts=1)
    fine_um = fine.uns["undiffuse"]["qc"]["decay_kernel_scale_um"]
    coarse_um = coarse.uns["undiffuse"]["qc"]["decay_kernel_scale_um"]
    assert fine_um == pytest.approx(coarse_um, rel=0.3)


@pytest.mark.slow
def test_hd_figures_are_rasters(prepared_hd):
    from undiffuse.plotting.qc import plot_tissue_mask, plot_total_counts
    from undiffuse.qc import spot_totals
    from undiffuse.tissue import tissue_mask

    adata, _ = prepared_hd
    for figure in (plot_total_counts(adata, spot_totals(adata)), plot_tissue_mask(adata, tissue_mask(adata))):
        ax = figure.axes[0]
        assert not [c for c in ax.collections if isinstance(c, PathCollection) and len(c.get_offsets()) > 100]
        rasters = [image for image in ax.get_images() if isinstance(image, AxesImage)]
        # The H&E image, then bin rasters no bigger than the bin lattice.
        assert len(rasters) >= 2 and all(r.get_array().shape[0] <= 1000 for r in rasters[1:])


# --------------------------------------------------------------------------------------------- bad HD input


@pytest.fixture
def bins8(hd_sample, tmp_path) -> Path:
    target = tmp_path / "sample" / "binned_outputs" / "square_008um"
    shutil.copytree(_bins(hd_sample, 8), target)
    return target


def _parquet(folder: Path) -> Path:
    return folder / "spatial" / "tissue_positions.parquet"


def missing_parquet(folder: Path) -> tuple[Path, str]:
    _parquet(folder).unlink()
    return _parquet(folder), "tissue_positions.parquet"


def bins_absent_from_positions(folder: Path) -> tuple[Path, str]:
    table = pd.read_parquet(_parquet(folder))
    table.iloc[10:].to_parquet(_parquet(folder), index=False)
    return folder / "raw_feature_bc_matrix.h5", "absent from"


def positions_of_another_bin_size(folder: Path) -> tuple[Path, str]:
    shutil.copy(folder.parent / "square_002um" / "spatial" / "tissue_positions.parquet", _parquet(folder))
    return _parquet(folder), "holds 2 um bins"


def matrix_mixing_bin_sizes(folder: Path) -> tuple[Path, str]:
    path = folder / "raw_feature_bc_matrix.h5"
    matrix = read_10x_h5(path)
    barcodes = matrix.barcodes.tolist()
    barcodes[3] = "s_002um_00000_00003-1"
    features = matrix.features
    write_10x_h5(path, matrix.counts.astype(np.int64), barcodes, features["gene_ids"], features["gene_names"])
    return path, "mixes bins of several sizes"


def scalefactors_of_another_bin_size(folder: Path) -> tuple[Path, str]:
    shutil.copy(
        folder.parent / "square_016um" / "spatial" / "scalefactors_json.json",
        folder / "spatial" / "scalefactors_json.json",
    )
    return folder / "spatial" / "scalefactors_json.json", "bin_size_um is 16"


def filtered_only(folder: Path) -> tuple[Path, str]:
    (folder / "raw_feature_bc_matrix.h5").unlink()
    return folder, "raw_feature_bc_matrix.h5"


BAD_HD = [
    missing_parquet,
    bins_absent_from_positions,
    positions_of_another_bin_size,
    matrix_mixing_bin_sizes,
    scalefactors_of_another_bin_size,
    filtered_only,
]


@pytest.fixture
def bins_with_neighbours(hd_sample, tmp_path) -> Path:
    """A copy of the whole binned_outputs folder (cases that borrow files from another bin size)."""
    target = tmp_path / "sample" / "binned_outputs"
    shutil.copytree(hd_sample / "outs" / "binned_outputs", target)
    return target / "square_008um"


@pytest.mark.parametrize("case", BAD_HD, ids=[case.__name__ for case in BAD_HD])
@pytest.mark.slow
def test_bad_hd_input_names_the_file_and_leaves_nothing(bins_with_neighbours, tmp_path, case, capsys):
    culprit, phrase = case(bins_with_neighbours)
    outdir = tmp_path / "results" / "sample"
    with pytest.raises(InputError) as caught:
        prepare_sample(bins_with_neighbours, outdir, min_counts=1)
    assert caught.value.path == str(culprit) and phrase in str(caught.value)
    assert main(["prepare", str(bins_with_neighbours), str(outdir), "--min-counts", "1"]) == 2
    message = capsys.readouterr().err
    assert str(culprit) in message and phrase in message and "Traceback" not in message
    assert not outdir.exists()


def test_hdf5_barcodes_pass_through_as_bytes(tmp_path):
    barcodes = hd_barcodes(2, np.arange(3), np.arange(3))
    path = write_10x_h5(
        tmp_path / "m.h5",
        sp.csr_matrix(np.eye(3, dtype=np.int64)),
        barcodes,
        ["g1", "g2", "g3"],
        ["a", "b", "c"],
    )
    with h5py.File(path) as handle:
        assert handle["matrix/barcodes"][:].tolist() == barcodes.tolist()


@pytest.mark.slow
def test_visium_view_captures_the_2um_bins_under_each_spot(tmp_path):
    """The Visium view: the same molecules, summed over the 2 um bins under each 55 um spot."""
    sample = simulate_hd(
        HDSimulationParams(width_um=512.0, height_um=512.0, n_genes=6, seed=4), visium_view=True
    )
    view, fine = sample.visium, sample.levels[2]
    centres = (view.truth.obsm["spatial"] * HDSimulationParams().microns_per_pixel) - FRAME_UM
    bins = (fine.truth.obsm["spatial"] * HDSimulationParams().microns_per_pixel) - FRAME_UM
    for spot in range(0, view.truth.n_obs, 7):
        under = np.hypot(*(bins - centres[spot]).T) <= VISIUM_SPOT_UM / 2
        assert np.array_equal(
            view.counts[spot].toarray().ravel(), np.asarray(fine.counts[under].sum(axis=0)).ravel()
        )
        assert np.allclose(view.truth.X[spot], np.asarray(fine.truth.X[under].sum(axis=0)).ravel(), rtol=1e-4)
    # Spots cover about 27 % of the area (55 um disks on a 100 um hexagonal lattice).
    share = view.truth.X.sum() / fine.truth.X.sum()
    assert 0.15 < share < 0.4
    expected = view.truth.layers["expected"].sum(axis=0, dtype=np.float64)
    assert np.all(np.abs(np.asarray(view.counts.sum(axis=0)).ravel() - expected) <= 5 * np.sqrt(expected) + 1)
    for size, grid in view.grids.items():
        assert grid.n_obs == (512 // size) ** 2
        assert grid.X.sum() == pytest.approx(fine.truth.X.sum(), rel=1e-4)  # tissue is clear of the crop
    write = tmp_path / "hd"
    from undiffuse.simulate_hd import write_hd_sample

    write_hd_sample(write, sample)
    spots = read_sample(write / "visium" / "outs")
    assert spots.uns["undiffuse"]["platform"] == "visium" and spots.n_obs == view.truth.n_obs
    assert list(spots.obs_names) == list(anndata.read_h5ad(write / "visium" / "truth.h5ad").obs_names)
    assert (write / "visium" / "truth_grid_010um.h5ad").is_file()


@pytest.mark.slow
def test_cli_reads_the_hd_section_of_a_params_file(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text(
        "simulation:\n  n_rows: 20\nsimulation_hd:\n  width_um: 256\n  height_um: 256\n  n_genes: 7\n"
    )
    out = tmp_path / "hd"
    assert (
        main(["simulate", str(out), "--platform", "visium_hd", "--params", str(params), "--seed", "5"]) == 0
    )
    truth = anndata.read_h5ad(out / "truth" / "square_016um.h5ad")
    assert truth.n_vars == 7 and truth.n_obs == 16 * 16 and truth.uns["simulation"]["seed"] == 5
    params.write_text("simulation_hd:\n  width_um: 250\n")
    assert main(["simulate", str(tmp_path / "bad"), "--platform", "visium_hd", "--params", str(params)]) == 2
    message = capsys.readouterr().err
    assert str(params) in message and "multiple of 16" in message
    assert not (tmp_path / "bad").exists()
