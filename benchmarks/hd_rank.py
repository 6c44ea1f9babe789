"""Visium HD: the low-rank model's rank and updates chosen from the data, against each fixed rank (issue 12).

On ``benchmarks/hd.py``'s slide (four domains, each gene a level per domain times one smooth wave: a truth of
rank 4, diffused with Gaussian kernels of 5-30 um, bleed 0.3, distal 0.05), ``correct`` runs with each rank of
:data:`undiffuse.ot.programmes.RANK_CANDIDATES`, with ``programmes: held_out`` (the rank and number of updates
chosen by count splitting, :func:`undiffuse.ot.programmes.choose_rank`; the default on Visium HD) and,
with ``--previous REV``, with ``programmes: held_out`` of that version, each in a process of its own
(``benchmarks/previous.py``), one after the other.

Writes ``benchmarks/results/hd_rank_<bin>um_<size>mm_<genes>genes[_seed<seed>].json`` and ``.md``.

Usage::

    .venv/bin/python benchmarks/hd_rank.py --bin-um 16 --size-mm 2 --genes 500 --previous 0673014
    .venv/bin/python benchmarks/hd_rank.py --bin-um 16 --size-mm 2 --genes 500 --seed 1
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import pandas as pd
from hd import make_slide, scores
from previous import run_previous
from tables import machine_facts

from undiffuse.ot.programmes import RANK_CANDIDATES

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bin-um", type=float, default=16.0)
    parser.add_argument("--size-mm", type=float, default=2.0)
    parser.add_argument("--genes", type=int, default=500)
    parser.add_argument(
        "--previous", default=None, help="a git revision whose programmes: held_out is compared"
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="correct's seed (default: its own); same slide"
    )
    args = parser.parse_args()

    adata, truth = make_slide(args.bin_um, args.size_mm, args.genes)
    tissue = adata.obs["tissue"].to_numpy(bool)
    seed = {} if args.seed is None else {"seed": args.seed}
    runs = {f"rank {k}": (None, {"programmes": k} | seed) for k in RANK_CANDIDATES}
    runs["programmes: held_out"] = (None, {"programmes": "held_out"} | seed)
    if args.previous:
        runs[f"{args.previous}, programmes: held_out"] = (args.previous, {"programmes": "held_out"} | seed)
    rows = {"raw": scores(adata.X.toarray(), truth, tissue) | {"rank": "", "updates": "", "seconds": None}}
    with tempfile.TemporaryDirectory(prefix="undiffuse-hd-rank-") as scratch:
        path = Path(scratch) / "slide.h5ad"
        adata.write_h5ad(path)
        genes = adata.var_names.tolist()
        for name, (revision, options) in runs.items():
            run = run_previous(revision, path, genes, pd.Series(0.5, index=genes), options)
            rows[name] = scores(run["corrected"], truth, tissue) | {
                "rank": run["config"]["programmes"],
                # Versions before the number of updates was chosen with the rank always made 30.
                "updates": run["config"].get("programme_updates", 30),
                "deviance": run["config"].get("programmes_held_out_deviance", "none"),
                "seconds": run["seconds"],
                "peak_rss_mb": run["peak_rss_mb"],
            }
            print(name, rows[name], flush=True)
    report = {
        "bins": int(adata.n_obs),
        "tissue_bins": int(tissue.sum()),
        "bin_um": args.bin_um,
        "size_mm": args.size_mm,
        "genes": args.genes,
        "seed": args.seed,
        "rows": rows,
        "machine": machine_facts(),
    }
    stem = f"hd_rank_{args.bin_um:g}um_{args.size_mm:g}mm_{args.genes}genes" + (
        "" if args.seed is None else f"_seed{args.seed}"
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=2, default=float))
    lines = [
        f"# Visium HD, the rank of the low-rank model: {report['bins']:,} bins of {args.bin_um:g} um "
        f"({report['tissue_bins']:,} in tissue), {args.genes} genes",
        "",
        "`benchmarks/hd.py`'s slide (a truth of rank 4); each `correct` in a process of its own, one after the "
        "other"
        + ("" if args.seed is None else f", with seed {args.seed}")
        + ". Script: `benchmarks/hd_rank.py`. Held-out deviance per rank x updates.",
        "",
        "| run | rank used | updates | RMSE vs truth (tissue) | mean Pearson | seconds | held-out deviance |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in rows.items():
        seconds = "" if row["seconds"] is None else f"{row['seconds']:.0f}"
        deviance = row.get("deviance", "")
        deviance = "" if deviance == "none" else deviance
        lines.append(
            f"| {name} | {row['rank']} | {row['updates']} | {row['rmse']:.4f} | {row['pearson_mean']:.4f} "
            f"| {seconds} | {deviance} |"
        )
    lines += ["", f"Machine: {report['machine']}", ""]
    (RESULTS / f"{stem}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
