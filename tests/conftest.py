"""Shared fixtures: a tiny simulated sample and the optional real data beside the repository."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

#: A sample small enough for unit tests, big enough to have background spots all round the tissue.
TINY_SAMPLE = dict(n_rows=24, n_cols=20, n_genes=24, seed=7)


@pytest.fixture(scope="session")
def tiny_sample(tmp_path_factory) -> Path:
    """Folder of a small simulated sample: ``outs/`` (Space Ranger layout) and ``truth.h5ad``."""
    from undiffuse.simulate import simulate_sample

    root = tmp_path_factory.mktemp("tiny_sample")
    simulate_sample(root, **TINY_SAMPLE)
    return root


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data``, or a skip when this checkout has none beside it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not available: {SHARED_DATA} is absent")
    return SHARED_DATA
