"""The validation layer (undiffuse/validate.py), check by check, on small in-memory data."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse as sp
from anndata import AnnData

from undiffuse.errors import InputError, UndiffuseWarning
from undiffuse.validate import (
    MIN_TISSUE_SPOTS,
    check_correct_input,
    check_counts,
    check_genes,
    check_not_empty,
    check_prepared,
    check_registration,
    check_tissue,
    check_unique_barcodes,
    failed_genes,
    unique_gene_names,
)


def _counts() -> np.ndarray:
    return np.arange(12, dtype=np.float32).reshape(4, 3)


@pytest.mark.parametrize(
    ("value", "kind"),
    [(np.nan, "NaN or infinite"), (np.inf, "NaN or infinite"), (-2.0, "negative"), (1.5, "non-integer")],
)
@pytest.mark.parametrize("sparse", [False, True])
def test_counts_must_be_finite_non_negative_integers(value, kind, sparse):
    counts = _counts()
    counts[2, 1] = value
    matrix = sp.csr_matrix(counts) if sparse else counts
    with pytest.raises(InputError) as caught:
        check_counts(matrix, "sample.h5", barcodes=["a", "b", "c", "d"], genes=["g0", "g1", "g2"])
    message = str(caught.value)
    assert caught.value.path == "sample.h5"
    assert f"1 {kind} value(s)" in message and "gene g1, spot c" in message and "raw UMI counts" in message


def test_valid_counts_pass_in_every_dtype():
    for matrix in (_counts(), _counts().astype(np.int32), sp.csr_matrix(_counts().astype(np.float64))):
        assert check_counts(matrix, "x.h5") is None


def test_empty_matrices_are_named():
    with pytest.raises(InputError, match="holds no spot"):
        check_not_empty(np.zeros((0, 3)), "m.h5")
    with pytest.raises(InputError, match="holds no gene"):
        check_not_empty(sp.csr_matrix((4, 0)), "m.h5")
    with pytest.raises(InputError, match="every count in the matrix is zero"):
        check_not_empty(sp.csr_matrix((4, 3)), "m.h5")
    assert check_not_empty(sp.csr_matrix((4, 3)), "m.h5", require_counts=False) is None


def test_duplicate_barcodes_are_an_error_and_duplicate_genes_a_warning():
    with pytest.raises(InputError, match=r"lists 1 barcode\(s\) more than once \(e.g. AAA-1\)"):
        check_unique_barcodes(["AAA-1", "CCC-1", "AAA-1"], "m.h5")
    with pytest.warns(UndiffuseWarning, match=r"m.h5: 1 gene name\(s\) occur more than once \(e.g. Actb\)"):
        names = unique_gene_names(["Actb", "Gapdh", "Actb", "Actb-1"], "m.h5")
    assert list(names) == ["Actb", "Gapdh", "Actb-2", "Actb-1"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert list(unique_gene_names(["a", "b"], "m.h5")) == ["a", "b"]


def test_tissue_checks_and_their_override():
    totals = np.full(400, 10.0)
    tissue = np.zeros(400, dtype=bool)
    tissue[:200] = True
    stats = check_tissue(tissue, totals, "pos.csv")
    assert stats.n_tissue == 200 and stats.umi_share == pytest.approx(0.5)
    few = np.zeros(400, dtype=bool)
    few[:10] = True
    with pytest.raises(InputError, match="degenerate tissue: only 10 of 400 spots are in tissue") as caught:
        check_tissue(few, totals, "pos.csv")
    assert caught.value.path == "pos.csv" and "--allow-degenerate-tissue" in str(caught.value)
    with pytest.warns(UndiffuseWarning, match="overridden"):
        assert check_tissue(few, totals, "pos.csv", allow_degenerate=True).n_tissue == 10
    dim = totals.copy()
    dim[tissue] = 0.1
    with pytest.raises(InputError, match=r"the 200 tissue spots hold only 1.0% of the UMIs"):
        check_tissue(tissue, dim, "pos.csv")
    with pytest.raises(InputError, match="no spot is in tissue"):
        check_tissue(np.zeros(400, dtype=bool), totals, "pos.csv", allow_degenerate=True)
    assert MIN_TISSUE_SPOTS > 10


@pytest.mark.parametrize("block_rows", [1, 4096])
def test_failed_genes_are_found_and_reported(monkeypatch, block_rows):
    monkeypatch.setattr("undiffuse.validate.FAILURE_CHECK_ROWS", block_rows)
    raw = np.array([[1, 5, 0, 0], [2, 0, 3, 0], [0, 1, 1, 0]], dtype=np.float32)
    corrected = np.array(
        [[1.5, np.nan, 0.0, 0.0], [1.5, 1.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]], dtype=np.float32
    )
    before = corrected.copy()
    with pytest.warns(UndiffuseWarning, match=r"2 gene\(s\) .*\(g1, g2\)"):
        failed = failed_genes(corrected, raw.sum(axis=0), ["g0", "g1", "g2", "g3"])
    # NaN, and all zero with counts, fail; all zero without counts does not.
    np.testing.assert_array_equal(failed, [False, True, True, False])
    np.testing.assert_array_equal(corrected, before)
    negative = np.array([[1.0, -1e-3], [1.0, 2.0]], dtype=np.float32)
    with pytest.warns(UndiffuseWarning, match=r"1 gene\(s\) .*\(b\)"):
        np.testing.assert_array_equal(failed_genes(negative, np.ones(2), ["a", "b"]), [False, True])


def _sample() -> AnnData:
    rng = np.random.default_rng(0)
    rows, cols = np.meshgrid(np.arange(20), np.arange(20), indexing="ij")
    coords = np.column_stack([cols.ravel() * 100.0 + 50 * (rows.ravel() % 2), rows.ravel() * 86.6]) + 200
    tissue = np.hypot(*(coords - coords.mean(axis=0)).T) < 600
    adata = AnnData(
        sp.csr_matrix(rng.poisson(np.where(tissue, 20, 2)[:, None], size=(400, 3)).astype(np.float32))
    )
    adata.obs_names = [f"s{i}" for i in range(400)]
    adata.var_names = ["Mbp", "Plp1", "Actb"]
    adata.var["gene_ids"] = ["ENS1", "ENS2", "ENS3"]
    adata.var["selected"] = True
    adata.obs["in_tissue"] = tissue
    adata.obs["tissue"] = tissue
    adata.obsm["spatial"] = coords
    image = np.ones((230, 230, 3), dtype=np.float32)
    scaled = (coords * 0.1).astype(int)
    image[scaled[tissue, 1], scaled[tissue, 0]] = 0.3
    adata.uns["spatial"] = {
        "toy": {
            "images": {"lowres": image},
            "scalefactors": {"spot_diameter_fullres": 55.0, "tissue_lowres_scalef": 0.1},
        }
    }
    adata.uns["undiffuse"] = {
        "sample_id": "toy",
        "platform": "visium",
        "spot_pitch_px": 100.0,
        "source": "toy.h5",
    }
    return adata


def test_registration_spot_size_and_image_scale():
    adata = _sample()
    assert check_registration(adata) is None
    adata.uns["spatial"]["toy"]["scalefactors"]["spot_diameter_fullres"] = 550.0
    with pytest.raises(InputError, match=r"spot_diameter_fullres = 550 pixels.*100 pixels apart") as caught:
        check_registration(adata, scalefactors_file="sf.json")
    assert caught.value.path == "sf.json"
    adata = _sample()
    adata.uns["spatial"]["toy"]["images"]["lowres"] = np.ones((900, 900, 3), dtype=np.float32)
    with pytest.warns(UndiffuseWarning, match=r"the spots span only .* of its 900 x 900 pixels"):
        check_registration(adata, image_files={"lowres": "lowres.png"})


def test_registration_detects_swapped_axes():
    adata = _sample()
    # Tissue on one side only, so that exchanging x and y moves it.
    coords = adata.obsm["spatial"]
    tissue = coords[:, 0] < coords[:, 0].min() + 700
    adata.obs["in_tissue"] = tissue
    image = np.ones((230, 230, 3), dtype=np.float32)
    scaled = (coords * 0.1).astype(int)
    image[scaled[tissue, 0], scaled[tissue, 1]] = 0.3  # drawn with x and y exchanged
    adata.uns["spatial"]["toy"]["images"]["lowres"] = image
    with pytest.raises(InputError, match="look swapped") as caught:
        check_registration(adata, positions_file="positions.csv", image_files={"lowres": "lowres.png"})
    assert caught.value.path == "positions.csv" and "lowres.png" in str(caught.value)


def test_prepared_and_correct_inputs():
    adata = _sample()
    assert check_prepared(adata, "prepared.h5ad").n_tissue == int(adata.obs["tissue"].sum())
    del adata.var["selected"]
    with pytest.raises(InputError, match=r"is not a prepared sample: it lacks var\['selected'\]"):
        check_prepared(adata, "prepared.h5ad")
    adata = _sample()
    adata.X.data[0] = np.nan
    with pytest.raises(InputError, match="NaN") as caught:
        check_correct_input(adata, ["Mbp"])
    assert caught.value.path == "toy.h5"
    adata = _sample()
    assert check_correct_input(adata, ["ENS2", "Mbp"]) == ["Plp1", "Mbp"]
    assert check_correct_input(adata) is None
    with pytest.raises(InputError, match="names Mbp more than once"):
        check_correct_input(adata, ["Mbp", "Mbp"])
    with pytest.raises(InputError, match=r"1 gene\(s\) are not in the matrix: Nope") as caught:
        check_genes(["Mbp", "Nope"], adata, "genes.txt")
    assert caught.value.path == "genes.txt"
    with pytest.raises(InputError, match="names no gene"):
        check_genes([], adata, None, what="--genes")
