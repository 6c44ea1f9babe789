"""The ``undiffuse`` command: one subcommand per workflow step, each usable outside Snakemake.

Each subcommand lives in its own module of this package and exposes ``register(subparsers)``, which adds
its parser and sets ``func`` to a callable taking the parsed arguments. Modules import heavy libraries
inside ``func`` so that ``undiffuse --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from ..errors import UndiffuseError

#: Subcommand modules, in workflow order.
SUBCOMMAND_MODULES = ("simulate", "prepare", "quantiles", "correct", "merge", "report")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="undiffuse",
        description="Correct lateral mRNA diffusion in spatial transcriptomics with differentiable OT.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UndiffuseError as err:
        print(f"undiffuse {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
