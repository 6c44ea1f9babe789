"""``quantiles.tsv``, the table of the Moran's I quantile scan: its columns, its one writer and its one reader.

One row per selected gene, in the order of ``var`` in ``prepared.h5ad`` (the order of the gene chunks): the
initial quantile ``q_init``, Moran's I of the counts thresholded there (``moran_at_q_init``) and of the raw
counts (``moran_raw``, computed here once and read by the merge).

The module uses the standard library at import, so that the Snakefile can count the genes without the
scientific stack.
"""

from __future__ import annotations

import csv
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import InputError

if TYPE_CHECKING:
    import pandas as pd

#: Columns of ``quantiles.tsv``, in order.
QUANTILE_COLUMNS = ("gene", "q_init", "moran_at_q_init", "moran_raw")


def write_quantile_table(table: pd.DataFrame, path: str | PathLike[str]) -> None:
    """Write the scan result (:func:`undiffuse.moran.scan_quantiles`) as ``quantiles.tsv``, atomically.

    Raises
    ------
    ValueError
        The table holds NaN or Inf.
    """
    import numpy as np

    from .atomic import atomic_path

    values = table[list(QUANTILE_COLUMNS[1:])].to_numpy(dtype=np.float64)
    if not np.isfinite(values).all():
        raise ValueError("the quantile table holds NaN or Inf")
    with atomic_path(path) as tmp:
        table[list(QUANTILE_COLUMNS)].to_csv(tmp, sep="\t", index=False, float_format="%.10g")


def read_quantile_table(path: str | PathLike[str]) -> pd.DataFrame:
    """Read ``quantiles.tsv``, indexed by gene in file order; gene names such as ``NA`` stay text.

    Raises
    ------
    InputError
        The file is missing, lacks a column, repeats a gene or holds a value that is not a number.
    """
    import pandas as pd

    rows = _rows(path)
    values = {}
    for column in QUANTILE_COLUMNS[1:]:
        try:
            values[column] = [float(row[column]) for row in rows]
        except ValueError as err:
            raise InputError(path, f"column {column!r} holds a value that is not a number: {err}") from err
    index = pd.Index([row["gene"] for row in rows], name="gene", dtype=object)
    return pd.DataFrame(values, index=index)


def quantile_genes(path: str | PathLike[str]) -> list[str]:
    """The genes of ``quantiles.tsv`` in file order (what the Snakefile needs to count the gene chunks)."""
    return [row["gene"] for row in _rows(path)]


def _rows(path: str | PathLike[str]) -> list[dict[str, str]]:
    if not Path(path).is_file():
        raise InputError(path, "quantile table not found; rerun the init_quantiles step")
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle, delimiter="\t")
        missing = [column for column in QUANTILE_COLUMNS if column not in (reader.fieldnames or [])]
        if missing:
            raise InputError(path, f"missing columns {missing}; expected {list(QUANTILE_COLUMNS)}")
        rows = list(reader)
    genes = [row["gene"] for row in rows]
    if len(set(genes)) != len(genes):
        raise InputError(path, "a gene is listed twice")
    return rows
