"""Metrics: each on small hand-computed cases, then the whole evaluation on a sample with a known kernel."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from anndata import AnnData

from undiffuse import metrics
from undiffuse.diffusion import diffuse
from undiffuse.moran import morans_i_numpy, spatial_weights
from undiffuse.qc import arc_score

# Forward model of the synthetic sample below; the re-diffusion of the tests uses the same kernel.
SCALE, BLEED, DISTAL = 1.2, 0.3, 0.05


def test_rmse_by_hand():
    estimate = np.array([[1.0, 2.0], [3.0, 4.0]])
    reference = np.array([[1.0, 0.0], [1.0, 4.0]])
    np.testing.assert_allclose(metrics.rmse(estimate, reference), [np.sqrt(2.0), np.sqrt(2.0)])
    assert metrics.pooled_rmse(estimate, reference) == pytest.approx(np.sqrt(8.0 / 4.0))
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.rmse(estimate, reference[:1])


def test_pearson_by_hand():
    x = np.array([1.0, 2.0, 3.0, 4.0])
    columns = np.column_stack([x, x, x, x])
    others = np.column_stack([2 * x + 1, -x, [1.0, 3.0, 2.0, 4.0], np.full(4, 7.0)])
    # Third column: centred products sum to 4, centred squares to 5 and 5, so r = 4 / 5.
    np.testing.assert_allclose(metrics.pearson(others, columns), [1.0, -1.0, 0.8, 0.0], atol=1e-12)


def test_pearson_of_float32_constant_is_zero_not_noise():
    constant = np.full((50, 1), 0.1, dtype=np.float32)
    assert metrics.pearson(constant, np.arange(50.0)[:, None])[0] == 0.0


def test_out_of_tissue_fraction_by_hand():
    counts = np.array([[1.0, 0.0, 0.0], [3.0, 2.0, 0.0], [4.0, 0.0, 0.0]])
    tissue = np.array([True, True, False])
    np.testing.assert_allclose(metrics.out_of_tissue_fraction(counts, tissue), [0.5, 0.0, 0.0])


def test_arc_score_by_hand():
    # Tissue spots hold 10 and 30 UMIs (mean 20); background 2 + 6 = 8 UMIs over 4 spots: ARC = 2 / 20.
    totals = np.array([10.0, 30.0, 2.0, 6.0])
    assert arc_score(totals, np.array([True, True, False, False])) == pytest.approx(0.1)


def test_relative_change_by_hand():
    before = np.array([[2.0, 0.0], [2.0, 0.0]])
    after = np.array([[1.0, 1.0], [3.0, 0.0]])
    np.testing.assert_allclose(metrics.relative_change(before, after), [0.5, 0.0])


def test_marker_specificity_by_hand():
    counts = np.array([[5.0, 1.0], [3.0, 1.0], [2.0, 2.0], [10.0, 9.0]])
    regions = np.array(["A", "A", "B", "A"])
    tissue = np.array([True, True, True, False])
    # Gene 0 marks A: 8 of its 10 in-tissue UMIs lie in A; gene 1 marks B: 2 of 4. Background is ignored.
    share = metrics.marker_specificity(counts, regions, np.array(["A", "B"]), tissue=tissue)
    np.testing.assert_allclose(share, [0.8, 0.5])


def hex_grid(n_rows: int, n_cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Visium array indices: a row holds every other column, odd rows shifted by one."""
    rows = np.repeat(np.arange(n_rows), n_cols)
    cols = 2 * np.tile(np.arange(n_cols), n_rows) + rows % 2
    return rows, cols


def test_coarse_blocks_hold_two_by_two_neighbours_on_the_hex_grid():
    rows, cols = hex_grid(4, 4)
    labels = metrics.coarse_blocks(rows, cols)
    assert np.bincount(labels).tolist() == [4, 4, 4, 4]
    block = {(r, c) for r, c, label in zip(rows, cols, labels, strict=True) if label == labels[0]}
    assert block == {(0, 0), (0, 2), (1, 1), (1, 3)}


def test_coarse_blocks_on_a_square_grid():
    rows, cols = np.repeat(np.arange(4), 4), np.tile(np.arange(4), 4)
    labels = metrics.coarse_blocks(rows, cols)
    assert np.bincount(labels).tolist() == [4, 4, 4, 4]
    assert labels[0] == labels[1] == labels[4] == labels[5]


