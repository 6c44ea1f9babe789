"""A reference of cell types (undiffuse.reference): its reader and profiles, the Gamma prior centred on the
types' mixture (undiffuse.ot.prior.CentredPrior, undiffuse.ot.programmes.reference_centre) and correct's
``reference``."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from anndata import AnnData
from conftest import hex_sample, tissue_rmse

from undiffuse.correct import KEY, correct
from undiffuse.errors import ConfigError, InputError
from undiffuse.ot.prior import CentredPrior, centred_strength
from undiffuse.ot.programmes import poisson_nmf, reference_centre
from undiffuse.reference import (
    MIN_CELLS,
    profiles_for,
    read_profiles,
    read_reference,
    reference_profiles,
    write_profiles,
)


def cells(profiles: np.ndarray, n_cells: int, *, seed: int = 0, genes=None) -> AnnData:
    """``n_cells`` Poisson cells of each row of ``(types, G)`` ``profiles``, typed ``A``, ``B``, ..."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(profiles.shape[0]), n_cells)
    adata = AnnData(sp.csr_matrix(rng.poisson(profiles[labels]).astype(np.float32)))
    adata.obs["cell_type"] = pd.Categorical([chr(ord("A") + k) for k in labels])
    adata.var_names = genes if genes is not None else [f"gene{g}" for g in range(profiles.shape[1])]
    return adata


def test_profiles_are_type_means_without_untyped_cells_or_small_types():
    adata = AnnData(
        np.array([[1, 0], [3, 2], [5, 4], [7, 6], [9, 8], [0, 1], [0, 3], [0, 5], [2, 7], [2, 9]])
    )
    adata = adata[np.r_[np.arange(10), [0]]].copy()
    adata.obs["cell_type"] = ["a"] * 5 + ["b"] * 5 + [None]
    adata.var_names = ["x", "y"]
    tiny = adata[:2].copy()
    tiny.obs["cell_type"] = ["c", "c"]
    table = reference_profiles(AnnData.concatenate(adata, tiny, index_unique=None))
    assert list(table.columns) == ["a", "b"]  # "c" has fewer than MIN_CELLS cells, the untyped one is out
    np.testing.assert_allclose(table.loc["x"], [5.0, 0.8])
    np.testing.assert_allclose(table.loc["y"], [4.0, 5.0])
    assert MIN_CELLS == 5


def test_profiles_prefer_the_counts_layer():
    adata = cells(np.array([[10.0, 1.0], [1.0, 10.0]]), 10)
    adata.layers["counts"] = adata.X.copy()
    adata.X = adata.X * 0.0
    assert reference_profiles(adata).to_numpy().sum() > 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: a.obs.drop(columns="cell_type", inplace=True), "no obs column 'cell_type'"),
        (lambda a: a.X.data.__setitem__(0, -1.0), "negative, NaN or infinite"),
        (lambda a: a.obs.__setitem__("cell_type", "A"), "at least two cell types"),
    ],
)
def test_a_bad_reference_is_named_with_its_problem(tmp_path, change, message):
    adata = cells(np.array([[10.0, 1.0], [1.0, 10.0]]), 10)
    change(adata)
    path = tmp_path / "reference.h5ad"
    adata.write_h5ad(path)
    with pytest.raises(InputError, match=message) as err:
        read_reference(path)
    assert str(path) in str(err.value)


def test_a_missing_reference_file_is_named(tmp_path):
    with pytest.raises(InputError, match="reference not found"):
        read_reference(tmp_path / "absent.h5ad")


def test_profiles_table_round_trip_keeps_gene_names_as_text(tmp_path):
    table = pd.DataFrame({"A": [1.5, 0.0], "B": [2.0, 3.25]}, index=pd.Index(["NA", "TRUE"], name="gene"))
    write_profiles(table, tmp_path / "profiles.tsv")
    back = read_profiles(tmp_path / "profiles.tsv")
    pd.testing.assert_frame_equal(back, table)
    (tmp_path / "bad.tsv").write_text("just text\n")
    with pytest.raises(InputError, match="reference profiles"):
        read_profiles(tmp_path / "bad.tsv")


