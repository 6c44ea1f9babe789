"""Gene selection: minimum counts, highly variable genes, user gene lists."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from anndata import AnnData

from undiffuse.errors import InputError
from undiffuse.genes import read_gene_list, select_genes, selected_genes


def counts_with_variable_genes(seed: int = 0) -> tuple[AnnData, np.ndarray]:
    """300 spots x 60 genes of equal mean: 40 Poisson genes and 20 strongly overdispersed ones."""
    rng = np.random.default_rng(seed)
    n_spots = 300
    poisson = rng.poisson(5.0, size=(n_spots, 40))
    overdispersed = rng.poisson(rng.gamma(0.3, 5.0 / 0.3, size=(n_spots, 20)))
    x = np.hstack([poisson, overdispersed]).astype(np.float32)
    names = [f"gene{i}" for i in range(60)]
    adata = AnnData(X=sp.csr_matrix(x))
    adata.var_names = names
    adata.var["gene_ids"] = [f"ENSG{i:05d}" for i in range(60)]
    return adata, np.arange(60) >= 40


def test_selected_genes_are_var_selected_else_all():
    adata, _ = counts_with_variable_genes()
    assert selected_genes(adata) == list(adata.var_names)
    adata.var["selected"] = np.arange(60) % 20 == 3
    assert selected_genes(adata) == ["gene3", "gene23", "gene43"]


def test_top_variable_genes_are_the_overdispersed_ones():
    adata, variable = counts_with_variable_genes()
    selected = select_genes(adata, tissue=np.ones(adata.n_obs, dtype=bool), min_counts=0, n_top_genes=10)
    assert selected.sum() == 10
    assert variable[selected].all()
    np.testing.assert_array_equal(adata.var["selected"], selected)
    np.testing.assert_allclose(adata.var["total_counts"], np.asarray(adata.X.sum(axis=0)).ravel())


def test_min_counts_and_all_genes_when_few():
    adata, _ = counts_with_variable_genes()
    x = adata.X.toarray()
    x[:, :5] = 0
    adata.X = sp.csr_matrix(x)
    selected = select_genes(adata, tissue=np.ones(adata.n_obs, dtype=bool), min_counts=1, n_top_genes=1000)
    assert not selected[:5].any() and selected[5:].all()
    with pytest.raises(InputError, match="no gene has at least"):
        select_genes(adata, tissue=np.ones(adata.n_obs, dtype=bool), min_counts=10**9)


def test_hvgs_ranked_on_tissue_spots_only():
    adata, variable = counts_with_variable_genes()
    tissue = np.zeros(adata.n_obs, dtype=bool)
    tissue[:150] = True
    # Off tissue, make the Poisson genes wildly variable: they must not matter.
    x = adata.X.toarray()
    x[~tissue, :40] *= np.random.default_rng(1).integers(0, 50, size=(150, 40))
    adata.X = sp.csr_matrix(x)
    selected = select_genes(adata, tissue=tissue, min_counts=0, n_top_genes=10)
    assert variable[selected].all()


def test_gene_list_file(tmp_path):
    adata, _ = counts_with_variable_genes()
    path = tmp_path / "genes.txt"
    path.write_text("\ufeff# markers\ngene3\n\ngene7  # a comment\nENSG00010\n")
    assert read_gene_list(path) == ["gene3", "gene7", "ENSG00010"]
    selected = select_genes(adata, tissue=np.ones(adata.n_obs, dtype=bool), genes=path)
    assert adata.var_names[selected].tolist() == ["gene3", "gene7", "gene10"]


def test_gene_list_errors(tmp_path):
    adata, _ = counts_with_variable_genes()
    tissue = np.ones(adata.n_obs, dtype=bool)
    unknown = tmp_path / "unknown.txt"
    unknown.write_text("gene1\nNope1\nNope2\n")
    with pytest.raises(InputError) as caught:
        select_genes(adata, tissue=tissue, genes=unknown)
    assert caught.value.path == str(unknown) and "2 gene(s) are not in the matrix: Nope1, Nope2" in str(
        caught.value
    )
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    with pytest.raises(InputError, match="names no gene"):
        select_genes(adata, tissue=tissue, genes=empty)
    with pytest.raises(InputError, match="does not exist"):
        select_genes(adata, tissue=tissue, genes=tmp_path / "missing.txt")
    selected = select_genes(adata, tissue=tissue, genes=["gene0", "ENSG00001"])
    assert selected.sum() == 2


def test_gene_list_repeats_and_bad_bytes_are_errors_naming_the_file(tmp_path):
    repeated = tmp_path / "repeated.txt"
    repeated.write_text("gene3\ngene7\ngene3  # again\n")
    with pytest.raises(InputError, match="names gene3 more than once; list each gene once") as caught:
        read_gene_list(repeated)
    assert caught.value.path == str(repeated)
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"gene1\n\xff\xfe\x00gene2\n")
    with pytest.raises(InputError, match="is not UTF-8 text") as caught:
        read_gene_list(binary)
    assert caught.value.path == str(binary)


def test_gene_list_by_name_or_id_and_repeats_in_a_list():
    from undiffuse.genes import resolve_genes

    adata, _ = counts_with_variable_genes()
    assert resolve_genes(adata, ["gene2", "ENSG00005"]) == ["gene2", "gene5"]
    with pytest.raises(InputError, match="--genes names gene2 more than once") as caught:
        resolve_genes(adata, ["gene2", "gene2"], option="--genes")
    assert caught.value.path is None
    with pytest.raises(InputError, match="names gene2 twice \\(by name and by id\\)"):
        resolve_genes(adata, ["gene2", "ENSG00002"])


@pytest.mark.parametrize(("min_counts", "n_top_genes"), [(-1, 10), (0, 0), (1.5, 10)])
def test_bad_selection_options_are_config_errors(min_counts, n_top_genes):
    from undiffuse.errors import ConfigError

    adata, _ = counts_with_variable_genes()
    with pytest.raises(ConfigError, match="must be (an integer|at least)"):
        select_genes(
            adata, tissue=np.ones(adata.n_obs, dtype=bool), min_counts=min_counts, n_top_genes=n_top_genes
        )


def test_no_gene_passing_min_counts_names_the_largest_total():
    adata, _ = counts_with_variable_genes()
    adata.uns["undiffuse"] = {"source": "sample.h5"}
    largest = int(np.asarray(adata.X.sum(axis=0)).max())
    with pytest.raises(
        InputError, match=f"the most expressed gene has {largest}: lower --min-counts"
    ) as caught:
        select_genes(adata, tissue=np.ones(adata.n_obs, dtype=bool), min_counts=largest + 1)
    assert caught.value.path == "sample.h5"
