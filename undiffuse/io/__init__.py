"""Readers that turn Space Ranger outputs, h5ad files and Visium HD bins into the canonical AnnData."""

from __future__ import annotations

from .read import read_sample
from .spatialdata import read_spatialdata_io, write_spatialdata

__all__ = ["read_sample", "read_spatialdata_io", "write_spatialdata"]