def test_profiles_match_genes_by_name_then_by_id():
    table = pd.DataFrame({"A": [1.0, 2.0], "B": [3.0, 4.0]}, index=["x", "ENSG2"])
    matrix = profiles_for(table, pd.Index(["x", "y", "z"]), pd.Index(["ENSG1", "ENSG2", "ENSG3"]))
    np.testing.assert_array_equal(matrix[:, :2], [[1.0, 2.0], [3.0, 4.0]])
    assert np.isnan(matrix[:, 2]).all()


def test_shaped_programmes_keep_their_shapes_and_fit_an_exact_mixture():
    rng = np.random.default_rng(0)
    shapes = rng.gamma(2.0, size=(3, 10))
    scales = rng.gamma(2.0, size=10)
    weights = rng.gamma(2.0, size=(80, 3))
    values = torch.as_tensor(weights @ (shapes * scales))
    start = torch.as_tensor(shapes)
    shaped = torch.ones(10, dtype=torch.bool)
    fitted_weights, programmes = poisson_nmf(values, 3, n_iter=3000, programmes=start, shaped=shaped)
    ratio = programmes / start
    torch.testing.assert_close(ratio, ratio[:1].expand_as(ratio))  # one scale per gene
    assert torch.linalg.norm(fitted_weights @ programmes - values) < 1e-3 * torch.linalg.norm(values)


def test_reference_centre_keeps_totals():
    rng = np.random.default_rng(1)
    field = rng.gamma(2.0, size=(35, 6))
    profiles = rng.gamma(2.0, size=(2, 6))
    profiles[:, 5] = np.nan  # a gene the reference lacks learns its own values
    centre = reference_centre(field, profiles).numpy()
    assert centre.shape == field.shape
    np.testing.assert_allclose(centre.sum(axis=0), field.sum(axis=0), rtol=1e-5)
    assert np.isfinite(centre).all() and (centre >= 0).all()


def test_centred_strength_recovers_the_gamma_shape():
    rng = np.random.default_rng(2)
    alpha = 50.0
    centre = torch.as_tensor(rng.uniform(20.0, 200.0, size=(4000, 3)))
    field = centre * torch.as_tensor(rng.gamma(alpha, 1.0 / alpha, size=centre.shape))
    counts = torch.as_tensor(rng.poisson(field.numpy()), dtype=torch.float64)
    strength = centred_strength(counts, centre, lambda z: z, 0)
    assert torch.all((strength > 0.8 * alpha) & (strength < 1.25 * alpha))
    prior = CentredPrior(centre, strength)
    update = prior.update(counts, counts)
    # The M-step shrinks towards the centre, never past it.
    assert torch.all((update - centre).abs() <= (counts - centre).abs() + 1e-9)


@pytest.fixture(scope="module")
def two_domains():
    """Twelve genes of two striped domains, varying from spot to spot by 25% around their domain's level, at
    tens of molecules per spot, and a reference of the two domains."""
    from undiffuse.diffusion import diffuse

    adata, truth = hex_sample(n_genes=12, depth=30.0, seed=3)
    rng = np.random.default_rng(4)
    tissue = adata.obs["in_tissue"].to_numpy(bool)
    domain = truth[:, 0] > truth[:, 0][tissue].min()  # gene 0 marks one domain
    profiles = np.stack([truth[tissue & ~domain].mean(axis=0), truth[tissue & domain].mean(axis=0)])
    truth = truth * np.exp(0.25 * rng.standard_normal(truth.shape) - 0.25**2 / 2)
    coords = adata.obsm["spatial"] / 100.0
    expected = diffuse(truth, coords, tissue, scale=np.full(12, 1.8), bleed=0.3, distal=0.01)
    adata.X = sp.csr_matrix(rng.poisson(expected).astype(np.float32))
    capture = np.exp(0.3 * rng.standard_normal(12))
    return adata, truth, cells(50 * profiles * capture / profiles.mean(), 40, genes=list(adata.var_names))


