"""undiffuse: correct lateral mRNA diffusion in spatial transcriptomics with differentiable optimal transport.

The public functions are imported lazily, so that ``import undiffuse`` does not load PyTorch.
"""

from __future__ import annotations

import importlib
import sys
import types
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("undiffuse")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

#: Public name -> module that defines it.
_EXPORTS = {
    "simulate_sample": "simulate",
    "read_sample": "io",
    "prepare": "prepare",
    "prepare_sample": "prepare",
    "scan_quantiles": "moran",
    "morans_i": "moran",
    "correct": "correct",
    "CorrectionConfig": "correct",
    "InputError": "errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'undiffuse' has no attribute {name!r}")


class _Package(types.ModuleType):
    """The package, whose public functions keep their names when a submodule of the same name is imported."""

    def __setattr__(self, name: str, value: object) -> None:
        # The import system binds every submodule it loads on the package: without this, importing
        # undiffuse.correct or undiffuse.prepare (from anywhere) would turn `undiffuse.correct` into a module.
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
