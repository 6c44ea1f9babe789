"""Time and peak memory of ``correct``, as ratios against an earlier engine measured in the same run.

Cases (each a simulated full Visium slide of 4,992 spots unless said otherwise):

- ``short``: Gaussian diffusion of scale 1 pitch, 300 genes;
- ``long``: heavy-tailed diffusion of scale 5 pitches, 300 genes;
- ``sizes``: the default diffusion on 572, 2,184 and 4,992 spots, 64 genes (memory against the spot count);
- ``genes2000``: the default diffusion, 2,000 genes.

Every correction runs in a child process of its own (``benchmarks/previous.py``), so that its peak resident
memory is its own; the earlier engine (``--previous REV``) runs on the same prepared data and genes right after
the current one. With ``--previous-genes K`` the earlier engine corrects only the first ``K`` genes, and the
ratio is taken against the current engine on the same ``K`` genes.

Writes ``benchmarks/results/speed.json`` and ``speed.md``.

Usage::

    .venv/bin/python benchmarks/speed.py --previous eb6653d
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from previous import run_previous

from undiffuse.moran import scan_quantiles
from undiffuse.prepare import prepare_sample
from undiffuse.simulate import simulate_sample

RESULTS = Path(__file__).resolve().parent / "results"

CASES = {
    "short": [dict(n_rows=78, n_cols=64, n_genes=300, kernel="gaussian", kernel_scale=1.0)],
    "long": [dict(n_rows=78, n_cols=64, n_genes=300, kernel="heavy_tailed", kernel_scale=5.0)],
    "sizes": [
        dict(n_rows=26, n_cols=22, n_genes=64),
        dict(n_rows=52, n_cols=42, n_genes=64),
        dict(n_rows=78, n_cols=64, n_genes=64),
    ],
    "genes2000": [dict(n_rows=78, n_cols=64, n_genes=2000)],
}


def run_case(name: str, sample: dict, root: Path, previous: str | None, previous_genes: int | None) -> dict:
    folder = root / f"{name}_{sample['n_rows']}x{sample['n_cols']}"
    started = time.perf_counter()
    outs = simulate_sample(folder / "sample", seed=0, **sample)
    adata = prepare_sample(outs, folder / "prepared", n_top_genes=sample["n_genes"])
    prepare_s = time.perf_counter() - started
    genes = adata.var_names[adata.var["selected"].to_numpy(bool)].tolist()
    q_init = scan_quantiles(adata, genes).set_index("gene")["q_init"]
    prepared = folder / "prepared" / "prepared.h5ad"
    row = {
        "case": name,
        "n_spots": int(adata.n_obs),
        "n_tissue_spots": int(adata.obs["in_tissue"].sum()),
        "n_genes": len(genes),
        "simulation": sample,
        "qc_diffusion_cutoff": float(adata.uns["undiffuse"]["diffusion_cutoff"]),
        "qc_diffusion_scale": float(adata.uns["undiffuse"]["diffusion_scale"]),
        "simulate_prepare_s": prepare_s,
    }
    current = run_previous(None, prepared, genes, q_init)
    row |= {"seconds": current["seconds"], "peak_rss_mb": current["peak_rss_mb"], "config": current["config"]}
    if previous:
        subset = genes[:previous_genes] if previous_genes else genes
        if len(subset) < len(genes):
            same = run_previous(None, prepared, subset, q_init)
            row |= {"subset_genes": len(subset), "subset_seconds": same["seconds"]}
        else:
            same = current
        earlier = run_previous(previous, prepared, subset, q_init)
        row |= {
            "previous": previous,
            "previous_seconds": earlier["seconds"],
            "previous_peak_rss_mb": earlier["peak_rss_mb"],
            "speedup": earlier["seconds"] / same["seconds"],
        }
    print(json.dumps(row, default=float), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--previous", metavar="REV", help="earlier git revision to compare with")
    parser.add_argument("--previous-genes", type=int, default=None, metavar="K")
    parser.add_argument("--suffix", default="")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory(prefix="undiffuse-speed-") as scratch:
        for name in args.cases:
            compare = args.previous if name in ("short", "long") else None
            for sample in CASES[name]:
                rows.append(run_case(name, sample, Path(scratch), compare, args.previous_genes))
    machine = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "device": "cpu",
        "note": "shared 2-core sandbox; other jobs may have run at the same time, so ratios are the robust figure",
    }
    stem = "speed" + (f"_{args.suffix}" if args.suffix else "")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(
        json.dumps({"machine": machine, "runs": rows}, indent=2, default=float)
    )
    lines = [
        "# Speed and memory of `correct`",
        "",
        "| case | spots | genes | diffusion | operator | seconds | peak RSS (MB) | earlier engine | its seconds "
        "(genes) | speed-up |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        sim = r["simulation"]
        diffusion = f"{sim.get('kernel', 'gaussian')} {sim.get('kernel_scale', 2.5)}"
        earlier = (
            f"{r['previous']} | {r['previous_seconds']:.1f} ({r.get('subset_genes', r['n_genes'])}) | "
            f"{r['speedup']:.1f}x"
            if "previous" in r
            else "| | "
        )
        lines.append(
            f"| {r['case']} | {r['n_spots']} | {r['n_genes']} | {diffusion} | {r['config'].get('operator')} | "
            f"{r['seconds']:.1f} | {r['peak_rss_mb']:.0f} | {earlier} |"
        )
    lines += ["", f"Machine: {machine}", ""]
    (RESULTS / f"{stem}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