def test_a_reference_improves_the_correction_of_genes_it_describes(two_domains):
    adata, truth, reference = two_domains
    tissue = adata.obs["in_tissue"].to_numpy(bool)
    options = dict(epochs=5, progress=False, copy=True)
    plain = correct(adata, **options)
    guided = correct(adata, reference=reference, **options)
    values = guided.layers["corrected"].toarray()
    assert tissue_rmse(values, truth, tissue) < 0.93 * tissue_rmse(
        plain.layers["corrected"].toarray(), truth, tissue
    )
    np.testing.assert_allclose(values.sum(axis=0), adata.X.toarray().sum(axis=0), rtol=1e-4)
    assert (values[~tissue] == 0).all() and np.isfinite(values).all()
    config = guided.uns[KEY]["correction"]["config"]
    assert config["reference_types"] == "A,B" and config["programmes"] == 0
    assert (guided.var["undiffuse_prior_strength"] > 0).all()


def test_a_reference_from_file_or_table_gives_the_same_correction(two_domains, tmp_path):
    adata, _, reference = two_domains
    reference.write_h5ad(tmp_path / "reference.h5ad")
    write_profiles(reference_profiles(reference), tmp_path / "profiles.tsv")
    options = dict(epochs=2, progress=False, copy=True)
    from_file = correct(adata, reference=tmp_path / "reference.h5ad", **options).layers["corrected"]
    from_table = correct(adata, reference=str(tmp_path / "profiles.tsv"), **options).layers["corrected"]
    np.testing.assert_allclose(from_file.toarray(), from_table.toarray(), rtol=1e-5, atol=1e-6)


def test_a_reference_fixes_the_programmes_and_must_share_genes(two_domains):
    adata, _, reference = two_domains
    with pytest.raises(ConfigError, match="leave programmes at 'auto'"):
        correct(adata, reference=reference, programmes=4, progress=False, copy=True)
    foreign = reference.copy()
    foreign.var_names = [f"other{g}" for g in range(foreign.n_vars)]
    with pytest.raises(InputError, match="shares none of the 12 genes"):
        correct(adata, reference=foreign, progress=False, copy=True)


def test_the_simulator_writes_a_matching_reference(tiny_sample):
    import anndata as ad

    reference = ad.read_h5ad(tiny_sample / "reference.h5ad")
    truth = ad.read_h5ad(tiny_sample / "truth.h5ad")
    assert list(reference.var_names) == list(truth.var_names)
    table = reference_profiles(reference)
    assert sorted(table.columns) == sorted(set(truth.obs["domain"]) - {"background"})
    # Each domain's markers are highest in that domain's cells.
    markers = truth.var["gene_type"] == "marker"
    for gene in truth.var_names[markers.to_numpy()]:
        assert table.loc[gene].idxmax() == truth.var.loc[gene, "marker_of"]