def test_aggregate_blocks_sums_within_blocks():
    values = np.arange(8.0).reshape(4, 2)
    np.testing.assert_allclose(metrics.aggregate_blocks(values, np.array([0, 1, 0, 1])), [[4, 6], [8, 10]])


def test_consistency_table_is_perfect_for_a_perfect_prediction():
    rows, cols = hex_grid(4, 4)
    observed = np.random.default_rng(0).poisson(5.0, size=(16, 3)).astype(float)
    table = metrics.consistency_table(
        observed, observed, 0.5 * observed, metrics.coarse_blocks(rows, cols), ["a", "b", "c"]
    )
    np.testing.assert_allclose(table[["rmse_rediffused", "rmse_rediffused_2x2"]], 0.0)
    np.testing.assert_allclose(table[["pearson_rediffused", "pearson_rediffused_2x2"]], 1.0)
    # Half the field: perfectly correlated, but off by half the counts.
    np.testing.assert_allclose(table["rmse_corrected"], metrics.rmse(0.5 * observed, observed))


def known_kernel_sample(n_rows: int = 14, n_cols: int = 12) -> tuple[AnnData, AnnData, np.ndarray]:
    """A sample whose corrected field is the truth and whose raw counts are its exact diffusion.

    Returns the corrected AnnData, the truth and the ``(N, 2)`` coordinates in spot pitches.
    """
    rows, cols = hex_grid(n_rows, n_cols)
    pitch_xy = np.column_stack([cols / 2.0, rows * np.sqrt(3) / 2.0])
    centre = pitch_xy.mean(axis=0)
    tissue = np.hypot(*((pitch_xy - centre) / [4.0, 4.0]).T) <= 1.0
    domain = np.where(pitch_xy[:, 0] < centre[0], "left", "right")
    genes = ["left_a", "left_b", "right_a", "house", "pass"]
    truth_field = np.column_stack(
        [
            np.where(domain == "left", 8.0, 0.5),
            np.where(domain == "left", 4.0, 0.2),
            np.where(domain == "right", 6.0, 0.4),
            3.0 + pitch_xy[:, 1] / 4.0,
            np.full(len(rows), 2.0),
        ]
    )
    truth_field[~tissue] = 0.0
    observed = diffuse(truth_field, pitch_xy, tissue, scale=SCALE, bleed=BLEED, distal=DISTAL)
    passed = np.array([False, False, False, False, True])
    corrected_field = np.where(passed, observed, truth_field)
    barcodes = [f"spot{i}" for i in range(len(rows))]
    obs = pd.DataFrame(
        {"in_tissue": tissue, "tissue": tissue, "array_row": rows, "array_col": cols}, index=barcodes
    )
    corrected = AnnData(
        X=sp.csr_matrix(observed),
        obs=obs,
        var=pd.DataFrame({"undiffuse_corrected": ~passed}, index=genes),
        layers={"corrected": corrected_field},
        obsm={"spatial": pitch_xy * 100.0},
    )
    corrected.uns["undiffuse"] = {"sample_id": "known", "spot_pitch_px": 100.0}
    truth = AnnData(
        X=truth_field.astype(np.float32),
        obs=pd.DataFrame({"domain": domain}, index=barcodes),
        var=pd.DataFrame({"marker_of": ["left", "left", "right", "", ""]}, index=genes),
    )
    return corrected, truth, pitch_xy


def known_rediffuse(pitch_xy: np.ndarray, tissue: np.ndarray):
    def rediffuse(adata: AnnData) -> np.ndarray:
        return diffuse(
            np.asarray(adata.layers["corrected"]), pitch_xy, tissue, scale=SCALE, bleed=BLEED, distal=DISTAL
        )

    return rediffuse


@pytest.fixture(scope="module")
def known_sample():
    corrected, truth, pitch_xy = known_kernel_sample()
    rediffuse = known_rediffuse(pitch_xy, corrected.obs["tissue"].to_numpy())
    markers = pd.DataFrame({"cell_type": ["left", "left", "right"], "gene": ["left_a", "left_b", "right_a"]})
    tables = metrics.evaluate_sample(corrected, truth=truth, markers=markers, rediffuse=rediffuse)
    return corrected, truth, tables


