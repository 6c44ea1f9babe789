"""Could a loss towards a reference's gene-gene correlations help the correction? (issue 12, item 3)

Such a loss pulls the corrected fields' gene-gene correlations towards a target taken from the reference. It can
only help where that target is closer to the truth's correlations than the corrected fields already are. For the
sample of ``benchmarks/accuracy.py`` (every ``--gene-stride``-th selected gene) this script measures the mean
absolute difference from the truth's correlations (Pearson over the tissue spots, every pair of genes) of:

- the raw counts, and undiffuse's correction (defaults; with the simulator's single-cell reference);
- the targets a reference offers:
  - a single-cell reference (the simulator's ``reference.h5ad``, 200 cells of each domain): its correlations
    over cells; over its types' mean profiles weighted by the types' shares of its cells; the same weighted by
    the domains' true shares of the sample's tissue (an oracle of the tissue's composition);
  - a less-diffused spatial sample, from its raw counts over its tissue spots: the same section simulated again
    with 1-pitch Gaussian diffusion, bleed 0.05 and distal 0.01 (a bound no real reference reaches: it is the
    same tissue), and another section (the simulator's next seed) with that diffusion.

Usage::

    .venv/bin/python benchmarks/reference_correlations.py            # writes results/reference_correlations.md
"""

from __future__ import annotations

import argparse
import platform
import tempfile
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch
from accuracy import SimulatedSample, simulate_prepared

from undiffuse.arrays import as_dense
from undiffuse.correct import correct
from undiffuse.reference import DEFAULT_KEY, profiles_for, reference_profiles

RESULTS = Path(__file__).resolve().parent / "results"
#: (kernel, scale in pitches) of the samples measured, as in ``accuracy.py``'s three settings.
SETTINGS = (("gaussian", 2.5), ("heavy_tailed", 5.0), ("gaussian", 1.0))
#: The simulated samples' size, and their diffusion's shares.
SAMPLE = dict(n_rows=78, n_cols=64, n_genes=300, bleed=0.3, distal=0.1)
#: The less-diffused spatial references' diffusion.
WEAK = dict(kernel="gaussian", kernel_scale=1.0, bleed=0.05, distal=0.01)


def correlations(values: np.ndarray) -> np.ndarray:
    """``(G, G)`` Pearson correlations of the columns of ``(n, G)`` values."""
    return np.corrcoef(values, rowvar=False)


def weighted_correlations(profiles: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``(G, G)`` correlations over ``(k, G)`` type profiles, each type weighted by its share: those of spots
    that each hold one type, in these shares."""
    weights = weights / weights.sum()
    centred = profiles - weights @ profiles
    covariance = centred.T @ (centred * weights[:, None])
    scale = np.sqrt(np.diag(covariance))
    return covariance / np.outer(scale, scale)


def measure(
    root: Path, kernel: str, scale: float, seed: int, gene_stride: int, spatial: dict[str, SimulatedSample]
) -> dict[str, float]:
    """The table's column of one diffusion setting; ``spatial``: the less-diffused spatial references."""
    sample = simulate_prepared(
        root, gene_stride=gene_stride, seed=seed, kernel=kernel, kernel_scale=scale, **SAMPLE
    )
    genes, tissue = sample.genes, sample.tissue
    truth = correlations(as_dense(sample.truth[:, genes].X)[tissue])
    pairs = np.triu_indices(len(genes), 1)

    def error(matrix: np.ndarray) -> float:
        return float(np.nanmean(np.abs(matrix - truth)[pairs]))

    def corrected(**options) -> np.ndarray:
        out = correct(sample.adata, genes=genes, q_init=sample.q_init, copy=True, **options)
        return as_dense(out[:, genes].layers["corrected"])[tissue]

    reference = ad.read_h5ad(root / "sample" / "reference.h5ad")
    table = reference_profiles(reference, DEFAULT_KEY)
    profiles = profiles_for(table, pd.Index(genes))
    cells = reference.obs[DEFAULT_KEY].astype(str)
    cell_shares = cells.value_counts().reindex(table.columns).to_numpy(dtype=np.float64)
    domains = sample.truth.obs["domain"].astype(str).to_numpy()[tissue]
    tissue_shares = np.array([(domains == name).mean() for name in table.columns])
    figures = {
        "raw counts": error(correlations(sample.counts[tissue])),
        "undiffuse (defaults)": error(correlations(corrected())),
        "undiffuse with the single-cell reference": error(correlations(corrected(reference=table))),
        "target: single cells' correlations": error(correlations(as_dense(reference[:, genes].X))),
        "target: type profiles, the reference's cell shares": error(
            weighted_correlations(profiles, cell_shares)
        ),
        "target: type profiles, the tissue's true shares (oracle)": error(
            weighted_correlations(profiles, tissue_shares)
        ),
    }
    for name, other in spatial.items():
        figures[f"target: less-diffused spatial sample, {name}"] = error(
            correlations(as_dense(other.adata[:, genes].X)[other.tissue])
        )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gene-stride", type=int, default=5)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="undiffuse-correlations-") as scratch:
        # The spatial references do not depend on the setting: simulated once, scored against each.
        spatial = {
            name: simulate_prepared(
                Path(scratch) / f"spatial_{seed}", gene_stride=args.gene_stride, seed=seed, **(SAMPLE | WEAK)
            )
            for name, seed in (("the same section", args.seed), ("another section", args.seed + 1))
        }
        results = {
            f"{kernel} {scale:g}": measure(
                Path(scratch) / f"{kernel}_{scale}", kernel, scale, args.seed, args.gene_stride, spatial
            )
            for kernel, scale in SETTINGS
        }
    table = pd.DataFrame(results)
    lines = [
        "# Gene-gene correlations: the corrected fields against what a reference could give (issue 12, item 3)",
        "",
        f"Mean absolute difference from the truth's gene-gene correlations (Pearson over tissue spots, every pair of "
        f"the accuracy sample's every {args.gene_stride}th selected gene; seed {args.seed}; columns: diffusion "
        "kernel and scale in pitches, bleed 0.3, distal 0.1). Script: `benchmarks/reference_correlations.py` "
        "(its docstring says what each row is).",
        "",
        "| | " + " | ".join(table.columns) + " |",
        "| --- | " + " | ".join("---" for _ in table.columns) + " |",
        *(
            f"| {name} | " + " | ".join(f"{value:.3f}" for value in row) + " |"
            for name, row in table.iterrows()
        ),
        "",
        "A loss towards a target can only move the corrected fields' correlations towards it, so it helps only where "
        "the target's row is below undiffuse's.",
        "",
        f"Machine: {platform.platform()}, {torch.get_num_threads()} threads, torch {torch.__version__}.",
    ]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "reference_correlations.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
