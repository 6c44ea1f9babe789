"""Gene chunks: deterministic, balanced, covering every gene exactly once."""

from __future__ import annotations

import pytest

from undiffuse.chunks import chunk_bounds, chunk_genes, n_chunks, split_genes
from undiffuse.errors import InputError
from undiffuse.quantiles import quantile_genes, read_quantile_table

GENES = [f"gene{k:03d}" for k in range(23)]


@pytest.mark.parametrize("chunk_size", [1, 2, 4, 5, 7, 22, 23, 100])
def test_chunks_cover_every_gene_once_in_order(chunk_size):
    chunks = split_genes(GENES, chunk_size)
    assert len(chunks) == n_chunks(len(GENES), chunk_size) == -(-len(GENES) // chunk_size)
    assert [gene for chunk in chunks for gene in chunk] == GENES
    sizes = [len(chunk) for chunk in chunks]
    assert max(sizes) <= chunk_size
    assert max(sizes) - min(sizes) <= 1  # balanced: no job is left with a handful of genes


def test_chunks_are_deterministic_and_individually_addressable():
    assert split_genes(GENES, 5) == split_genes(list(GENES), 5)
    for index, chunk in enumerate(split_genes(GENES, 5)):
        assert chunk_genes(GENES, 5, index) == chunk
        start, stop = chunk_bounds(len(GENES), 5, index)
        assert GENES[start:stop] == chunk
    # 23 genes in chunks of at most 5: five chunks, sizes 5, 5, 5, 4, 4.
    assert [len(c) for c in split_genes(GENES, 5)] == [5, 5, 5, 4, 4]


def test_edge_cases_and_errors():
    assert split_genes([], 3) == []
    assert n_chunks(0, 3) == 0
    with pytest.raises(ValueError, match="chunk_size"):
        n_chunks(5, 0)
    with pytest.raises(IndexError, match="chunk 5 does not exist"):
        chunk_genes(GENES, 5, 5)
    with pytest.raises(ValueError, match="unique"):
        split_genes(["a", "b", "a"], 2)


def test_quantile_table_reader_keeps_file_order_and_odd_names(tmp_path):
    """The one reader of quantiles.tsv: the Snakefile's gene count and the jobs' table agree, and a gene called
    NA or nan stays a name."""
    path = tmp_path / "quantiles.tsv"
    path.write_text(
        "gene\tq_init\tmoran_at_q_init\tmoran_raw\nNA\t0.1\t0.5\t0.4\nnan\t0\t0.2\t0.2\nActb\t0\t0.1\t0.1\n"
    )
    assert quantile_genes(path) == ["NA", "nan", "Actb"]
    table = read_quantile_table(path)
    assert table.index.tolist() == ["NA", "nan", "Actb"]
    assert table.loc["NA", "moran_at_q_init"] == 0.5
    (tmp_path / "bad.tsv").write_text("name\tq_init\nA\t0\n")
    with pytest.raises(InputError, match="missing columns"):
        quantile_genes(tmp_path / "bad.tsv")
    (tmp_path / "twice.tsv").write_text("gene\tq_init\tmoran_at_q_init\tmoran_raw\nA\t0\t0\t0\nA\t0\t0\t0\n")
    with pytest.raises(InputError, match="twice"):
        quantile_genes(tmp_path / "twice.tsv")
    (tmp_path / "text.tsv").write_text("gene\tq_init\tmoran_at_q_init\tmoran_raw\nA\thigh\t0\t0\n")
    with pytest.raises(InputError, match="not a number"):
        read_quantile_table(tmp_path / "text.tsv")


@pytest.mark.parametrize("module", ["chunks", "quantiles"])
def test_module_needs_only_the_standard_library(module):
    # The Snakefile imports it at start-up, where only snakemake's own dependencies can be relied on.
    import ast
    import importlib
    import sys
    from pathlib import Path

    tree = ast.parse(Path(importlib.import_module(f"undiffuse.{module}").__file__).read_text())
    top_level = {
        (node.module or "").split(".")[0] if isinstance(node, ast.ImportFrom) else alias.name.split(".")[0]
        for node in tree.body
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
        if not (isinstance(node, ast.ImportFrom) and node.level > 0)
    }
    assert top_level <= set(sys.stdlib_module_names) | {"__future__"}