def summary_value(tables: dict[str, pd.DataFrame], metric: str, stage: str) -> float:
    summary = tables["summary"]
    return float(summary.loc[(summary["metric"] == metric) & (summary["stage"] == stage), "value"].item())


def test_evaluate_sample_consistency_is_exact_with_the_known_kernel(known_sample):
    _, _, tables = known_sample
    consistency = tables["consistency"]
    assert list(consistency.index) == ["left_a", "left_b", "right_a", "house"]
    np.testing.assert_allclose(consistency[["rmse_rediffused", "rmse_rediffused_2x2"]], 0.0, atol=1e-9)
    np.testing.assert_allclose(consistency[["pearson_rediffused", "pearson_rediffused_2x2"]], 1.0, atol=1e-9)
    # The undiffused field itself does not reproduce the observation, which holds the diffusion.
    assert (consistency["rmse_corrected"] > 0.05).all()
    assert summary_value(tables, "consistency_rmse", "rediffused") == pytest.approx(0.0, abs=1e-9)
    assert summary_value(tables, "consistency_rmse", "corrected") > 0.05


def test_evaluate_sample_truth_metrics(known_sample):
    corrected, truth, tables = known_sample
    table = tables["truth"]
    np.testing.assert_allclose(
        table.loc[["left_a", "left_b", "right_a", "house"], "rmse_corrected"], 0.0, atol=1e-6
    )
    np.testing.assert_allclose(
        table.loc[["left_a", "left_b", "right_a"], "pearson_corrected"], 1.0, atol=1e-6
    )
    tissue = corrected.obs["tissue"].to_numpy()
    raw = corrected.X.toarray()[tissue]
    expected = metrics.rmse(raw, truth.X[tissue])
    np.testing.assert_allclose(table["rmse_raw"], expected, rtol=1e-6)
    assert summary_value(tables, "truth_rmse", "raw") == pytest.approx(
        metrics.pooled_rmse(raw, truth.X[tissue])
    )
    assert summary_value(tables, "truth_pearson", "corrected") > summary_value(tables, "truth_pearson", "raw")


def test_evaluate_sample_marker_specificity_recovers_the_truth(known_sample):
    _, _, tables = known_sample
    markers = tables["markers"]
    assert markers["region"].to_dict() == {"left_a": "left", "left_b": "left", "right_a": "right"}
    np.testing.assert_allclose(markers["specificity_corrected"], markers["specificity_truth"], rtol=1e-6)
    assert (markers["specificity_raw"] < markers["specificity_truth"]).all()


def test_evaluate_sample_border_halfwidth_is_the_truths_after_a_perfect_correction(known_sample):
    _, _, tables = known_sample
    markers = tables["markers"]
    np.testing.assert_allclose(markers["halfwidth_corrected"], markers["halfwidth_truth"], rtol=1e-6)
    # The truth is a step at the border; diffusion widens every marker's rise.
    assert (markers["halfwidth_raw"] > markers["halfwidth_truth"]).all()
    assert summary_value(tables, "border_halfwidth", "raw") == pytest.approx(
        float(np.median(markers["halfwidth_raw"]))
    )
    assert "border_halfwidth" in metrics.METRIC_DESCRIPTIONS


def test_a_marker_that_does_not_rise_into_its_region_gets_a_note_not_nan(known_sample, tmp_path):
    corrected, truth, _ = known_sample
    known = (known_kernel_sample()[2], corrected.obs["tissue"].to_numpy())
    mislabelled = truth.copy()
    mislabelled.var["marker_of"] = ["left", "left", "left", "", ""]  # right_a falls into "left"
    with pytest.warns(UserWarning, match="border_halfwidth_raw: 1 of 3 markers do not rise"):
        tables = metrics.evaluate_sample(corrected, truth=mislabelled, rediffuse=known_rediffuse(*known))
    markers = tables["markers"]
    assert markers.loc["right_a", "halfwidth_raw"] == metrics.BORDER_REACH
    assert np.isfinite(markers[["halfwidth_raw", "halfwidth_corrected", "halfwidth_truth"]]).all().all()
    assert summary_value(tables, "border_halfwidth", "truth") == pytest.approx(
        float(np.median(markers.loc[["left_a", "left_b"], "halfwidth_truth"]))
    )
    metrics.write_metrics(tables, tmp_path / "metrics")


