"""Workflow configuration: load a YAML config, validate it against the package's schemas and fill in defaults.

The Snakefile validates with ``snakemake.utils.validate(..., set_default=True)``; this module applies the same
schemas the same way for the command line and for notebooks, so that ``undiffuse <step> --config FILE`` and
the workflow resolve a config identically. Heavy libraries (pandas) are imported inside the functions that
need them: the Snakefile imports this module at start-up.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from functools import cache
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jsonschema
import yaml

from .errors import ConfigError, InputError
from .package_data import CONFIG_SCHEMA, SAMPLES_SCHEMA

if TYPE_CHECKING:
    import pandas as pd


#: Keys of the ``correct`` section that steer the workflow, not the correction itself.
WORKFLOW_ONLY_CORRECT_KEYS = frozenset({"chunk_size", "gpu", "reference"})

#: What a sample sheet looks like, for error messages.
SHEET_LAYOUT = (
    "a sample sheet is tab-separated text with a header line naming the columns sample and input (and "
    "optionally image, genes, seed, bin_size), one sample a row; see config/README.md"
)

#: Sample-sheet value of ``input`` for samples that the workflow simulates.
SIMULATED_INPUT = "simulate"
#: Sample-sheet value of ``input`` for Visium HD samples that the workflow simulates.
SIMULATED_HD_INPUT = "simulate_hd"
#: Bin size (microns) of a Visium HD sample whose sheet row leaves ``bin_size`` empty.
DEFAULT_BIN_SIZE_UM = 8


def load_config(path: str | PathLike[str] | None = None) -> dict[str, Any]:
    """Read a config YAML, validate it and fill in every default.

    Parameters
    ----------
    path
        Config file; ``None`` gives the defaults alone.

    Returns
    -------
    The complete config (a new dict).

    Raises
    ------
    InputError
        The file is missing or is not a YAML mapping.
    ConfigError
        A value breaks the schema; the message names the file, the key and the rule.
    """
    if path is None:
        return validate_config({})
    return validate_config(read_config_file(path), source=path)


def read_config_file(path: str | PathLike[str]) -> dict[str, Any]:
    """The mapping of a config YAML as written (not validated, no defaults): the one reader of config files.

    Raises
    ------
    InputError
        The file is missing, not UTF-8 text, not valid YAML, or not a mapping; one line naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(
            path, "config file not found" if not path.exists() else "is a folder, not a config file"
        )
    try:
        data = yaml.safe_load(path.read_bytes().decode("utf-8")) or {}
    except UnicodeDecodeError as err:
        raise InputError(path, f"is not UTF-8 text (byte {err.start}); a config is a YAML text file") from err
    except OSError as err:
        raise InputError(path, f"cannot be read: {err.strerror or err}") from err
    except yaml.YAMLError as err:
        raise InputError(path, f"is not valid YAML: {_yaml_problem(err)}; fix the syntax") from err
    if not isinstance(data, dict):
        raise InputError(
            path, f"a config must be a YAML mapping (key: value lines), not {type(data).__name__}"
        )
    return data


def _yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error on one line: what and where."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    what = getattr(err, "problem", None) or str(err).splitlines()[0]
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{what}{where}"


def validate_config(
    config: Mapping[str, Any], *, source: str | PathLike[str] | None = None
) -> dict[str, Any]:
    """Validate a config mapping against ``config.schema.yaml`` and return a copy with defaults filled in.

    Parameters
    ----------
    config
        The config as read (sections may be missing).
    source
        The file it came from, named in error messages.
    """
    return _validate(config, _load_schema(CONFIG_SCHEMA), what="config", source=source)


def validate_sample_row(
    row: Mapping[str, Any], *, source: str | PathLike[str] | None = None
) -> dict[str, Any]:
    """Validate one sample-sheet row against ``samples.schema.yaml`` (empty cells left out)."""
    return _validate(row, _load_schema(SAMPLES_SCHEMA), what="sample sheet row", source=source)


def read_sample_sheet(path: str | PathLike[str]) -> pd.DataFrame:
    """Read and validate a sample sheet (TSV, text cells); indexed by ``sample``.

    Raises
    ------
    InputError
        The sheet is missing, a row breaks the schema, or sample names repeat.
    """
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise InputError(
            path, "sample sheet not found" if not path.exists() else "is a folder, not a sample sheet"
        )
    try:
        frame = pd.read_csv(path, sep="\t", dtype=str, comment="#", skip_blank_lines=True, encoding="utf-8")
    except pd.errors.EmptyDataError as err:
        raise InputError(path, f"is empty; {SHEET_LAYOUT}") from err
    except (pd.errors.ParserError, UnicodeDecodeError, OSError) as err:
        problem = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(path, f"cannot be read as a sample sheet ({problem}); {SHEET_LAYOUT}") from err
    frame.columns = [str(column).strip() for column in frame.columns]
    required = ("sample", "input")
    missing = [column for column in required if column not in frame.columns]
    if missing:
        raise InputError(
            path,
            f"lacks the column(s) {', '.join(missing)} (header: {', '.join(frame.columns) or 'none'}); "
            f"{SHEET_LAYOUT}",
        )
    for position, record in enumerate(frame.to_dict("records")):
        row = {key: value for key, value in record.items() if isinstance(value, str) and value.strip()}
        try:
            validate_sample_row(row)
        except ConfigError as err:
            raise InputError(path, f"row {position + 1}: {err}") from err
    check_sample_sheet(frame, path)
    return frame.set_index("sample", drop=False)


