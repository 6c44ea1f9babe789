"""``undiffuse simulate OUTDIR``: write a simulated sample (Space Ranger ``outs/`` plus its truth).

``--platform visium`` (default) writes ``outs/``, ``truth.h5ad`` and ``reference.h5ad``; ``--platform visium_hd``
writes ``outs/binned_outputs/square_{002,008,016}um/``, ``truth/`` and ``reference.h5ad`` (see
:mod:`undiffuse.simulate_hd`). ``reference.h5ad`` holds single cells of the sample's domains or cell types, for
``undiffuse correct --reference``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

#: Command-line options -> simulation parameters; the rest come from ``--params`` or the defaults of
#: ``undiffuse.simulate.SimulationParams`` (not imported here, so that ``undiffuse --help`` stays fast).
_OPTIONS: tuple[tuple[str, type, str], ...] = (
    ("n_rows", int, "rows of the Visium grid (visium)"),
    ("n_cols", int, "spots per row (visium)"),
    ("width_um", float, "width of the capture area in um, a multiple of 16 (visium_hd)"),
    ("height_um", float, "height of the capture area in um, a multiple of 16 (visium_hd)"),
    ("n_genes", int, "number of genes"),
    ("bleed", float, "share of molecules that bleed by the local kernel"),
    ("kernel_scale", float, "median kernel scale in spot pitches (visium)"),
    ("kernel_length_min_um", float, "smallest per-gene kernel scale in um (visium_hd)"),
    ("kernel_length_max_um", float, "largest per-gene kernel scale in um (visium_hd)"),
    ("distal", float, "share of molecules spread uniformly over the slide"),
    ("seed", int, "random seed"),
)

#: Options that only one platform knows.
_PLATFORM_OPTIONS = {
    "visium": {"n_rows", "n_cols", "kernel_scale"},
    "visium_hd": {"width_um", "height_um", "kernel_length_min_um", "kernel_length_max_um"},
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "simulate",
        help="write a simulated Visium or Visium HD sample with known truth",
        description=(
            "Simulate a sample with known undiffused expression. Visium: a Space Ranger outs/ folder "
            "(raw_feature_bc_matrix.h5, spatial/) plus truth.h5ad and reference.h5ad (single cells of each domain, for "
            "`undiffuse correct --reference`); parameters given nowhere take the defaults "
            "of the moderate demo sample (78 x 64 spots, 300 genes). Visium HD: cells rendered at 2 um, "
            "written as outs/binned_outputs/square_{002,008,016}um/ plus truth/ (truth per bin size and the "
            "cell map); --preset ci (1 mm square) or full (the 6.5 mm capture area). Options override "
            "--params, which override the preset."
        ),
    )
    parser.add_argument("outdir", type=Path, metavar="OUTDIR", help="output folder")
    parser.add_argument(
        "--platform",
        choices=("visium", "visium_hd"),
        default="visium",
        help="Visium spots (default) or Visium HD square bins",
    )
    parser.add_argument(
        "--preset",
        choices=("ci", "full"),
        default=None,
        help="visium_hd size: ci (1 mm square, 24 genes; the default) or full (6.5 mm square, 100 genes)",
    )
    parser.add_argument(
        "--visium-view",
        action="store_true",
        help="visium_hd: also write OUTDIR/visium/, the same tissue seen by Visium spots, with the truth on "
        "10 and 20 um grids",
    )
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


def read_params_file(path: Path, section_key: str = "simulation") -> dict[str, Any]:
    """Simulation parameters from a YAML file: a mapping, or a config holding one under ``section_key``."""
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
    section = loaded.get(section_key, loaded)
    if not isinstance(section, dict):
        raise InputError(path, f"its '{section_key}' section must be a mapping")
    return section


def run(args: argparse.Namespace) -> None:
    from ..errors import ConfigError

    hd = args.platform == "visium_hd"
    foreign = [
        name
        for name in sorted(_PLATFORM_OPTIONS["visium" if hd else "visium_hd"])
        if getattr(args, name) is not None
    ]
    if args.preset is not None and not hd:
        foreign.append("preset")
    if args.visium_view and not hd:
        foreign.append("visium_view")
    if foreign:
        options = ", ".join("--" + name.replace("_", "-") for name in foreign)
        raise ConfigError(f"{options} do(es) not apply to --platform {args.platform}")
    values = read_params_file(args.params, "simulation_hd" if hd else "simulation") if args.params else {}
    overrides = {name: getattr(args, name) for name, _, _ in _OPTIONS if getattr(args, name) is not None}
    if args.kernel is not None:
        overrides["kernel"] = args.kernel
    if hd:
        _run_hd(args, values, overrides)
    else:
        _run_visium(args, values, overrides)


def _checked(cls: Any, path: Path | None, values: dict[str, Any], **options: Any) -> None:
    """Validate the parameters of a ``--params`` file on their own, so that its errors name the file."""
    from ..errors import ConfigError, InputError

    if values:
        try:
            cls.from_dict(values, **options)
        except ConfigError as err:
            raise InputError(path, str(err)) from err


def _run_visium(args: argparse.Namespace, values: dict[str, Any], overrides: dict[str, Any]) -> None:
    from ..simulate import SimulationParams, simulate, write_sample

    _checked(SimulationParams, args.params, values)
    sample = simulate(SimulationParams.from_dict(values, **overrides))
    outs = write_sample(args.outdir, sample)
    summary = sample.truth.uns["summary"]
    print(outs)
    print(
        f"background share of UMIs: {summary['background_share']:.3f} "
        f"({summary['n_tissue_spots']} of {summary['n_spots']} spots in tissue)"
    )


def _run_hd(args: argparse.Namespace, values: dict[str, Any], overrides: dict[str, Any]) -> None:
    from ..simulate_hd import HDSimulationParams, simulate_hd, write_hd_sample

    _checked(HDSimulationParams, args.params, values, preset=args.preset)
    params = HDSimulationParams.from_dict(values, preset=args.preset or "ci", **overrides)
    sample = simulate_hd(params, visium_view=args.visium_view)
    binned = write_hd_sample(args.outdir, sample)
    summary = sample.summary
    print(binned)
    print(
        f"background share of UMIs: {summary['background_share']:.3f} (8 um bins); "
        f"{summary['n_cells']} cells, {summary['n_bins_002um']} bins of 2 um"
    )
