"""``undiffuse init-quantiles``: the Moran's I scan that initialises each gene's quantile."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd


def init_quantiles(
    prepared: str | PathLike[str], output: str | PathLike[str], *, grid: Sequence[float]
) -> pd.DataFrame:
    """Scan the selected genes of ``prepared.h5ad`` and write ``quantiles.tsv`` (the ``init_quantiles`` step).

    Parameters
    ----------
    prepared
        Output of ``prepare``: raw counts, ``obs['tissue']``, ``var['selected']``.
    output
        ``quantiles.tsv`` to write (atomically).
    grid
        Candidate quantiles.

    Returns
    -------
    The table written: gene, q_init, moran_at_q_init, moran_raw.
    """
    from ..atomic import check_output_path
    from ..io.h5ad import read_prepared
    from ..moran import scan_quantiles
    from ..quantiles import write_quantile_table

    check_output_path(output)
    # Degenerate tissue was accepted (or refused) by prepare; the scan itself copes with it.
    adata = read_prepared(prepared, allow_degenerate_tissue=True)
    table = scan_quantiles(adata, grid=grid, tissue_key="tissue")
    write_quantile_table(table, output)
    return table


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "init-quantiles",
        help="initial quantile of every selected gene by the Moran's I scan",
        description=(
            "For every selected gene of PREPARED, hard-threshold its counts at each candidate quantile "
            "(of its tissue counts), compute Moran's I over all spots, and keep the quantile with the "
            "largest I."
        ),
    )
    parser.add_argument("prepared", type=Path, metavar="PREPARED.h5ad", help="output of `undiffuse prepare`")
    parser.add_argument("output", type=Path, metavar="OUT.tsv", help="quantile table to write")
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="workflow config; its init_quantiles.grid sets the candidates",
    )
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> None:
    from ..config import load_config
    from ..moran import quantile_grid

    grid = quantile_grid(**load_config(args.config)["init_quantiles"]["grid"])
    table = init_quantiles(args.prepared, args.output, grid=grid)
    print(f"wrote {args.output}: {len(table)} genes, {len(grid)} candidate quantiles")
