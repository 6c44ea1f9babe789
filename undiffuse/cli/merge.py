"""``undiffuse merge``: corrected.h5ad and parameters.tsv of a sample from its chunk outputs."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "merge",
        help="merge the corrected gene chunks of a sample into corrected.h5ad",
        description=(
            "Merge chunk outputs into one AnnData with all genes of PREPARED (uncorrected genes pass "
            "through as raw counts), learned parameters, Moran's I before and after, and provenance."
        ),
    )
    parser.add_argument("prepared", type=Path, metavar="PREPARED.h5ad", help="output of `undiffuse prepare`")
    parser.add_argument("quantiles", type=Path, metavar="QUANTILES.tsv", help="output of init-quantiles")
    parser.add_argument("chunks", type=Path, nargs="*", metavar="CHUNK.h5ad", help="chunk outputs")
    parser.add_argument("-o", "--output", type=Path, required=True, help="corrected.h5ad to write")
    parser.add_argument(
        "--parameters", type=Path, default=None, help="parameter table to write (default: beside the output)"
    )
    parser.add_argument("--config", type=Path, default=None, help="workflow config, stored in the provenance")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> None:
    from ..atomic import check_output_path
    from ..config import load_config
    from ..merge import merge_sample

    parameters = args.parameters or args.output.with_name("parameters.tsv")
    check_output_path(args.output)
    check_output_path(parameters, what="parameter table")
    merged = merge_sample(
        args.prepared, args.chunks, args.quantiles, args.output, parameters, config=load_config(args.config)
    )
    print(f"wrote {args.output} ({merged.n_obs} spots x {merged.n_vars} genes) and {parameters}")