def test_evaluate_sample_before_after_tables(known_sample):
    corrected, _, tables = known_sample
    genes = tables["genes"]
    tissue = corrected.obs["tissue"].to_numpy()
    raw = corrected.X.toarray()
    np.testing.assert_allclose(genes["out_of_tissue_raw"], metrics.out_of_tissue_fraction(raw, tissue))
    np.testing.assert_allclose(
        genes["out_of_tissue_corrected"], [0, 0, 0, 0, genes["out_of_tissue_raw"]["pass"]]
    )
    np.testing.assert_allclose(genes["moran_raw"], morans_i_numpy(raw, spatial_weights(corrected)))
    assert genes["passed_through"].tolist() == [False, False, False, False, True]
    assert genes.loc["pass", "relative_change"] == 0.0
    assert summary_value(tables, "arc_score", "raw") == pytest.approx(arc_score(raw.sum(axis=1), tissue))
    assert summary_value(tables, "out_of_tissue_fraction", "raw") == pytest.approx(
        raw[~tissue].sum() / raw.sum()
    )
    assert summary_value(tables, "moran_i_mean", "raw") == pytest.approx(genes["moran_raw"][:4].mean())


def test_evaluate_sample_cell_types_against_the_regions(known_sample):
    corrected, _, tables = known_sample
    cell_types = tables["cell_types"]
    assert len(cell_types) == int(corrected.obs["tissue"].sum())
    assert (cell_types["cell_type_corrected"] == cell_types["region"]).all()
    assert summary_value(tables, "cell_type_accuracy", "corrected") == 1.0


def test_evaluate_sample_reads_morans_i_the_merge_stored():
    """Moran's I is computed once, by the merge: the metrics read it from var instead of computing it again."""
    corrected, _, _ = known_kernel_sample(8, 8)
    corrected.var["undiffuse_moran_raw"] = np.arange(5.0)
    corrected.var["undiffuse_moran_corrected"] = np.arange(5.0) + 10
    tables = metrics.evaluate_sample(corrected, rediffuse=lambda a: np.asarray(a.layers["corrected"]))
    np.testing.assert_array_equal(tables["genes"]["moran_raw"], np.arange(5.0))
    np.testing.assert_array_equal(tables["genes"]["moran_corrected"], np.arange(5.0) + 10)
    assert summary_value(tables, "moran_i_mean", "corrected") == pytest.approx(11.5)


def test_evaluate_sample_without_the_learned_model_notes_the_gap():
    corrected, _, _ = known_kernel_sample(8, 8)

    def incomplete_model(adata: AnnData) -> np.ndarray:
        return adata.uns["undiffuse"]["correction"]  # what correct.rediffuse needs and a bare AnnData lacks

    with pytest.warns(UserWarning, match="consistency"):
        tables = metrics.evaluate_sample(corrected, rediffuse=incomplete_model)
    assert "consistency" not in tables
    assert "learned diffusion model lacks" in tables["notes"].loc["consistency", "note"]
    assert not tables["summary"]["metric"].str.startswith("consistency").any()


def test_evaluate_sample_rejects_a_truth_of_other_spots():
    corrected, truth, _ = known_kernel_sample(8, 8)
    with pytest.raises(ValueError, match="truth lacks"):
        metrics.evaluate_sample(corrected, truth=truth[:10].copy(), rediffuse=lambda a: a.layers["corrected"])


def test_write_and_read_metrics_round_trip(known_sample, tmp_path):
    _, _, tables = known_sample
    folder = metrics.write_metrics(tables, tmp_path / "metrics")
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [f"{name}.tsv" for name in tables] + ["metrics.json"]
    )
    back = metrics.read_metrics(folder)
    pd.testing.assert_frame_equal(back["summary"], tables["summary"])
    pd.testing.assert_frame_equal(back["truth"], tables["truth"], check_names=False)
    nested = json.loads((folder / "metrics.json").read_text())
    for metric, stage, value in tables["summary"].itertuples(index=False):
        assert nested[metric][stage] == pytest.approx(value)


def test_write_metrics_refuses_nan_and_leaves_nothing(tmp_path):
    summary = pd.DataFrame({"metric": ["m"], "stage": ["raw"], "value": [np.nan]})
    with pytest.raises(ValueError, match="NaN or Inf"):
        metrics.write_metrics({"summary": summary}, tmp_path / "metrics")
    assert not (tmp_path / "metrics").exists()


