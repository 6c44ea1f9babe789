"""Cell-type localisation (C3-Diff supplementary, section 4) on toy examples with known answers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from anndata import AnnData

from undiffuse.celltypes import (
    assign_types,
    compare_cell_types,
    localise_cell_types,
    marker_sets,
    minmax_scale,
    read_markers,
    type_scores,
)
from undiffuse.errors import InputError
from undiffuse.package_data import MARKERS_DIR

MARKERS = pd.DataFrame({"cell_type": ["A", "A", "B"], "gene": ["a1", "a2", "b1"]})

# Toy maps on six spots: the first three are type A, the last three type B.
TOY = pd.DataFrame(
    {
        "a1": [10.0, 8.0, 6.0, 0.0, 0.0, 2.0],  # scaled: 1, .8, .6, 0, 0, .2
        "a2": [5.0, 5.0, 3.0, 1.0, 0.0, 1.0],  # scaled: 1, 1, .6, .2, 0, .2
        "b1": [0.0, 1.0, 2.0, 8.0, 10.0, 9.0],  # scaled: 0, .1, .2, .8, 1, .9
    },
    index=[f"s{i}" for i in range(6)],
)


def test_minmax_scale_by_hand():
    values = np.array([[0.0, 5.0], [5.0, 5.0], [10.0, 5.0]])
    np.testing.assert_allclose(minmax_scale(values), [[0.0, 0.0], [0.5, 0.0], [1.0, 0.0]])


def test_type_scores_and_types_of_the_toy_example():
    scores = type_scores(TOY.to_numpy(), list(TOY.columns), marker_sets(MARKERS, TOY.columns))
    np.testing.assert_allclose(scores["A"], [1.0, 0.9, 0.6, 0.1, 0.0, 0.2])
    np.testing.assert_allclose(scores["B"], [0.0, 0.1, 0.2, 0.8, 1.0, 0.9])
    assigned = assign_types(scores)
    assert assigned["cell_type"].tolist() == ["A", "A", "A", "B", "B", "B"]
    np.testing.assert_allclose(assigned["score"], [1.0, 0.9, 0.6, 0.8, 1.0, 0.9])


def test_ties_go_to_the_type_listed_first():
    assigned = assign_types(pd.DataFrame({"B": [0.5], "A": [0.5]}))
    assert assigned["cell_type"].tolist() == ["B"]


def test_marker_sets_ignore_unmeasured_genes_and_types():
    markers = pd.DataFrame({"cell_type": ["A", "A", "C"], "gene": ["a1", "missing", "absent"]})
    assert marker_sets(markers, ["a1", "b1"]) == {"A": ["a1"]}


def toy_sample() -> AnnData:
    """The toy maps as the corrected layer, with raw counts in which diffusion blurred spot s2 towards B, and
    one background spot whose large counts must not set the scale."""
    corrected = pd.concat([TOY, pd.DataFrame([[0.0, 0.0, 0.0]], columns=TOY.columns, index=["bg"])])
    raw = corrected.copy()
    raw.loc["s2"] = [3.0, 1.0, 9.0]
    raw.loc["bg"] = [40.0, 40.0, 40.0]
    obs = pd.DataFrame({"tissue": [True] * 6 + [False]}, index=corrected.index)
    return AnnData(
        X=sp.csr_matrix(raw.to_numpy()),
        obs=obs,
        var=pd.DataFrame(index=TOY.columns),
        layers={"corrected": corrected.to_numpy()},
    )


def test_localise_cell_types_scales_over_the_typed_spots_only():
    adata = toy_sample()
    typed = localise_cell_types(adata, MARKERS, layer="corrected", spots=adata.obs["tissue"].to_numpy())
    assert list(typed.index) == list(TOY.index)
    assert typed["cell_type"].tolist() == ["A", "A", "A", "B", "B", "B"]
    np.testing.assert_allclose(typed["score_A"], [1.0, 0.9, 0.6, 0.1, 0.0, 0.2])


def test_compare_cell_types_before_and_after():
    table = compare_cell_types(toy_sample(), MARKERS)
    assert list(table.columns) == ["cell_type_raw", "score_raw", "cell_type_corrected", "score_corrected"]
    assert table.loc["s2", "cell_type_raw"] == "B"  # the blurred spot
    assert table["cell_type_corrected"].tolist() == ["A", "A", "A", "B", "B", "B"]
    assert table.loc["s2", "score_raw"] == pytest.approx(0.9)  # b1 = 9 on a 0..10 scale


def test_no_measured_marker_is_an_error():
    with pytest.raises(ValueError, match="none of the marker genes"):
        localise_cell_types(toy_sample(), pd.DataFrame({"cell_type": ["X"], "gene": ["absent"]}))


def test_read_markers(tmp_path):
    path = tmp_path / "markers.tsv"
    path.write_text("cell_type\tgene\nA\ta1\nA\ta1\nB\t b1 \n")
    assert read_markers(path).to_dict("list") == {"cell_type": ["A", "B"], "gene": ["a1", "b1"]}


@pytest.mark.parametrize(
    ("content", "problem"),
    [("type\tgene\nA\ta1\n", "missing \\['cell_type'\\]"), ("cell_type\tgene\n", "lists no marker")],
)
def test_read_markers_rejects_bad_tables(tmp_path, content, problem):
    path = tmp_path / "markers.tsv"
    path.write_text(content)
    with pytest.raises(InputError, match=problem) as err:
        read_markers(path)
    assert err.value.path == str(path)


def test_read_markers_missing_file(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_markers(tmp_path / "absent.tsv")


@pytest.mark.realdata
def test_mouse_brain_markers_are_genes_of_the_real_data(shared_data):
    import h5py

    with h5py.File(
        shared_data / "visium_mouse_brain_raw_top100" / "outs" / "raw_feature_bc_matrix.h5"
    ) as handle:
        genes = {name.decode() for name in handle["matrix/features/name"][:]}
    markers = read_markers(MARKERS_DIR / "mouse_brain.tsv")
    assert set(markers["gene"]) <= genes
    sets = marker_sets(markers, sorted(genes))
    assert {"neuron", "oligodendrocyte", "astrocyte", "choroid_plexus"} <= set(sets)
