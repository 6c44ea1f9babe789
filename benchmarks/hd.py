"""Visium HD scale: time, peak memory and accuracy of ``correct`` on a whole capture area of square bins.

The sample is made here, in memory, at the scale of a real slide: a 6.5 mm square capture area of 8 um (812 x
812 bins, ~660,000) or 16 um bins, about half of it tissue (an irregular blob with a few domains), true
expression per domain with smooth variation, diffused by the forward model (:func:`undiffuse.diffusion.diffuse`,
Gaussian, per-gene lengths of 5-30 um, bleed 0.3, distal 0.05) and Poisson-sampled into a sparse matrix. The
correction runs in a child process of its own (``benchmarks/previous.py``) so that its peak memory is its own.

Writes ``benchmarks/results/hd_<bin>um_<genes>genes[_<size>mm][_device].json`` and ``.md`` (the size when it is
not a whole capture area).

Usage::

    .venv/bin/python benchmarks/hd.py --bin-um 8 --genes 100
    .venv/bin/python benchmarks/hd.py --bin-um 16 --genes 2000
    .venv/bin/python benchmarks/hd.py --bin-um 8 --genes 100 --size-mm 3.25   # memory against slide size
    .venv/bin/python benchmarks/hd.py --bin-um 16 --genes 2000 --programmes held_out
    .venv/bin/python benchmarks/hd.py --bin-um 16 --genes 2000 --programmes 8 --seed 1
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from previous import run_previous
from tables import machine_facts

from undiffuse.diffusion import diffuse
from undiffuse.metrics import pearson, pooled_rmse

RESULTS = Path(__file__).resolve().parent / "results"
PIXELS_PER_UM = 0.5
DIFFUSION_UM = (5.0, 30.0)


def make_slide(bin_um: float, size_mm: float, n_genes: int, seed: int = 0) -> tuple[ad.AnnData, np.ndarray]:
    """A square-bin slide with its truth ``(N, G)``; genes are diffused and sampled in batches."""
    rng = np.random.default_rng(seed)
    side = int(round(size_mm * 1000 / bin_um))
    rows, cols = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    coords = np.column_stack([cols.ravel(), rows.ravel()]).astype(np.float64)
    centre = coords.mean(axis=0)
    offset = (coords - centre) / side
    angle = np.arctan2(offset[:, 1], offset[:, 0])
    radius = np.hypot(*offset.T)
    outline = 0.40 + 0.04 * np.sin(3 * angle + 1.0) + 0.03 * np.cos(5 * angle)
    tissue = radius < outline
    domain = np.digitize(offset[:, 0] + 0.3 * np.sin(6 * offset[:, 1]), [-0.15, 0.0, 0.15])
    n_domains = 4
    waves = np.cos(9 * offset[:, 0] + 2) * np.sin(7 * offset[:, 1] + 1)
    scale_bins = rng.uniform(*DIFFUSION_UM, n_genes) / bin_um
    depth = (bin_um / 8.0) ** 2
    counts, truth = [], []
    for start in range(0, n_genes, 50):
        genes = range(start, min(start + 50, n_genes))
        levels = rng.gamma(1.0, 4.0, (len(genes), n_domains)) * depth
        field = levels[:, domain].T * (1.0 + 0.3 * waves)[:, None] * tissue[:, None]
        expected = diffuse(
            field, coords, tissue, scale=scale_bins[list(genes)], bleed=0.3, distal=0.05, kind="gaussian"
        )
        counts.append(sp.csr_matrix(rng.poisson(expected).astype(np.float32)))
        truth.append(field.astype(np.float32))
    adata = ad.AnnData(sp.hstack(counts).tocsr())
    adata.obs_names = [f"s_{r:03d}_{c:03d}" for r, c in zip(rows.ravel(), cols.ravel(), strict=True)]
    adata.var_names = [f"gene{g:04d}" for g in range(n_genes)]
    adata.obs["in_tissue"] = tissue
    adata.obs["tissue"] = tissue
    adata.obsm["spatial"] = coords * bin_um * PIXELS_PER_UM
    adata.uns["undiffuse"] = {
        "sample_id": "hd",
        "platform": "visium_hd",
        "spot_pitch_px": bin_um * PIXELS_PER_UM,
        "diffusion_scale": float(np.median(scale_bins)),
        "diffusion_cutoff": float(3 * np.median(scale_bins)),
    }
    return adata, np.hstack(truth)


def scores(values: np.ndarray, truth: np.ndarray, tissue: np.ndarray) -> dict[str, float]:
    """RMSE and mean per-gene Pearson against the truth over the tissue bins, and the background share."""
    return {
        "rmse": pooled_rmse(values[tissue], truth[tissue]),
        "pearson_mean": float(pearson(values[tissue], truth[tissue]).mean()),
        "background_share": float(values[~tissue].sum() / values.sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bin-um", type=float, default=8.0)
    parser.add_argument("--size-mm", type=float, default=6.5)
    parser.add_argument("--genes", type=int, default=100)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--programmes", default=None, help="correct's programmes (default: its own)")
    parser.add_argument(
        "--seed", type=int, default=None, help="correct's seed (default: its own); same slide"
    )
    args = parser.parse_args()

    started = time.perf_counter()
    adata, truth = make_slide(args.bin_um, args.size_mm, args.genes)
    made_s = time.perf_counter() - started
    tissue = adata.obs["tissue"].to_numpy(bool)
    options = (
        {"device": args.device}
        | ({} if args.epochs is None else {"epochs": args.epochs})
        | ({} if args.programmes is None else {"programmes": _programmes(args.programmes)})
        | ({} if args.seed is None else {"seed": args.seed})
    )
    with tempfile.TemporaryDirectory(prefix="undiffuse-hd-") as scratch:
        path = Path(scratch) / "slide.h5ad"
        adata.write_h5ad(path)
        genes = adata.var_names.tolist()
        run = run_previous(None, path, genes, pd.Series(0.5, index=genes), options)
    figures = {
        name: scores(values, truth, tissue)
        for name, values in (("raw", adata.X.toarray()), ("corrected", run["corrected"]))
    }
    report = {
        "bins": int(adata.n_obs),
        "tissue_bins": int(tissue.sum()),
        "bin_um": args.bin_um,
        "genes": args.genes,
        "make_slide_s": made_s,
        "correct_s": run["seconds"],
        "peak_rss_mb": run["peak_rss_mb"],
        "config": run["config"],
        "figures": figures,
        "learned_diffusion_length_um_median": float(run["params"]["diffusion_length"].median() * args.bin_um),
        "machine": machine_facts(),
    }
    device = run["config"].get("device", "cpu")
    stem = (
        f"hd_{args.bin_um:g}um_{args.genes}genes"
        + ("" if args.size_mm == 6.5 else f"_{args.size_mm:g}mm")
        + ("" if args.programmes is None else f"_programmes_{args.programmes}")
        + ("" if args.seed is None else f"_seed{args.seed}")
        + ("" if device == "cpu" else f"_{device}")
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=2, default=float))
    lines = [
        f"# Visium HD scale: {report['bins']:,} bins of {args.bin_um:g} um ({report['tissue_bins']:,} in tissue), "
        f"{args.genes} genes",
        "",
        f"`correct` on {device}: {run['seconds']:.0f} s, peak RSS {run['peak_rss_mb']:.0f} MiB "
        f"({run['peak_rss_mb'] * 2**20 / 1e9:.2f} GB) "
        f"(kernel learned on {run['config'].get('trained_on_spots')} bins, batch {run['config'].get('batch_genes')}).",
        "",
        "| field | RMSE vs truth (tissue) | mean Pearson | background share |",
        "| --- | --- | --- | --- |",
    ]
    for name, values in figures.items():
        lines.append(
            f"| {name} | {values['rmse']:.3f} | {values['pearson_mean']:.4f} | {values['background_share']:.4f} |"
        )
    lines += ["", f"Machine: {report['machine']}", ""]
    (RESULTS / f"{stem}.md").write_text("\n".join(lines))
    print("\n".join(lines))


def _programmes(value: str) -> int | str:
    return int(value) if value.isdigit() else value


if __name__ == "__main__":
    main()