def test_a_sparse_truth_gives_the_same_metrics_as_a_dense_one(known_sample):
    """The Visium HD truth is CSR: the truth tables do not depend on how X is stored."""
    corrected, truth, tables = known_sample
    sparse_truth = truth.copy()
    sparse_truth.X = sp.csr_matrix(truth.X)
    sparse = metrics.evaluate_sample(corrected, truth=sparse_truth)
    pd.testing.assert_frame_equal(sparse["truth"], tables["truth"])
    pd.testing.assert_frame_equal(sparse["markers"], tables["markers"])


def test_markers_of_cell_types_that_are_not_regions_get_a_note(known_sample):
    """The HD truth's markers mark cell types, while its bins carry domains: no marker specificity (it would
    read 0 for every marker), a note instead; the border half-width is taken across the border of each
    marker's home domains, which here are the regions it marks; RMSE and Pearson are still computed."""
    corrected, truth, tables = known_sample
    cell_typed = truth.copy()
    cell_typed.var["marker_of"] = ["type1", "type1", "type2", "", ""]
    with pytest.warns(UserWarning, match="marker_specificity: not computed"):
        result = metrics.evaluate_sample(corrected, truth=cell_typed)
    assert "cell types, not the regions" in result["notes"].loc["marker_specificity", "note"]
    assert "marker_specificity" not in set(result["summary"]["metric"])
    markers = result["markers"]
    assert (
        markers["home_domains"].tolist() == tables["markers"]["region"].tolist() == ["left", "left", "right"]
    )
    assert not markers.columns.str.startswith("specificity").any()
    halfwidths = [f"halfwidth_{stage}" for stage in ("raw", "corrected", "truth")]
    pd.testing.assert_frame_equal(markers[halfwidths], tables["markers"][halfwidths])
    pd.testing.assert_frame_equal(result["truth"], tables["truth"])


def test_evaluate_sample_makes_dense_only_the_columns_a_metric_needs(known_sample, monkeypatch):
    """A sample holds every gene of the slide (a Visium HD slide: hundreds of thousands of bins x 18,000 genes):
    the metrics keep the stages sparse and make dense only the corrected genes, the truth's and the markers',
    with the same tables as before."""
    corrected, truth, tables = known_sample
    n_extra = 40
    extra = sp.random(corrected.n_obs, n_extra, density=0.1, format="csr", random_state=0) * 10
    wide = AnnData(
        X=sp.hstack([corrected.X, extra], format="csr"),
        obs=corrected.obs,
        var=pd.DataFrame(
            {"undiffuse_corrected": np.r_[corrected.var["undiffuse_corrected"], np.zeros(n_extra, bool)]},
            index=[*corrected.var_names, *(f"extra{i}" for i in range(n_extra))],
        ),
        layers={"corrected": np.hstack([corrected.layers["corrected"], extra.toarray()])},
        obsm=dict(corrected.obsm),
        uns=dict(corrected.uns),
    )
    densified = []
    original = metrics.as_dense

    def recording_as_dense(matrix, **kwargs):
        dense = original(matrix, **kwargs)
        densified.append(dense.shape[1] if dense.ndim == 2 else 1)
        return dense

    monkeypatch.setattr(metrics, "as_dense", recording_as_dense)
    markers = pd.DataFrame({"cell_type": ["left", "left", "right"], "gene": ["left_a", "left_b", "right_a"]})
    pitch_xy = known_kernel_sample()[2]
    rediffuse = known_rediffuse(pitch_xy, corrected.obs["tissue"].to_numpy())
    wide_tables = metrics.evaluate_sample(wide, truth=truth, markers=markers, rediffuse=rediffuse)
    assert densified and max(densified) <= corrected.n_vars  # never the 45 columns of the whole sample
    for name in ("truth", "markers", "consistency"):
        pd.testing.assert_frame_equal(wide_tables[name], tables[name])
    pd.testing.assert_frame_equal(wide_tables["genes"].iloc[: corrected.n_vars], tables["genes"])
    assert (wide_tables["genes"]["relative_change"].iloc[corrected.n_vars :] == 0).all()
