"""Shared fixtures: a tiny simulated sample and the optional real data beside the repository."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from anndata import AnnData

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# The tests' subprocesses (the command line, snakemake and its jobs) import this checkout's package, as the
# tests themselves do, also where the environment has another checkout installed.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))

#: A sample small enough for unit tests, big enough to have background spots all round the tissue.
TINY_SAMPLE = dict(n_rows=24, n_cols=20, n_genes=24, seed=7)
#: Small enough for seconds, big enough for a background rim and a decay curve on 8 um bins.
SMALL_HD = dict(width_um=512.0, height_um=512.0, n_genes=8, seed=3)


def hex_lattice(n_rows: int, n_cols: int) -> np.ndarray:
    """Centres of a Visium-like hexagonal lattice, in pitches."""
    rows, cols = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    x = cols + 0.5 * (rows % 2)
    y = rows * np.sqrt(3) / 2
    return np.column_stack([x.ravel(), y.ravel()]).astype(np.float64)


def hex_sample(n_rows=20, n_cols=16, n_genes=6, *, depth=200.0, seed=0, bleed=0.3, scale=1.8, distal=0.01):
    """A small hexagonal sample with striped domains diffused by the forward model, plus its truth."""
    rng = np.random.default_rng(seed)
    coords = hex_lattice(n_rows, n_cols)
    centre = coords.mean(axis=0)
    tissue = np.hypot(*(coords - centre).T) < 0.3 * coords.max(axis=0).min()
    domain = (coords[:, 0] // 3).astype(int) % 2
    truth = np.zeros((coords.shape[0], n_genes))
    for g in range(n_genes):
        level = depth * (0.5 + g / n_genes)
        truth[:, g] = np.where(domain == g % 2, level, 0.05 * level) * tissue
    from undiffuse.diffusion import diffuse

    expected = diffuse(truth, coords, tissue, scale=np.full(n_genes, scale), bleed=bleed, distal=distal)
    counts = rng.poisson(expected).astype(np.float32)
    image = np.ones((60, 60, 3))
    adata = AnnData(sp.csr_matrix(counts))
    adata.var_names = [f"gene{g}" for g in range(n_genes)]
    adata.obs_names = [f"spot{i}" for i in range(coords.shape[0])]
    adata.obs["in_tissue"] = tissue
    adata.obsm["spatial"] = coords * 100.0
    adata.uns["undiffuse"] = {"spot_pitch_px": 100.0, "sample_id": "toy"}
    adata.uns["spatial"] = {
        "toy": {
            "images": {"lowres": image},
            "scalefactors": {"tissue_lowres_scalef": 0.03, "spot_diameter_fullres": 55.0},
        }
    }
    return adata, truth


def tissue_rmse(values, truth, tissue):
    """RMSE against the truth over tissue spots."""
    from undiffuse.metrics import pooled_rmse

    return pooled_rmse(values[tissue], truth[tissue])


def mean_pearson(values, truth, tissue):
    """Mean over genes of the Pearson correlation with the truth over tissue spots."""
    from undiffuse.metrics import pearson

    return float(pearson(values[tissue], truth[tissue]).mean())


@pytest.fixture(scope="session")
def tiny_sample(tmp_path_factory) -> Path:
    """Folder of a small simulated sample: ``outs/`` (Space Ranger layout) and ``truth.h5ad``."""
    from undiffuse.simulate import simulate_sample

    root = tmp_path_factory.mktemp("tiny_sample")
    simulate_sample(root, **TINY_SAMPLE)
    return root


@pytest.fixture(scope="session")
def hd_sample(tmp_path_factory) -> Path:
    """Folder of a small simulated Visium HD sample: ``outs/binned_outputs/`` and ``truth/``."""
    from undiffuse.simulate_hd import simulate_hd_sample

    root = tmp_path_factory.mktemp("hd_sample")
    simulate_hd_sample(root, **SMALL_HD)
    return root


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data``, or a skip when this checkout has none beside it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not available: {SHARED_DATA} is absent")
    return SHARED_DATA
