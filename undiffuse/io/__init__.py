"""Readers that turn Space Ranger outputs, h5ad files and Visium HD bins into the canonical AnnData."""

from __future__ import annotations

from .read import read_sample

__all__ = ["read_sample"]