@pytest.mark.slow
def test_cli_corrects_with_the_simulated_reference(tiny_sample, tmp_path, capsys):
    import anndata as ad

    from undiffuse.cli import main

    out = tmp_path / "corrected.h5ad"
    reference = tiny_sample / "reference.h5ad"
    args = ["correct", str(tiny_sample / "outs"), str(out), "--epochs", "2", "--quiet", "--reference"]
    assert main([*args, str(reference)]) == 0
    config = ad.read_h5ad(out).uns[KEY]["correction"]["config"]
    assert config["reference_types"] == "layer1,layer2,layer3,blob1,blob2"
    # A wrong column is one line naming the file and the fix, exit 2, nothing written.
    capsys.readouterr()
    second = tmp_path / "second.h5ad"
    args[2] = str(second)
    assert main([*args, str(reference), "--reference-key", "celltype"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and str(reference) in error and "--reference-key" in error
    assert not second.exists()


def test_shaped_low_rank_em_keeps_each_reference_profile_shape():
    from undiffuse.correct import CorrectionConfig, _geometry
    from undiffuse.diffusion import profile
    from undiffuse.model import DiffusionModel
    from undiffuse.ot.programmes import deconvolve_programmes

    adata, truth = hex_sample(n_genes=6, depth=8.0, seed=5)
    counts = adata.X.toarray()
    geometry = _geometry(
        adata, CorrectionConfig(progress=False), image=None, device=torch.device("cpu"), dtype=torch.float32
    )
    model = DiffusionModel(
        geometry, profile(torch.full((6,), 1.8), "gaussian"), torch.full((6,), 0.3), torch.zeros(6)
    )
    tissue = adata.obs["in_tissue"].to_numpy(bool)
    start = counts[tissue]
    shapes = np.array([[1.0, 2.0, 0.5, 1.0, 3.0, 1.0], [0.1, 0.2, 2.0, 1.0, 0.3, np.nan]])
    field = deconvolve_programmes(
        counts,
        start,
        [(slice(0, 6), model.kernel, model.bleed, model.distal)],
        geometry.tissue,
        2,
        profiles=shapes,
    )
    np.testing.assert_allclose(field.sum(axis=0), counts.sum(axis=0), rtol=1e-4)
    assert field.shape == start.shape
    # The five genes the reference holds are W B diag(s): with u = 1 / s, every spot's row of M diag(u) lies in
    # the row space of B, a linear condition on u that has a solution only if the shapes were kept.
    kept, complement = field[:, :5], np.linalg.svd(shapes[:, :5])[2][2:].T  # (5, 3)
    system = np.einsum("ig,gk->ikg", kept, complement).reshape(-1, 5)
    singular = np.linalg.svd(system, compute_uv=False)
    assert singular[-1] < 1e-4 * singular[0]
    free = deconvolve_programmes(
        counts, start, [(slice(0, 6), model.kernel, model.bleed, model.distal)], geometry.tissue, 2
    )
    free_system = np.einsum("ig,gk->ikg", free[:, :5], complement).reshape(-1, 5)
    assert np.linalg.svd(free_system, compute_uv=False)[-1] > 1e-2 * singular[0]


@pytest.mark.slow
def test_a_reference_on_visium_hd_gives_the_low_rank_model_its_cell_types(tmp_path):
    import anndata as ad

    from undiffuse.prepare import prepare_sample
    from undiffuse.simulate_hd import simulate_hd_sample

    simulate_hd_sample(tmp_path / "hd", width_um=512.0, height_um=512.0, n_genes=16, seed=3)
    adata = prepare_sample(
        tmp_path / "hd" / "outs" / "binned_outputs" / "square_008um", tmp_path / "p", min_counts=1
    )
    truth = ad.read_h5ad(tmp_path / "hd" / "truth" / "square_008um.h5ad")[adata.obs_names]
    genes = list(adata.var_names[adata.var["selected"].to_numpy(bool)])
    options = dict(genes=genes, epochs=5, progress=False, copy=True)
    plain = correct(adata, **options)
    guided = correct(adata, reference=tmp_path / "hd" / "reference.h5ad", **options)
    config = guided.uns[KEY]["correction"]["config"]
    assert config["programmes"] == 5 and config["reference_types"] == "type1,type2,type3,type4,type5"
    tissue = truth.obs["in_tissue"].to_numpy(bool)
    expected = truth[:, genes].X.toarray()

    def rmse(result):
        return tissue_rmse(result[:, genes].layers["corrected"].toarray(), expected, tissue)

    assert rmse(guided) < rmse(plain)


def test_a_reference_that_does_not_describe_the_genes_leaves_them_as_without_one(two_domains):
    adata, _, reference = two_domains
    # Every other gene's profile assigned to the other type: no mixture of the two describes the fields.
    swapped = reference_profiles(reference)
    swapped.iloc[::2] = swapped.iloc[::2, ::-1].to_numpy()
    options = dict(epochs=2, progress=False, copy=True)
    plain = correct(adata, **options)
    guided = correct(adata, reference=swapped, **options)
    np.testing.assert_array_equal(guided.layers["corrected"].toarray(), plain.layers["corrected"].toarray())
    np.testing.assert_array_equal(
        guided.var["undiffuse_prior_strength"], plain.var["undiffuse_prior_strength"]
    )
