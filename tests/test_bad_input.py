"""Bad input: an InputError naming the file and the problem, exit status 2 from the CLI, nothing left behind.

Every case starts from a copy of the simulated sample's ``outs/`` and breaks one thing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp

from undiffuse.cli import main
from undiffuse.errors import InputError
from undiffuse.io import read_sample
from undiffuse.prepare import prepare_sample


@pytest.fixture
def outs(tiny_sample, tmp_path) -> Path:
    target = tmp_path / "sample" / "outs"
    shutil.copytree(tiny_sample / "outs", target)
    return target


def _positions(outs: Path) -> Path:
    return outs / "spatial" / "tissue_positions.csv"


def _edit_positions(outs: Path, edit: Callable[[pd.DataFrame], pd.DataFrame]) -> None:
    table = pd.read_csv(_positions(outs), dtype=str, keep_default_na=False)
    edit(table).to_csv(_positions(outs), index=False)


def missing_file(outs: Path) -> tuple[Path, Path, str]:
    missing = outs.parent / "no_such_sample"
    return missing, missing, "does not exist"


def truncated_h5(outs: Path) -> tuple[Path, Path, str]:
    h5 = outs / "raw_feature_bc_matrix.h5"
    data = h5.read_bytes()
    h5.write_bytes(data[: len(data) // 2])
    return outs, h5, "truncated"


def not_hdf5(outs: Path) -> tuple[Path, Path, str]:
    h5 = outs / "raw_feature_bc_matrix.h5"
    h5.write_bytes(b"this is not an HDF5 file\n" * 100)
    return outs, h5, "cannot be read as HDF5"


def barcodes_absent_from_positions(outs: Path) -> tuple[Path, Path, str]:
    _edit_positions(outs, lambda table: table.iloc[5:])
    return outs, outs / "raw_feature_bc_matrix.h5", "absent from"


def no_tissue_spots(outs: Path) -> tuple[Path, Path, str]:
    _edit_positions(outs, lambda table: table.assign(in_tissue="0"))
    return outs, _positions(outs), "no spot is marked in tissue"


def filtered_matrix(outs: Path) -> tuple[Path, Path, str]:
    """A filtered MTX folder (tissue spots only) in place of the raw matrix."""
    adata = read_sample(outs)
    tissue = adata[adata.obs["in_tissue"].to_numpy()]
    folder = outs / "filtered_feature_bc_matrix"
    folder.mkdir()
    scipy.io.mmwrite(folder / "matrix.mtx", sp.csr_matrix(tissue.X.T, dtype=np.int64))
    pd.Series(tissue.obs_names).to_csv(folder / "barcodes.tsv", index=False, header=False)
    features = pd.DataFrame(
        {"id": tissue.var["gene_ids"], "name": tissue.var_names, "type": "Gene Expression"}
    )
    features.to_csv(folder / "features.tsv", sep="\t", index=False, header=False)
    (outs / "raw_feature_bc_matrix.h5").unlink()
    return outs, outs, "--allow-filtered"


def image_scale_mismatch(outs: Path) -> tuple[Path, Path, str]:
    path = outs / "spatial" / "scalefactors_json.json"
    scalefactors = json.loads(path.read_text())
    scalefactors["tissue_lowres_scalef"] *= 3
    path.write_text(json.dumps(scalefactors))
    return outs, outs / "spatial" / "tissue_lowres_image.png", "does not fit the spot coordinates"


def non_numeric_coordinates(outs: Path) -> tuple[Path, Path, str]:
    def edit(table: pd.DataFrame) -> pd.DataFrame:
        table.loc[3, "pxl_row_in_fullres"] = "abc"
        return table

    _edit_positions(outs, edit)
    return outs, _positions(outs), "non-numeric value 'abc'"


def missing_coordinates(outs: Path) -> tuple[Path, Path, str]:
    def edit(table: pd.DataFrame) -> pd.DataFrame:
        table.loc[7, "pxl_col_in_fullres"] = ""
        return table

    _edit_positions(outs, edit)
    return outs, _positions(outs), "lack a value of pxl_col_in_fullres"


def corrupt_image(outs: Path) -> tuple[Path, Path, str]:
    image = outs / "spatial" / "tissue_hires_image.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 1000)
    return outs, image, "cannot be read as an image"


def truncated_image(outs: Path) -> tuple[Path, Path, str]:
    image = outs / "spatial" / "tissue_lowres_image.png"
    data = image.read_bytes()
    image.write_bytes(data[: len(data) // 2])
    return outs, image, "cannot be read as an image"


def corrupt_scalefactors(outs: Path) -> tuple[Path, Path, str]:
    path = outs / "spatial" / "scalefactors_json.json"
    path.write_text("{not json")
    return outs, path, "cannot be read as JSON"


def binned_outputs_folder(outs: Path) -> tuple[Path, Path, str]:
    binned = outs.parent / "binned_outputs"
    (binned / "square_008um").mkdir(parents=True)
    (binned / "square_016um").mkdir()
    return binned, binned, "square_008um, square_016um"


def normalised_h5ad(outs: Path) -> tuple[Path, Path, str]:
    adata = read_sample(outs)
    adata.X = adata.X.multiply(0.5).tocsr()
    adata.X.data += 0.25
    path = outs.parent / "normalised.h5ad"
    adata.write_h5ad(path)
    return path, path, "does not hold raw counts"


CASES = [
    missing_file,
    truncated_h5,
    not_hdf5,
    barcodes_absent_from_positions,
    no_tissue_spots,
    filtered_matrix,
    image_scale_mismatch,
    non_numeric_coordinates,
    missing_coordinates,
    corrupt_image,
    truncated_image,
    corrupt_scalefactors,
    binned_outputs_folder,
    normalised_h5ad,
]


@pytest.mark.parametrize("case", CASES, ids=[case.__name__ for case in CASES])
def test_library_raises_input_error(outs, tmp_path, case):
    source, culprit, phrase = case(outs)
    outdir = tmp_path / "results" / "sample"
    with pytest.raises(InputError) as caught:
        prepare_sample(source, outdir, min_counts=1)
    assert caught.value.path == str(culprit)
    assert phrase in str(caught.value)
    assert not outdir.exists()


@pytest.mark.parametrize("case", CASES, ids=[case.__name__ for case in CASES])
def test_cli_exits_nonzero_and_names_the_file(outs, tmp_path, case, capsys):
    source, culprit, phrase = case(outs)
    outdir = tmp_path / "results" / "sample"
    assert main(["prepare", str(source), str(outdir), "--min-counts", "1"]) == 2
    message = capsys.readouterr().err
    assert str(culprit) in message and phrase in message
    assert not outdir.exists()


@pytest.mark.slow
def test_filtered_matrix_is_accepted_when_allowed(outs, tmp_path):
    source, _, _ = filtered_matrix(outs)
    adata = prepare_sample(source, tmp_path / "out", min_counts=1, allow_filtered=True)
    qc = adata.uns["undiffuse"]["qc"]
    assert adata.uns["undiffuse"]["matrix"] == "filtered"
    assert qc["n_background_spots"] == 0 and not qc["has_background"]
    assert not qc["decay_fitted"] and qc["arc_score"] == 0.0
    assert (tmp_path / "out" / "prepared.h5ad").is_file()


@pytest.mark.slow
def test_unknown_genes_in_gene_list(outs, tmp_path):
    gene_file = tmp_path / "genes.txt"
    known = read_sample(outs).var_names[:2].tolist()
    gene_file.write_text("\n".join([*known, "NotAGene1", "NotAGene2"]) + "\n")
    with pytest.raises(InputError) as caught:
        prepare_sample(outs, tmp_path / "out", genes=gene_file)
    assert caught.value.path == str(gene_file)
    assert "NotAGene1, NotAGene2" in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_refine_mask_without_image(outs, tmp_path):
    for image in (outs / "spatial").glob("*.png"):
        image.unlink()
    with pytest.raises(InputError, match="needs an H&E image"):
        prepare_sample(outs, tmp_path / "out", refine_mask=True, min_counts=1)


def test_fullres_image_of_another_size(outs, tmp_path):
    from PIL import Image

    small = tmp_path / "small.png"
    Image.new("RGB", (300, 200), "white").save(small)
    with pytest.raises(InputError) as caught:
        read_sample(outs, image=small)
    assert caught.value.path == str(small) and "does not fit" in str(caught.value)


@pytest.mark.slow
def test_failure_while_writing_leaves_nothing(outs, tmp_path, monkeypatch):
    from anndata import AnnData

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(AnnData, "write_h5ad", broken)
    outdir = tmp_path / "results" / "sample"
    with pytest.raises(OSError, match="disk full"):
        prepare_sample(outs, outdir, min_counts=1)
    assert not outdir.exists()


@pytest.mark.slow
def test_console_script_exit_status(tmp_path):
    missing = tmp_path / "nowhere"
    result = subprocess.run(
        [sys.executable, "-m", "undiffuse", "prepare", str(missing), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert str(missing) in result.stderr and "does not exist" in result.stderr


@pytest.mark.slow
def test_degenerate_tissue_is_an_error_unless_allowed(outs, tmp_path, capsys):
    def edit(table: pd.DataFrame) -> pd.DataFrame:
        tissue = np.flatnonzero(table["in_tissue"].to_numpy() == "1")
        table["in_tissue"] = "0"
        table.loc[tissue[:10], "in_tissue"] = "1"
        return table

    _edit_positions(outs, edit)
    outdir = tmp_path / "results"
    assert main(["prepare", str(outs), str(outdir), "--min-counts", "1"]) == 2
    err = capsys.readouterr().err
    assert "degenerate tissue: only 10 of 480 spots" in err and str(_positions(outs)) in err
    assert not outdir.exists()
    argv = ["prepare", str(outs), str(outdir), "--min-counts", "1", "--allow-degenerate-tissue"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "undiffuse prepare: warning: " in err and "degenerate tissue" in err and "(overridden)" in err
    assert (outdir / "prepared.h5ad").is_file()


FAST_CORRECTION = "correct:\n  epochs: 1\n  em_iterations: 5\n  tail_iterations: 1\n  weights: {image: 0.0}\n"


@pytest.mark.slow
def test_correct_passes_a_failed_gene_through_and_removes_stale_leftovers(
    outs, tmp_path, capsys, monkeypatch
):
    """A gene whose correction is not finite keeps its raw counts (never zeroed) and is reported."""
    import anndata as ad

    from undiffuse.trainer import KernelTrainer

    prepared = prepare_sample(outs, tmp_path / "prepared", min_counts=1)
    real_final = KernelTrainer.final

    def failing_first_gene(self, *args, **kwargs):
        field, table, profile, model = real_final(self, *args, **kwargs)
        field[:, 0] = float("nan")
        return field, table, profile, model

    monkeypatch.setattr(KernelTrainer, "final", failing_first_gene)
    config = tmp_path / "config.yaml"
    config.write_text(FAST_CORRECTION)
    output = tmp_path / "corrected.h5ad"
    stale = tmp_path / f".corrected.h5ad.{2**22 + 7}.abcd1234.partial"  # left by a killed run
    stale.mkdir()
    genes = prepared.var_names[prepared.var["selected"].to_numpy()][:2].tolist()
    argv = ["correct", str(tmp_path / "prepared" / "prepared.h5ad"), str(output), "--quiet"]
    assert main([*argv, "--config", str(config), "--genes", *genes]) == 0
    err = capsys.readouterr().err
    assert f"({genes[0]})" in err and "passed through uncorrected" in err
    corrected = ad.read_h5ad(output)
    raw = prepared[:, genes[0]].X.toarray().ravel()
    np.testing.assert_array_equal(corrected[:, genes[0]].layers["corrected"].toarray().ravel(), raw)
    assert raw.sum() > 0 and np.isfinite(corrected.layers["corrected"].data).all()
    assert corrected.var.loc[genes, "undiffuse_corrected"].tolist() == [False, True]
    assert not stale.exists()


@pytest.mark.slow
def test_workflow_sample_sheet_errors_name_the_sheet(tmp_path):
    """The workflow parses the sheet with undiffuse.config.read_sample_sheet: the error names the sheet."""
    from conftest import REPO

    sheet = tmp_path / "samples.tsv"
    sheet.write_text("name\tinput\nbrain\tsimulate\n")
    config = tmp_path / "config.yaml"
    config.write_text(f"samples: {sheet}\n")
    result = subprocess.run(
        [
            str(REPO / ".venv" / "bin" / "snakemake"),
            "-n",
            "--configfile",
            str(config),
            "--directory",
            str(tmp_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert f"{sheet}: lacks the column(s) sample (header: name, input)" in output
