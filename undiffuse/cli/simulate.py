"""``undiffuse simulate OUTDIR``: write a simulated sample (Space Ranger ``outs/`` plus ``truth.h5ad``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

#: Command-line options -> simulation parameters; the rest come from ``--params`` or the defaults of
#: ``undiffuse.simulate.SimulationParams`` (not imported here, so that ``undiffuse --help`` stays fast).
_OPTIONS: tuple[tuple[str, type, str], ...] = (
    ("n_rows", int, "rows of the Visium grid"),
    ("n_cols", int, "spots per row"),
    ("n_genes", int, "number of genes"),
    ("bleed", float, "share of molecules that bleed by the local kernel"),
    ("kernel_scale", float, "median kernel scale in spot pitches"),
    ("distal", float, "share of molecules spread uniformly over the slide"),
    ("seed", int, "random seed"),
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "simulate",
        help="write a simulated Visium sample with known truth",
        description=(
            "Simulate a Visium sample with known undiffused expression and write it as a Space Ranger outs/ "
            "folder (raw_feature_bc_matrix.h5, spatial/) plus truth.h5ad. Options override --params; "
            "parameters given nowhere take the defaults of the moderate demo sample (78 x 64 spots, 300 genes)."
        ),
    )
    parser.add_argument("outdir", type=Path, metavar="OUTDIR", help="output folder")
    for name, kind, text in _OPTIONS:
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, default=None, help=text)
    parser.add_argument(
        "--kernel",
        choices=("gaussian", "heavy_tailed"),
        default=None,
        help="radial profile of the local kernel",
    )
    parser.add_argument(
        "--params",
        type=Path,
        metavar="YAML",
        default=None,
        help="YAML mapping of simulation parameters (or a workflow config with a 'simulation:' section)",
    )
    parser.set_defaults(func=run)


def read_params_file(path: Path) -> dict[str, Any]:
    """Simulation parameters from a YAML file: a mapping, or a config holding one under ``simulation``."""
    import yaml

    from ..errors import InputError

    try:
        loaded = yaml.safe_load(path.read_text())
    except OSError as err:
        raise InputError(path, f"cannot be read: {err.strerror or err}") from err
    except yaml.YAMLError as err:
        raise InputError(path, f"is not valid YAML: {err}") from err
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise InputError(path, "must hold a mapping of simulation parameters")
    section = loaded.get("simulation", loaded)
    if not isinstance(section, dict):
        raise InputError(path, "its 'simulation' section must be a mapping")
    return section


def run(args: argparse.Namespace) -> None:
    from ..errors import ConfigError, InputError
    from ..simulate import SimulationParams, simulate, write_sample

    values = read_params_file(args.params) if args.params is not None else {}
    if values:
        try:
            SimulationParams.from_dict(values)
        except ConfigError as err:
            raise InputError(args.params, str(err)) from err
    overrides = {name: getattr(args, name) for name, _, _ in _OPTIONS if getattr(args, name) is not None}
    if args.kernel is not None:
        overrides["kernel"] = args.kernel
    sample = simulate(SimulationParams.from_dict(values, **overrides))
    outs = write_sample(args.outdir, sample)
    summary = sample.truth.uns["summary"]
    print(outs)
    print(
        f"background share of UMIs: {summary['background_share']:.3f} "
        f"({summary['n_tissue_spots']} of {summary['n_spots']} spots in tissue)"
    )
