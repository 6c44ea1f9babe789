"""Aggregation of Visium HD bins into coarser bins and into cells (undiffuse.aggregate, `undiffuse aggregate`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest

from undiffuse.aggregate import aggregate_bins, aggregate_cells, read_cell_labels
from undiffuse.errors import InputError
from undiffuse.io import read_sample
from undiffuse.simulate import simulate_sample
from undiffuse.simulate_hd import bin_folder


@pytest.fixture(scope="module")
def fine(hd_sample) -> anndata.AnnData:
    return read_sample(hd_sample / "outs" / "binned_outputs" / bin_folder(2))


@pytest.fixture(scope="module")
def cell_table(hd_sample, tmp_path_factory) -> Path:
    """The simulator's own bin-to-cell map of the 2 um bins, as a user's table."""
    truth = anndata.read_h5ad(hd_sample / "truth" / f"{bin_folder(2)}.h5ad")
    cell = truth.obs["cell"].to_numpy()
    path = tmp_path_factory.mktemp("segmentation") / "bins_to_cells.tsv"
    pd.DataFrame({"barcode": truth.obs_names[cell >= 0], "cell_id": cell[cell >= 0]}).to_csv(
        path, sep="\t", index=False
    )
    return path


@pytest.mark.parametrize("bin_um", [8, 16])
def test_bins_sum_into_space_rangers_coarse_bins(hd_sample, fine, bin_um):
    coarse = read_sample(hd_sample / "outs" / "binned_outputs" / bin_folder(bin_um))
    aggregated = aggregate_bins(fine, bin_um)
    assert list(aggregated.obs_names) == list(coarse.obs_names)
    assert (
        aggregated.obs[["array_row", "array_col"]].to_numpy()
        == coarse.obs[["array_row", "array_col"]].to_numpy()
    ).all()
    assert abs(aggregated.X - coarse.X).max() == 0
    assert np.allclose(aggregated.obsm["spatial"], coarse.obsm["spatial"], atol=1e-6 * bin_um)
    assert (aggregated.obs["n_bins"] == (bin_um // 2) ** 2).all()
    # A coarse bin is in tissue when any of its 2 um bins is: the coarse mask covers the fine one.
    fine_tissue_mass = fine.X[fine.obs["in_tissue"].to_numpy()].sum()
    assert aggregated.X[aggregated.obs["in_tissue"].to_numpy()].sum() >= fine_tissue_mass
    sample_id = aggregated.uns["undiffuse"]["sample_id"]
    scalefactors = aggregated.uns["spatial"][sample_id]["scalefactors"]
    assert scalefactors["bin_size_um"] == bin_um
    assert aggregated.uns["undiffuse"]["spot_pitch_px"] == pytest.approx(
        coarse.uns["undiffuse"]["spot_pitch_px"], rel=1e-9
    )
    assert aggregated.uns["undiffuse"]["aggregation"] == {
        "kind": "bins",
        "from_um": 2.0,
        "to_um": float(bin_um),
    }


def test_every_layer_is_summed_and_totals_are_kept(fine):
    sample = fine.copy()
    rng = np.random.default_rng(0)
    sample.layers["corrected"] = sample.X.multiply(rng.uniform(0.5, 1.5, sample.shape)).tocsr()
    sample.layers["dense"] = sample.X.toarray() * 0.5
    aggregated = aggregate_bins(sample, 8)
    for name in ("corrected", "dense"):
        before = np.asarray(sample.layers[name].sum(axis=0)).ravel()
        after = np.asarray(aggregated.layers[name].astype(np.float64).sum(axis=0)).ravel()
        assert np.allclose(after, before, rtol=1e-6)
    assert isinstance(aggregated.layers["dense"], np.ndarray)


def test_cells_are_sums_of_their_bins(hd_sample, cell_table):
    truth = anndata.read_h5ad(hd_sample / "truth" / f"{bin_folder(2)}.h5ad")
    cells = anndata.read_h5ad(hd_sample / "truth" / "cells.h5ad")
    aggregated = aggregate_cells(truth, read_cell_labels(cell_table, truth))
    # The true 2 um field lives in cells, so summing it by the cell map gives back each cell's molecules.
    order = np.argsort(aggregated.obs_names.astype(int))
    ids = aggregated.obs_names.astype(int)[order]
    expected = cells.X[ids].toarray() if hasattr(cells.X, "toarray") else np.asarray(cells.X)[ids]
    assert np.allclose(aggregated.X[order].toarray(), expected, rtol=1e-4, atol=1e-4)
    assert aggregated.uns["undiffuse"]["aggregation"]["unassigned_share"]["X"] == pytest.approx(0, abs=1e-7)
    n_bins = truth.obs["cell"].value_counts()
    assert (aggregated.obs["n_bins"].to_numpy() == n_bins.reindex(aggregated.obs_names.astype(int))).all()


def test_diffused_counts_outside_cells_are_reported(fine, cell_table):
    labels = read_cell_labels(cell_table, fine)
    aggregated = aggregate_cells(fine, labels)
    in_cell = fine.obs_names.isin(labels.index)
    expected = float(fine.X[~in_cell].sum() / fine.X.sum())
    assert 0 < expected < 1
    assert aggregated.uns["undiffuse"]["aggregation"]["unassigned_share"]["X"] == pytest.approx(expected)
    assert aggregated.X.sum() == pytest.approx(fine.X[in_cell].sum())


def test_a_label_image_gives_the_same_cells_as_the_table(fine, cell_table, tmp_path):
    table = read_cell_labels(cell_table, fine)
    centres = np.rint(fine.obsm["spatial"]).astype(np.int64)
    image = np.zeros((centres[:, 1].max() + 1, centres[:, 0].max() + 1), dtype=np.int32)
    where = fine.obs_names.get_indexer(table.index)
    image[centres[where, 1], centres[where, 0]] = table.astype(int).to_numpy() + 1
    np.save(tmp_path / "labels.npy", image)
    from_image = read_cell_labels(tmp_path / "labels.npy", fine)
    assert (from_image.astype(int) - 1).sort_index().equals(table.astype(int).sort_index())


def test_bad_requests_name_the_problem(fine, tmp_path):
    with pytest.raises(InputError, match="multiple of 2 um"):
        aggregate_bins(fine, 5)
    bad = tmp_path / "cells.csv"
    bad.write_text("bin,cell\ns_002um_00000_00000-1,1\n")
    with pytest.raises(InputError, match="lacks the column"):
        read_cell_labels(bad, fine)
    other = tmp_path / "other.csv"
    other.write_text("barcode,cell_id\nAAAC-1,1\n")
    with pytest.raises(InputError, match="labels none of the sample's bins"):
        read_cell_labels(other, fine)
    visium = read_sample(simulate_sample(tmp_path / "visium", n_rows=12, n_cols=12, n_genes=8))
    with pytest.raises(InputError, match="not a Visium HD sample"):
        aggregate_bins(visium, 8)


def test_command_writes_bins_and_cells(fine, cell_table, tmp_path):
    sample = tmp_path / "fine.h5ad"
    fine.write_h5ad(sample)
    out = tmp_path / "aggregated"
    command = [sys.executable, "-m", "undiffuse", "aggregate", str(sample), "-o", str(out)]
    done = subprocess.run(
        [*command, "--bin-sizes", "8", "16", "--cells", str(cell_table)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["cells.h5ad", "square_008um.h5ad", "square_016um.h5ad"]
    assert anndata.read_h5ad(out / "square_016um.h5ad").n_obs == (512 // 16) ** 2
    failed = subprocess.run([*command, "--bin-sizes", "3"], capture_output=True, text=True)
    assert failed.returncode == 2 and "Traceback" not in failed.stderr
    assert "multiple of 2 um" in failed.stderr.strip().splitlines()[-1]