def check_sample_sheet(frame: pd.DataFrame, path: str | PathLike[str]) -> None:
    """Checks that span rows: at least one sample, unique names. Raises :class:`InputError`."""
    if frame.empty:
        raise InputError(path, "the sample sheet lists no sample")
    repeated = sorted(set(frame["sample"][frame["sample"].duplicated()]))
    if repeated:
        raise InputError(path, f"sample names must be unique; repeated: {', '.join(repeated)}")
    for column in ("bin_size", "cells"):
        if column not in frame.columns:
            continue
        visium = frame[column].notna() & frame["input"].str.strip().eq(SIMULATED_INPUT)
        if visium.any():
            raise InputError(
                path,
                f"{column} is set for the Visium sample(s) {', '.join(frame['sample'][visium])}, whose input "
                f"is {SIMULATED_INPUT!r}; leave it empty, or use {SIMULATED_HD_INPUT!r} for a Visium HD sample",
            )


def hd_bin_folder(path: str | PathLike[str], bin_size: int | str | None) -> Path:
    """The ``square_XXXum/`` folder a sample-sheet ``input`` and ``bin_size`` name.

    ``path`` may be the square folder itself, or ``binned_outputs/``, ``outs/`` or the folder above them; with
    no ``bin_size`` it is returned unchanged (a Visium sample, or an HD square folder named directly).

    Raises
    ------
    InputError
        ``path`` is a square folder of another bin size, or holds no folder of the bin size asked for.
    """
    path = Path(path)
    if bin_size is None:
        return path
    square = f"square_{int(bin_size):03d}um"
    if path.name.startswith("square_") and path.name.endswith("um"):
        if path.name != square:
            raise InputError(
                path,
                f"is the {path.name} folder but the sample sheet's bin_size is {int(bin_size)}; name the "
                f"binned_outputs/ folder above it, or set bin_size to match",
            )
        return path
    for candidate in (
        path / square,
        path / "binned_outputs" / square,
        path / "outs" / "binned_outputs" / square,
    ):
        if candidate.is_dir():
            return candidate
    raise InputError(
        path,
        f"holds no {square}/ folder (sample sheet bin_size {int(bin_size)}); name a Space Ranger "
        f"binned_outputs/ folder, or a bin size it has",
    )


def correction_options(config: Mapping[str, Any]) -> dict[str, Any]:
    """The ``correct`` section without its workflow-only keys: the keyword arguments of ``CorrectionConfig``.

    With ``gpu: true`` and ``device: auto`` the device becomes ``cuda``, so that a job that asked the
    scheduler for a GPU fails loudly when it gets none instead of running on the CPU.
    """
    section = copy.deepcopy(dict(config["correct"]))
    if section.get("gpu") and section.get("device") == "auto":
        section["device"] = "cuda"
    return {key: value for key, value in section.items() if key not in WORKFLOW_ONLY_CORRECT_KEYS}


def simulation_options(
    config: Mapping[str, Any], *, sample_id: str | None = None, seed: int | str | None = None
) -> dict[str, Any]:
    """Keyword arguments of ``simulate_sample`` from the ``simulation`` section.

    Parameters
    ----------
    config
        Validated config.
    sample_id
        Library id written into the simulated matrix (the sample's name in the workflow).
    seed
        Seed overriding ``simulation.seed`` (the sample sheet's ``seed`` column).
    """
    options = copy.deepcopy(dict(config["simulation"]))
    if sample_id is not None:
        options["sample_id"] = str(sample_id)
    if seed is not None:
        options["seed"] = int(seed)
    return options


def simulation_hd_options(
    config: Mapping[str, Any], *, sample_id: str | None = None, seed: int | str | None = None
) -> dict[str, Any]:
    """Keyword arguments of ``simulate_hd_sample`` (``preset`` and fields of ``HDSimulationParams``) from the
    ``simulation_hd`` section, with the sample's name as library id and the sheet's seed."""
    options = copy.deepcopy(dict(config["simulation_hd"]))
    if sample_id is not None:
        options["sample_id"] = str(sample_id)
    if seed is not None:
        options["seed"] = int(seed)
    return options


@cache
def _load_schema(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise InputError(path, "schema not found: this undiffuse installation lacks its package data")
    return yaml.safe_load(path.read_text())


def _validate(
    instance: Mapping[str, Any], schema: dict[str, Any], *, what: str, source: str | PathLike[str] | None
) -> dict[str, Any]:
    filled = copy.deepcopy(dict(instance))
    validator = _DefaultFillingValidator(copy.deepcopy(schema))
    error = jsonschema.exceptions.best_match(validator.iter_errors(filled))
    if error is not None:
        location = ".".join(str(part) for part in error.absolute_path) or "(top level)"
        prefix = f"{source}: " if source is not None else ""
        raise ConfigError(f"{prefix}invalid {what}: {location}: {error.message}")
    return filled


def _set_defaults(
    validator: jsonschema.protocols.Validator,
    properties: Mapping[str, Any],
    instance: Any,
    schema: Mapping[str, Any],
) -> Iterator[jsonschema.ValidationError]:
    # As snakemake.utils.validate(set_default=True): a missing key takes its default before the properties
    # are validated, so that a defaulted section ({}) is then filled in turn.
    if isinstance(instance, dict):
        for name, subschema in properties.items():
            if "default" in subschema:
                instance.setdefault(name, copy.deepcopy(subschema["default"]))
    yield from jsonschema.Draft202012Validator.VALIDATORS["properties"](
        validator, properties, instance, schema
    )


_DefaultFillingValidator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator, {"properties": _set_defaults}
)
