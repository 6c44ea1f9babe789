"""undiffuse: correct lateral mRNA diffusion in spatial transcriptomics with differentiable optimal transport.

The public functions are imported lazily, so that ``import undiffuse`` does not load PyTorch.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("undiffuse")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

#: Public name -> module that defines it.
_EXPORTS = {
    "simulate_sample": "simulate",
    "read_sample": "io",
    "prepare_sample": "prepare",
    "scan_quantiles": "moran",
    "morans_i": "moran",
    "correct": "correct",
    "CorrectionResult": "correct",
    "CorrectionConfig": "correct",
    "InputError": "errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        # Importing a submodule binds it on the package; `correct` must stay the function, not its module.
        globals()[name] = value
        return value
    raise AttributeError(f"module 'undiffuse' has no attribute {name!r}")
