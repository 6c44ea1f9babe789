"""The ``undiffuse`` command: one subcommand per workflow step, each usable outside Snakemake.

Each subcommand lives in its own module of this package and exposes ``register(subparsers)``, which adds
its parser and sets ``func`` to a callable taking the parsed arguments. Modules import heavy libraries
inside ``func`` so that ``undiffuse --help`` stays fast.

Every user error (:class:`~undiffuse.errors.UndiffuseError`) is printed as one line naming the file, the
problem and the fix, with exit status 2; tracebacks are left for bugs. SIGTERM and SIGHUP stop a command
like Ctrl-C does, through the ``finally`` blocks that remove temporary outputs (status 128 + signal).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from ..errors import UndiffuseError, UndiffuseWarning

#: Subcommand modules, in workflow order.
SUBCOMMAND_MODULES = (
    "simulate",
    "prepare",
    "quantiles",
    "correct",
    "merge",
    "aggregate",
    "superres",
    "report",
)


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


def _integer_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


#: argparse types of count options.
non_negative_int = _integer_at_least(0)
positive_int = _integer_at_least(1)


@contextmanager
def _plain_warnings(command: str) -> Iterator[None]:
    """Show undiffuse's warnings as one line each, like its errors."""
    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, UndiffuseWarning):
            print(f"undiffuse {command}: warning: {message}", file=file or sys.stderr)
        else:
            previous(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    from ..atomic import exit_on_signals

    args = build_parser().parse_args(argv)
    with exit_on_signals(), _plain_warnings(args.command):
        try:
            args.func(args)
        except UndiffuseError as err:
            print(f"undiffuse {args.command}: error: {err}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"undiffuse {args.command}: interrupted; no partial output was left", file=sys.stderr)
            return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
