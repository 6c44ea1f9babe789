"""Time and peak memory of the correction against the number of spots (issue 4's scale figures).

Each size is simulated and prepared first; the correction then runs in a fresh subprocess, so that its peak
resident memory (VmHWM) is its own, and is timed on all the sample's genes with the default
configuration. Memory must grow linearly with the number of spots: no ``N x N`` matrix is ever built.

Writes ``benchmarks/results/scale[_SUFFIX].json`` and ``.md``.

Usage::

    .venv/bin/python benchmarks/scale.py                           # three sizes x 64 genes, and 4,992 x 256
    .venv/bin/python benchmarks/scale.py --sizes 20x16 40x32 --genes 16 --full-genes 0 --suffix quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from undiffuse.memory import peak_rss_mb

RESULTS = Path(__file__).resolve().parent / "results"


def prepare(n_rows: int, n_cols: int, n_genes: int, folder: Path) -> Path:
    """Simulate and prepare a sample; returns the path of its prepared.h5ad."""
    from undiffuse.prepare import prepare_sample
    from undiffuse.simulate import simulate_sample

    outs = simulate_sample(folder / "sample", n_rows=n_rows, n_cols=n_cols, n_genes=n_genes, seed=0)
    prepare_sample(outs, folder / "prepared", n_top_genes=n_genes, min_counts=1)
    return folder / "prepared" / "prepared.h5ad"


def measure(prepared: Path, epochs: int | None) -> dict[str, float]:
    """Correct a prepared sample in this (fresh) process: spots, genes, seconds and peak RSS (MB)."""
    import anndata as ad

    from undiffuse.correct import CorrectionConfig, correct

    adata = ad.read_h5ad(prepared)
    genes = adata.var_names[adata.var["selected"].to_numpy(bool)].tolist()
    config = (
        CorrectionConfig(progress=False)
        if epochs is None
        else CorrectionConfig(epochs=epochs, progress=False)
    )
    before = peak_rss_mb()
    started = time.perf_counter()
    correct(adata, genes=genes, config=config)
    seconds = time.perf_counter() - started
    peak = peak_rss_mb()
    resolved = adata.uns["undiffuse"]["correction"]["config"]
    return {
        "n_spots": int(adata.n_obs),
        "n_tissue_spots": int(adata.obs["in_tissue"].sum()),
        "n_genes": len(genes),
        "operator": resolved["operator"],
        # "none" on the lattice operator, which has no cutoff radius.
        "cutoff_pitches": resolved["cutoff"],
        "epochs": int(resolved["epochs"]),
        "seconds": seconds,
        "peak_rss_mb": peak,
        "peak_rss_before_correct_mb": before,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", nargs="+", default=["26x22", "52x42", "78x64"], help="ROWSxCOLS grids")
    parser.add_argument("--genes", type=int, default=64, help="genes for the size series")
    parser.add_argument("--full-genes", type=int, default=256, help="genes at 78x64 (0: skip)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--suffix", default="")
    parser.add_argument("--one", type=Path, metavar="PREPARED", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.one:
        print(json.dumps(measure(args.one, args.epochs)))
        return

    runs = [(*map(int, size.split("x")), args.genes) for size in args.sizes]
    if args.full_genes:
        runs.append((78, 64, args.full_genes))
    rows = []
    for n_rows, n_cols, n_genes in runs:
        with tempfile.TemporaryDirectory(prefix="undiffuse-scale-") as scratch:
            prepared = prepare(n_rows, n_cols, n_genes, Path(scratch))
            # A fresh process per run, so that its peak memory is the correction's own.
            command = [sys.executable, __file__, "--one", str(prepared)]
            if args.epochs is not None:
                command += ["--epochs", str(args.epochs)]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(output.strip().splitlines()[-1]))
        print(rows[-1], flush=True)

    import torch

    report = {
        "runs": rows,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "device": "cpu",
            "note": "2-core sandbox shared with other work; times are upper bounds",
        },
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "scale" + (f"_{args.suffix}" if args.suffix else "")
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# Correction time and peak memory against the number of spots",
        "",
        "| spots | tissue spots | genes | operator | cutoff (pitches) | epochs | seconds | peak RSS (MB) | RSS before correct (MB) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['n_spots']} | {r['n_tissue_spots']} | {r['n_genes']} | {r['operator']} | {r['cutoff_pitches']} | "
        f"{r['epochs']} | "
        f"{r['seconds']:.1f} | {r['peak_rss_mb']:.0f} | {r['peak_rss_before_correct_mb']:.0f} |"
        for r in rows
    ]
    lines += ["", f"Machine: {report['machine']}", ""]
    (RESULTS / f"{stem}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
