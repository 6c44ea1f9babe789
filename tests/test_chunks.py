"""Gene chunks: deterministic, balanced, covering every gene exactly once."""

from __future__ import annotations

import pytest

from undiffuse.chunks import chunk_bounds, chunk_genes, n_chunks, read_quantile_genes, split_genes
from undiffuse.errors import InputError

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


def test_read_quantile_genes_keeps_file_order_and_odd_names(tmp_path):
    path = tmp_path / "quantiles.tsv"
    path.write_text(
        "gene\tq_init\tmoran_at_q_init\tmoran_raw\nNA\t0.1\t0.5\t0.4\nnan\t0\t0.2\t0.2\nActb\t0\t0.1\t0.1\n"
    )
    assert read_quantile_genes(path) == ["NA", "nan", "Actb"]
    (tmp_path / "bad.tsv").write_text("name\tq_init\nA\t0\n")
    with pytest.raises(InputError, match="no 'gene' column"):
        read_quantile_genes(tmp_path / "bad.tsv")


def test_chunks_module_needs_only_the_standard_library():
    # The Snakefile imports it at start-up, where only snakemake's own dependencies can be relied on.
    import ast
    import sys
    from pathlib import Path

    import undiffuse.chunks

    tree = ast.parse(Path(undiffuse.chunks.__file__).read_text())
    top_level = {
        (node.module or "").split(".")[0] if isinstance(node, ast.ImportFrom) else alias.name.split(".")[0]
        for node in tree.body
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
        if not (isinstance(node, ast.ImportFrom) and node.level > 0)
    }
    assert top_level <= set(sys.stdlib_module_names) | {"__future__"}
