"""Simulator: Space Ranger layout read back by scanpy, the truth, diffusion invariants, determinism, CLI."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp
import yaml
from conftest import REPO, TINY_SAMPLE
from PIL import Image
from scipy.sparse.csgraph import connected_components

from undiffuse.cli import main
from undiffuse.errors import ConfigError
from undiffuse.io.writers import POSITION_COLUMNS, write_10x_h5, write_spatial
from undiffuse.simulate import SimulationParams, marker_table, simulate, simulate_sample
from undiffuse.spatial import adjacency, distance_to_mask

#: The smallest grid the simulator accepts, for tests that need several samples.
SMALL = dict(n_rows=12, n_cols=12, n_genes=12)


def _truth(sample: Path) -> anndata.AnnData:
    return anndata.read_h5ad(sample / "truth.h5ad")


def _file_hashes(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def test_outs_read_back_with_scanpy(tiny_sample):
    truth = _truth(tiny_sample)
    counts = sc.read_10x_h5(tiny_sample / "outs" / "raw_feature_bc_matrix.h5")
    n_spots = TINY_SAMPLE["n_rows"] * TINY_SAMPLE["n_cols"]
    assert counts.shape == (n_spots, TINY_SAMPLE["n_genes"])
    assert list(counts.obs_names) == list(truth.obs_names)
    assert list(counts.var_names) == list(truth.var_names)
    assert list(counts.var["gene_ids"]) == list(truth.var["gene_ids"])
    assert (counts.var["feature_types"] == "Gene Expression").all()
    assert all(len(b) == 18 and b.endswith("-1") and set(b[:16]) <= set("ACGT") for b in counts.obs_names)

    matrix = counts.X.toarray().astype(np.float64)
    assert matrix.min() >= 0 and np.array_equal(matrix, np.round(matrix))
    # Counts are Poisson draws of the diffused expectation: gene totals agree within Poisson noise.
    expected_totals = truth.layers["expected"].sum(axis=0, dtype=np.float64)
    assert np.all(np.abs(matrix.sum(axis=0) - expected_totals) <= 5 * np.sqrt(expected_totals) + 1)
    tissue = truth.obs["in_tissue"].to_numpy()
    assert matrix[tissue].sum(axis=1).mean() > 4 * matrix[~tissue].sum(axis=1).mean()


def test_spatial_folder_is_space_ranger_2_and_aligned_with_the_images(tiny_sample):
    truth = _truth(tiny_sample)
    spatial = tiny_sample / "outs" / "spatial"
    positions = pd.read_csv(spatial / "tissue_positions.csv")
    assert tuple(positions.columns) == POSITION_COLUMNS
    positions = positions.set_index("barcode").loc[truth.obs_names]
    assert np.array_equal(positions["in_tissue"].to_numpy() == 1, truth.obs["in_tissue"].to_numpy())
    assert np.array_equal(positions["array_row"], truth.obs["array_row"])
    assert np.all((positions["array_col"] - positions["array_row"]) % 2 == 0)  # hexagonal grid

    scalefactors = json.loads((spatial / "scalefactors_json.json").read_text())
    assert set(scalefactors) == {
        "spot_diameter_fullres",
        "tissue_hires_scalef",
        "tissue_lowres_scalef",
        "fiducial_diameter_fullres",
    }
    # 55 um spots at 100 um pitch: neighbours in a row are 100/55 spot diameters apart.
    pitch_px = scalefactors["spot_diameter_fullres"] * 100 / 55
    row0 = positions[positions["array_row"] == 0].sort_values("array_col")
    assert np.allclose(np.diff(row0["pxl_col_in_fullres"]), pitch_px, atol=1)
    assert scalefactors["fiducial_diameter_fullres"] > scalefactors["spot_diameter_fullres"]

    hires = np.asarray(Image.open(spatial / "tissue_hires_image.png").convert("RGB"), dtype=np.float64)
    lowres = np.asarray(Image.open(spatial / "tissue_lowres_image.png").convert("RGB"), dtype=np.float64)
    assert max(hires.shape[:2]) == 2000 and max(lowres.shape[:2]) == 600
    for image, key in ((hires, "tissue_hires_scalef"), (lowres, "tissue_lowres_scalef")):
        rows = np.round(positions["pxl_row_in_fullres"].to_numpy() * scalefactors[key]).astype(int)
        cols = np.round(positions["pxl_col_in_fullres"].to_numpy() * scalefactors[key]).astype(int)
        brightness = image[rows, cols].mean(axis=1)
        far = truth.obs["domain"].eq("background").to_numpy() & _far_from_tissue(truth, 2.0)
        assert np.median(brightness[truth.obs["in_tissue"].to_numpy()]) < 215  # stained tissue
        assert brightness[far].min() > 235  # bare glass


def _pitch_coords(truth: anndata.AnnData) -> np.ndarray:
    recorded = truth.uns["simulation"]
    return truth.obsm["spatial"] / (recorded["spot_pitch_um"] * recorded["pixels_per_um"])


def _far_from_tissue(truth: anndata.AnnData, pitches: float) -> np.ndarray:
    return distance_to_mask(_pitch_coords(truth), truth.obs["in_tissue"].to_numpy()) > pitches


def test_truth_holds_the_documented_layout(tiny_sample):
    truth = _truth(tiny_sample)
    tissue = truth.obs["in_tissue"].to_numpy()
    assert truth.X.dtype == np.float32 and not sp.issparse(truth.X)
    assert np.all(np.isfinite(truth.X)) and np.all(np.isfinite(truth.layers["expected"]))
    assert np.all(truth.X[~tissue] == 0) and np.all(truth.X[tissue].sum(axis=1) > 0)
    assert np.all(truth.layers["expected"] >= 0)

    domain = truth.obs["domain"]
    assert isinstance(domain.dtype, pd.CategoricalDtype)
    assert np.array_equal(domain.eq("background").to_numpy(), ~tissue)
    assert set(domain[tissue]) == {"layer1", "layer2", "layer3", "blob1", "blob2"}

    var = truth.var
    assert set(var["gene_type"]) == {"marker", "shared", "housekeeping"}
    assert (var.loc[var["gene_type"] == "marker", "marker_of"] != "").all()
    assert (var.loc[var["gene_type"] != "marker", "marker_of"] == "").all()
    assert np.all(var["kernel_scale"] > 0)

    recorded = truth.uns["simulation"]
    assert recorded == {**SimulationParams().to_dict(), **TINY_SAMPLE}
    assert {"bleed", "distal", "kernel", "kernel_scale", "kernel_scale_sd", "seed"} <= set(recorded)


def test_diffusion_keeps_every_gene_total(tiny_sample):
    truth = _truth(tiny_sample)
    before = truth.X.sum(axis=0, dtype=np.float64)
    after = truth.layers["expected"].sum(axis=0, dtype=np.float64)
    np.testing.assert_allclose(after, before, rtol=1e-5)
    # ... while moving some of it off tissue.
    assert truth.layers["expected"][~truth.obs["in_tissue"].to_numpy()].sum() > 0.01 * before.sum()


def test_tissue_is_one_piece_with_background_all_round(tiny_sample):
    truth = _truth(tiny_sample)
    tissue = truth.obs["in_tissue"].to_numpy()
    n_parts, _ = connected_components(adjacency(_pitch_coords(truth))[tissue][:, tissue], directed=False)
    assert n_parts == 1
    assert 1 / 3 <= tissue.mean() <= 2 / 3
    rows, k = truth.obs["array_row"].to_numpy(), truth.obs["array_col"].to_numpy() // 2
    rim = (rows == 0) | (rows == rows.max()) | (k == 0) | (k == k.max())
    assert not tissue[rim].any()


def test_markers_peak_in_their_domain(tiny_sample):
    truth = _truth(tiny_sample)
    tissue = truth.obs["in_tissue"].to_numpy()
    domain = truth.obs["domain"].to_numpy()
    markers = truth.var.index[truth.var["gene_type"] == "marker"]
    for gene in markers:
        values = truth[:, gene].X.ravel()
        inside = domain == truth.var.loc[gene, "marker_of"]
        assert values[inside].mean() > 5 * values[tissue & ~inside].mean(), gene


def test_markers_file_matches_the_simulator():
    path = REPO / "resources" / "markers" / "simulated.tsv"
    assert path.read_text().splitlines()[0] == "cell_type\tgene"
    table = pd.read_csv(path, sep="\t")
    pd.testing.assert_frame_equal(table, marker_table(SimulationParams()))
    assert set(table["cell_type"]) == set(SimulationParams().domains)


@pytest.mark.slow
def test_background_share_grows_with_bleeding_share():
    shares = [simulate(SimulationParams(**SMALL, bleed=bleed)).truth.uns["summary"] for bleed in (0.1, 0.5)]
    assert shares[0]["expected_background_share"] < shares[1]["expected_background_share"]
    assert shares[0]["background_share"] < shares[1]["background_share"]


@pytest.mark.slow
def test_one_seed_gives_identical_files(tiny_sample, tmp_path):
    simulate_sample(tmp_path, **TINY_SAMPLE)
    again = _file_hashes(tmp_path)
    assert set(again) == {
        "truth.h5ad",
        "reference.h5ad",
        "outs/raw_feature_bc_matrix.h5",
        "outs/spatial/tissue_positions.csv",
        "outs/spatial/scalefactors_json.json",
        "outs/spatial/tissue_hires_image.png",
        "outs/spatial/tissue_lowres_image.png",
    }
    assert again == _file_hashes(tiny_sample)


@pytest.mark.slow
def test_another_seed_gives_another_sample():
    first, second = (simulate(SimulationParams(**SMALL, seed=seed)) for seed in (1, 2))
    assert (first.counts != second.counts).nnz > 0
    assert not np.array_equal(first.hires_image, second.hires_image)


def test_params_reject_unknown_keys_and_bad_values():
    with pytest.raises(ConfigError, match="unknown simulation parameter.*n_rowz"):
        SimulationParams.from_dict({"n_rowz": 20})
    for bad, message in [
        ({"bleed": 1.2}, "bleed must be in"),
        ({"bleed": 0.6, "distal": 0.5}, "bleed \\+ distal"),
        ({"n_rows": "20"}, "n_rows must be an integer"),
        ({"n_rows": True}, "n_rows must be an integer"),
        ({"kernel": "box"}, "kernel must be one of"),
        ({"depth": float("nan")}, "depth must be a finite number"),
        ({"n_genes": 3}, "n_genes must be at least"),
    ]:
        with pytest.raises(ConfigError, match=message):
            SimulationParams.from_dict(bad)
    assert SimulationParams.from_dict({"depth": 5000}, bleed=0.2).depth == 5000.0


@pytest.mark.slow
def test_cli_writes_a_sample_with_options_over_a_params_file(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"simulation": {**SMALL, "distal": 0.05, "seed": 1}}))
    out = tmp_path / "sample"
    status = main(["simulate", str(out), "--params", str(params), "--seed", "3", "--kernel", "heavy_tailed"])
    assert status == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == str(out / "outs")
    assert printed[1].startswith("background share of UMIs: 0.")
    recorded = _truth(out).uns["simulation"]
    assert (recorded["distal"], recorded["seed"], recorded["kernel"], recorded["n_rows"]) == (
        0.05,
        3,
        "heavy_tailed",
        12,
    )


@pytest.mark.slow
def test_cli_rejects_bad_parameters(tmp_path, capsys):
    out = tmp_path / "sample"
    assert main(["simulate", str(out), *_small_options(), "--bleed", "1.5"]) == 2
    assert "bleed must be in [0, 1)" in capsys.readouterr().err

    params = tmp_path / "params.yaml"
    params.write_text("simulation:\n  n_rowz: 20\n")
    assert main(["simulate", str(out), "--params", str(params)]) == 2
    err = capsys.readouterr().err
    assert str(params) in err and "n_rowz" in err

    params.write_text("simulation: [1, 2\n")
    assert main(["simulate", str(out), "--params", str(params)]) == 2
    assert "not valid YAML" in capsys.readouterr().err

    with pytest.raises(SystemExit) as exit_info:
        main(["simulate", str(out), "--kernel", "box"])
    assert exit_info.value.code == 2
    assert not out.exists() or not any(out.iterdir())  # no partial output

    a_file = tmp_path / "a_file"
    a_file.write_text("")
    assert main(["simulate", str(a_file), *_small_options()]) == 2
    assert "is not a folder" in capsys.readouterr().err


@pytest.mark.slow
def test_console_script_exits_non_zero_on_bad_parameters(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "undiffuse", "simulate", str(tmp_path / "x"), "--n-rows", "5"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "n_rows must be >= 12" in result.stderr


def _small_options() -> list[str]:
    return [f"--{key.replace('_', '-')}={value}" for key, value in SMALL.items()]


def test_writers_reject_bad_counts_and_write_space_ranger_1_positions(tmp_path):
    counts = sp.csr_matrix(np.array([[0.5, 1.0]]))
    with pytest.raises(ValueError, match="integers"):
        write_10x_h5(tmp_path / "m.h5", counts, ["AAAC-1"], ["G1", "G2"], ["g1", "g2"])
    assert not (tmp_path / "m.h5").exists()

    positions = pd.DataFrame(
        [["AAAC-1", 1, 0, 0, 10, 20], ["AAAG-1", 0, 0, 2, 10, 180]], columns=list(POSITION_COLUMNS)
    )
    write_spatial(tmp_path / "spatial", positions, {"spot_diameter_fullres": 88.0}, layout="spaceranger1")
    table = pd.read_csv(tmp_path / "spatial" / "tissue_positions_list.csv", header=None)
    assert table.shape == (2, 6) and table.iloc[1, 0] == "AAAG-1"


@pytest.mark.slow
def test_default_sample_looks_like_real_visium():
    """The default ("moderate") sample: 5-12% of UMIs off tissue, diffusion bias well above Poisson noise.

    Slow (a full 78 x 64 slide with 300 genes, 10-40 s depending on the machine's load).
    """
    summary = simulate().truth.uns["summary"]
    assert summary["n_spots"] == 4992
    assert 1 / 3 <= summary["tissue_fraction"] <= 2 / 3
    assert 0.05 <= summary["background_share"] <= 0.12
    assert summary["marker_rmse_raw_vs_truth"] >= 1.6 * summary["marker_rmse_poisson_vs_truth"]
