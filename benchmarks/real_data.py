"""The real mouse brain (``../shared/data/visium_mouse_brain_raw_top100``): what the correction learns and keeps.

Prepares the raw Space Ranger output, scans the quantiles, corrects all 100 genes (in a child process, so that
its time and peak memory are its own; with ``--previous REV`` also an earlier engine on the same data), and
reports the background mass after correction against the raw background mass, the learned diffusion lengths, the
agreement of the re-diffused field with the counts, and the time.

Writes ``benchmarks/results/real_data.json`` and ``.md``.

Usage::

    .venv/bin/python benchmarks/real_data.py --previous 82269b4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

import numpy as np
import torch
from previous import run_previous

from undiffuse.correct import rediffuse, store_correction
from undiffuse.metrics import pearson
from undiffuse.moran import gene_morans_i, scan_quantiles
from undiffuse.prepare import prepare_sample

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO.parent / "shared" / "data" / "visium_mouse_brain_raw_top100" / "outs"
RESULTS = Path(__file__).resolve().parent / "results"
PITCH_UM = 100.0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sample", type=Path, default=SAMPLE)
    parser.add_argument("--previous", metavar="REV")
    args = parser.parse_args()
    if not args.sample.is_dir():
        raise SystemExit(f"{args.sample}: not found; this benchmark needs the shared real data")

    with tempfile.TemporaryDirectory(prefix="undiffuse-real-") as scratch:
        adata = prepare_sample(args.sample, Path(scratch) / "prepared", n_top_genes=100, min_counts=0)
        genes = adata.var_names[adata.var["selected"].to_numpy(bool)].tolist()
        q_init = scan_quantiles(adata, genes).set_index("gene")["q_init"]
        prepared = Path(scratch) / "prepared" / "prepared.h5ad"
        run = run_previous(None, prepared, genes, q_init)
        earlier = run_previous(args.previous, prepared, genes, q_init) if args.previous else None

    tissue = adata.obs["tissue"].to_numpy(bool)
    counts = np.asarray(adata[:, genes].X.toarray(), dtype=np.float64)
    corrected = run["corrected"].astype(np.float64)
    # rediffuse reads the correction in undiffuse.correct's layout, as the child's correct() wrote it.
    subset = adata[:, genes].copy()
    store_correction(
        subset,
        corrected=corrected.astype(np.float32),
        params=run["params"],
        provenance={"layer": "corrected", "counts": "X", "config": run["config"]},
        counts=subset.X,
        key_added="corrected",
    )
    again = rediffuse(subset)
    params = run["params"]
    report = {
        "spots": int(adata.n_obs),
        "tissue_spots": int(tissue.sum()),
        "genes": len(genes),
        "qc_diffusion_cutoff_pitches": float(adata.uns["undiffuse"]["diffusion_cutoff"]),
        "qc_diffusion_scale_pitches": float(adata.uns["undiffuse"]["diffusion_scale"]),
        "operator": run["config"].get("operator"),
        "correct_s": run["seconds"],
        "peak_rss_mb": run["peak_rss_mb"],
        "background_mass_raw": float(counts[~tissue].sum()),
        "background_mass_corrected": float(corrected[~tissue].sum()),
        "background_mass_ratio": float(corrected[~tissue].sum() / counts[~tissue].sum()),
        "totals_max_relative_change": float(np.abs(corrected.sum(0) / counts.sum(0) - 1).max()),
        "diffusion_length_median_pitches": float(params["diffusion_length"].median()),
        "diffusion_length_median_um": float(params["diffusion_length"].median() * PITCH_UM),
        "bleed_median": float(params["bleed"].median()),
        "distal_median": float(params["distal"].median()),
        "rediffused_vs_counts_pearson_mean": float(pearson(again, counts).mean()),
        "moran_raw_median": float(np.median(gene_morans_i(adata, genes))),
        "finite": bool(np.isfinite(corrected).all()),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__},
    }
    if earlier is not None:
        report |= {
            "previous": args.previous,
            "previous_correct_s": earlier["seconds"],
            "previous_peak_rss_mb": earlier["peak_rss_mb"],
            "previous_diffusion_length_median_pitches": float(earlier["params"]["diffusion_length"].median()),
            "previous_cutoff_pitches": earlier["config"].get("cutoff"),
            "speedup": earlier["seconds"] / run["seconds"],
        }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "real_data.json").write_text(json.dumps(report, indent=2, default=float))
    lines = ["# Real mouse brain (Visium, 100 genes)", ""]
    lines += [f"- {key}: {value}" for key, value in report.items()]
    (RESULTS / "real_data.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
