"""Visium HD in the workflow, without running it: the simulation_hd section, the sheet's bin_size column, the
square folder prepare reads, and the chunk jobs' resources planned from the bin count (dry runs)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from undiffuse.config import (
    hd_bin_folder,
    load_config,
    read_sample_sheet,
    simulation_hd_options,
    validate_config,
)
from undiffuse.errors import InputError

REPO = Path(__file__).resolve().parents[1]
TEST_CONFIG = REPO / "config" / "test" / "config.yaml"


def dry_run(workdir: Path, config: Path, *targets: str) -> str:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "snakemake",
            *targets,
            "-n",
            "--snakefile",
            str(REPO / "Snakefile"),
            "--directory",
            str(workdir),
            "--cores",
            "1",
            "--configfile",
            str(config),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def test_schema_defaults_of_simulation_hd_match_the_simulator():
    from undiffuse.simulate_hd import PRESETS, HDSimulationParams

    section = load_config()["simulation_hd"]
    assert section.pop("preset") == "ci"
    library = dataclasses.asdict(HDSimulationParams())
    library.pop("sample_id")  # the workflow names each simulated library after its sample
    # The preset sets the size; every other field has the simulator's default.
    sized = set(PRESETS["ci"])
    assert sized == {"width_um", "height_um", "n_genes"}
    assert section == {key: value for key, value in library.items() if key not in sized}


def test_simulation_hd_options_build_the_simulators_parameters():
    from undiffuse.simulate_hd import HDSimulationParams

    config = load_config(TEST_CONFIG)
    options = simulation_hd_options(config, sample_id="hd", seed="3")
    preset = options.pop("preset")
    params = HDSimulationParams.from_dict(options, preset=preset)
    assert (params.width_um, params.n_genes, params.sample_id, params.seed) == (1024.0, 12, "hd", 3)


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"preset": "huge"}, "simulation_hd.preset"),
        ({"width_um": 1000}, "simulation_hd.width_um: 1000 is not a multiple of 16"),
        ({"bleeding": 0.3}, "simulation_hd"),
    ],
)
def test_bad_simulation_hd_values_are_rejected(section, message):
    from undiffuse.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        validate_config({"simulation_hd": section})


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ("hd\tsimulate_hd\t4\t\n", "row 1: .*bin_size.*'4' is not one of"),
        ("demo\tsimulate\t8\t\n", "bin_size is set for the Visium sample\\(s\\) demo"),
        ("demo\tsimulate\t\tcells.tsv\n", "cells is set for the Visium sample\\(s\\) demo"),
    ],
)
def test_bad_bin_sizes_are_refused_naming_the_sheet(tmp_path, rows, message):
    sheet = tmp_path / "samples.tsv"
    sheet.write_text("sample\tinput\tbin_size\tcells\n" + rows)
    with pytest.raises(InputError, match=message) as caught:
        read_sample_sheet(sheet)
    assert str(sheet) in str(caught.value) and "\n" not in str(caught.value)


def test_test_sheet_has_a_simulated_hd_sample_at_8_um():
    sheet = read_sample_sheet(REPO / load_config(TEST_CONFIG)["samples"])
    assert sheet.loc["hd", "input"] == "simulate_hd" and sheet.loc["hd", "bin_size"] == "8"


@pytest.mark.parametrize("above", ["", "binned_outputs", "outs/binned_outputs"])
def test_hd_bin_folder_finds_the_square_of_the_bin_size(tmp_path, above):
    binned = tmp_path / "run" / above
    for size in ("002", "008", "016"):
        (binned / f"square_{size}um").mkdir(parents=True)
    assert hd_bin_folder(tmp_path / "run", "16") == binned / "square_016um"
    assert hd_bin_folder(binned / "square_002um", 2) == binned / "square_002um"
    assert hd_bin_folder(tmp_path / "run", None) == tmp_path / "run"  # no bin size: the path as given


def test_hd_bin_folder_errors_name_the_folder_and_the_fix(tmp_path):
    square = tmp_path / "binned_outputs" / "square_008um"
    square.mkdir(parents=True)
    with pytest.raises(InputError, match="is the square_008um folder but the sample sheet's bin_size is 16"):
        hd_bin_folder(square, 16)
    with pytest.raises(
        InputError, match="holds no square_002um/ folder .*name a Space Ranger binned_outputs"
    ):
        hd_bin_folder(tmp_path, 2)


@pytest.mark.slow
def test_dry_run_reads_the_square_folder_of_the_bin_size(tmp_path):
    """A real HD sample named by its binned_outputs/ folder: prepare reads the square of the sheet's bin size;
    a simulated one runs simulate_hd, and its report compares with the truth of its bin size."""
    binned = tmp_path / "data" / "binned_outputs"
    for size in ("002", "016"):
        (binned / f"square_{size}um").mkdir(parents=True)
    sheet = tmp_path / "samples.tsv"
    sheet.write_text(f"sample\tinput\tbin_size\nreal\t{binned}\t2\nsim\tsimulate_hd\t16\n")
    config = tmp_path / "config.yaml"
    config.write_text(TEST_CONFIG.read_text().replace("config/test/samples.tsv", str(sheet)))
    output = dry_run(tmp_path, config, "results/real/prepared.h5ad", "results/sim/report.html")
    assert str(binned / "square_002um") in output
    assert "rule simulate_hd:" in output and "rule simulate:" not in output
    assert "results/sim/simulated/outs/binned_outputs/square_016um/raw_feature_bc_matrix.h5" in output
    assert "results/sim/simulated/truth/square_016um.h5ad" in output
    assert "results/sim/simulated/markers.tsv" in output
    # Memory from what the simulation renders: 4000 MB + 6 per million (2 um bin x gene), the test config's
    # 1 mm ci preset with 12 genes.
    job = output.split("rule simulate_hd:", 1)[1].split("\n\n", 1)[0]
    assert f"mem_mb={int(4000 + 6 * 1024 * 1024 / 4 * 12 / 1e6)}," in job


def test_dry_run_aggregates_hd_bins_into_coarser_bins_and_cells(tmp_path):
    """aggregate.bin_sizes gives every larger multiple of a HD sample's bin size; a sheet segmentation gives
    its cells; Visium samples get neither."""
    binned = tmp_path / "data" / "binned_outputs"
    (binned / "square_002um").mkdir(parents=True)
    cells = tmp_path / "cells.tsv"
    cells.write_text("barcode\tcell_id\n")
    sheet = tmp_path / "samples.tsv"
    sheet.write_text(
        f"sample\tinput\tbin_size\tcells\nreal\t{binned}\t2\t{cells}\nsim\tsimulate_hd\t8\t\nvis\tsimulate\t\t\n"
    )
    config = tmp_path / "config.yaml"
    text = TEST_CONFIG.read_text().replace("config/test/samples.tsv", str(sheet))
    config.write_text(text.replace("bin_sizes: [16]", "bin_sizes: [4, 8, 16]"))
    output = dry_run(tmp_path, config)
    for planned in (
        "real/aggregated/square_004um",
        "real/aggregated/square_008um",
        "real/aggregated/square_016um",
    ):
        assert f"results/{planned}.h5ad" in output
    assert "results/real/aggregated/cells.h5ad" in output and str(cells) in output
    assert "results/sim/aggregated/square_016um.h5ad" in output
    assert "results/sim/aggregated/square_008um.h5ad" not in output
    assert "results/sim/aggregated/square_004um.h5ad" not in output
    assert "results/vis/aggregated" not in output
