"""Errors that carry the offending file, so that every entry point can say what went wrong and where."""

from __future__ import annotations

from os import PathLike


class UndiffuseError(Exception):
    """Base class of the errors the package raises on purpose."""


class InputError(UndiffuseError, ValueError):
    """A user-supplied file or folder cannot be used.

    Parameters
    ----------
    path
        The file or folder at fault.
    problem
        What is wrong with it, and where possible how to proceed.
    """

    def __init__(self, path: str | PathLike[str] | None, problem: str) -> None:
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class ConfigError(UndiffuseError, ValueError):
    """A configuration value is invalid."""


def require_extra(package: str, extra: str) -> None:
    """Import ``package`` or stop with the optional extra of undiffuse that installs it."""
    import importlib

    try:
        importlib.import_module(package.replace("-", "_"))
    except ImportError as err:
        raise InputError(
            None, f"{package} is not installed; install it with `pip install 'undiffuse[{extra}]'`"
        ) from err


class UndiffuseWarning(UserWarning):
    """Something in the input was repaired or looks doubtful; the message names the file and what was done."""
