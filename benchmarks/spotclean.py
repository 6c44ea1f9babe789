"""undiffuse against SpotClean (R/Bioconductor) on the project's simulations, side by side (issue 12, item 6).

For each diffusion setting, simulates the sample of ``benchmarks/accuracy.py``, then corrects the same genes
(every ``--gene-stride``-th selected gene) with SpotClean (``createSlide`` + ``spotclean`` on all spots, the
background included, at the simulated slide positions; ``benchmarks/spotclean.R``) and with undiffuse's
``correct`` (defaults, then one option changed per row: ``VARIANTS``; ``benchmarks/previous.py``'s runner).
Each method runs in a process of its own on the same machine under the same load, so their times are reported
as a ratio. Scores over tissue spots with ``benchmarks/accuracy.py``'s ``score``, beside raw counts, the
zero-background baseline and EM with the true kernel (maximum likelihood), and checks issue 12's accuracy
criteria for the defaults. Not part of CI.

SpotClean is never copied into this repository: its source is fetched at benchmark time and installed, with
the imports Debian does not package, into a private R library (``--r-library``, default under
``~/.cache/undiffuse-benchmarks``). Setup on Debian 12 (R 4.2, Bioconductor 3.16)::

    apt-get install r-base-dev r-cran-seurat r-bioc-summarizedexperiment r-bioc-singlecellexperiment \\
        r-bioc-dropletutils r-bioc-rhdf5 r-cran-rjson r-cran-viridis r-cran-magick r-cran-png r-cran-jpeg \\
        r-cran-tiff r-bioc-biocfilecache
    git clone https://github.com/zijianni/SpotClean /tmp/SpotClean            # 1.7.1 was measured
    git clone https://github.com/jefferis/bmp /tmp/bmp                        # readbitmap's import
    git clone https://github.com/jefferis/readbitmap /tmp/readbitmap
    git clone -b RELEASE_3_16 https://github.com/drighelli/SpatialExperiment /tmp/SpatialExperiment

Usage::

    .venv/bin/python benchmarks/spotclean.py --spotclean-src /tmp/SpotClean \\
        --r-dependency /tmp/bmp --r-dependency /tmp/readbitmap --r-dependency /tmp/SpatialExperiment
    .venv/bin/python benchmarks/spotclean.py --setting moderate      # SpotClean already in --r-library

Writes ``benchmarks/results/spotclean[_SUFFIX].json`` and ``.md``; the settings not run keep their earlier results
there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.io
import scipy.sparse as sp
import torch
from accuracy import SimulatedSample, score, simulate_prepared, true_kernel_estimate, zero_background_baseline
from previous import run_previous

from undiffuse.correct import CorrectionConfig

RESULTS = Path(__file__).resolve().parent / "results"
R_SCRIPT = Path(__file__).resolve().parent / "spotclean.R"
DEFAULT_R_LIBRARY = Path.home() / ".cache" / "undiffuse-benchmarks" / "R-library"

#: undiffuse's rows: the defaults (the time ratio is taken against it), then one option changed per row
#: (``reference``: the simulator's single-cell reference of the sample, ``reference.h5ad``).
VARIANTS = {
    "undiffuse": {},
    "undiffuse_uniform_prior": {"prior_weights": "uniform"},
    "undiffuse_programmes": {"programmes": "held_out"},
    "undiffuse_reference": {"reference": True},
}

SETTINGS = {
    "moderate": {"kernel": "gaussian", "kernel_scale": 2.5},
    "strong_heavy_tailed": {"kernel": "heavy_tailed", "kernel_scale": 5.0},
    "weak": {"kernel": "gaussian", "kernel_scale": 1.0},
}


def install_spotclean(library: Path, spotclean_source: Path | None, dependencies: list[Path]) -> None:
    """Install ``dependencies`` then SpotClean from source folders into the private R ``library``."""
    library.mkdir(parents=True, exist_ok=True)
    for source in [*dependencies, *([spotclean_source] if spotclean_source else [])]:
        subprocess.run(
            ["R", "CMD", "INSTALL", "--no-docs", "--no-multiarch", "-l", str(library), str(source)],
            check=True,
        )
    probe = f'.libPaths(c("{library}", .libPaths())); cat(as.character(packageVersion("SpotClean")))'
    found = subprocess.run(["Rscript", "-e", probe], capture_output=True, text=True)
    if found.returncode != 0:
        raise SystemExit(
            f"SpotClean is not installed in {library}: pass --spotclean-src (and --r-dependency) to install it"
        )


def run_spotclean(sample: SimulatedSample, library: Path) -> dict:
    """Run SpotClean on all spots of ``sample``'s genes in an R process.

    Returns
    -------
    dict with ``corrected`` ``(N, G)`` (zero in background spots, which SpotClean drops), ``seconds`` (time
    inside ``createSlide`` + ``spotclean``), ``process_seconds`` and SpotClean's fitted ``meta``.
    """
    adata = sample.adata
    with tempfile.TemporaryDirectory(prefix="undiffuse-spotclean-") as scratch:
        inputs, outputs = Path(scratch) / "in", Path(scratch) / "out"
        inputs.mkdir()
        outputs.mkdir()
        scipy.io.mmwrite(inputs / "counts.mtx", sp.csc_matrix(sample.counts.T))
        (inputs / "genes.txt").write_text("\n".join(sample.genes) + "\n")
        (inputs / "barcodes.txt").write_text("\n".join(adata.obs_names) + "\n")
        (inputs / "keep.txt").write_text("\n".join(sample.genes) + "\n")
        # obsm["spatial"] is (x, y) in full-resolution pixels: image column, image row.
        pixels = np.asarray(adata.obsm["spatial"], dtype=np.float64)
        pd.DataFrame(
            {
                "barcode": adata.obs_names,
                "tissue": sample.tissue.astype(int),
                "row": adata.obs["array_row"].to_numpy(),
                "col": adata.obs["array_col"].to_numpy(),
                "imagerow": pixels[:, 1],
                "imagecol": pixels[:, 0],
            }
        ).to_csv(inputs / "slide.csv", index=False)
        started = time.perf_counter()
        subprocess.run(["Rscript", str(R_SCRIPT), str(library), str(inputs), str(outputs)], check=True)
        process_seconds = time.perf_counter() - started
        meta = json.loads((outputs / "meta.json").read_text())
        decont = scipy.io.mmread(outputs / "decont.mtx").toarray().T
        genes = (outputs / "decont_genes.txt").read_text().split()
        barcodes = (outputs / "decont_barcodes.txt").read_text().split()
    if sorted(genes) != sorted(sample.genes):
        raise RuntimeError(f"SpotClean returned {len(genes)} of the {len(sample.genes)} genes it was given")
    corrected = np.zeros_like(sample.counts)
    rows = adata.obs_names.get_indexer(barcodes)
    columns = pd.Index(sample.genes).get_indexer(genes)
    corrected[np.ix_(rows, columns)] = decont
    return {
        "corrected": corrected,
        "seconds": float(meta.pop("seconds")),
        "process_seconds": process_seconds,
        "meta": meta,
    }


def benchmark_setting(root: Path, simulation: dict, *, gene_stride: int, library: Path) -> dict:
    """Simulate one setting and score every method on it."""
    sample = simulate_prepared(root, gene_stride=gene_stride, **simulation)
    truth, tissue, genes = sample.truth, sample.tissue, sample.genes
    figures = {
        "raw": score(sample.counts, truth, tissue, genes),
        "zero_background_rescaled": score(
            zero_background_baseline(sample.counts, tissue), truth, tissue, genes
        ),
    }
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    oracle = true_kernel_estimate(sample, replace(CorrectionConfig(), prior_strength=0.0))
    seconds["em_true_kernel"] = time.perf_counter() - started
    figures["em_true_kernel"] = score(oracle, truth, tissue, genes)

    spotclean = run_spotclean(sample, library)
    figures["spotclean"] = score(spotclean["corrected"], truth, tissue, genes)
    seconds["spotclean"] = spotclean["seconds"]

    runs, process_seconds = {}, {}
    for variant, options in VARIANTS.items():
        if options.get("reference"):
            options = {**options, "reference": str(root / "sample" / "reference.h5ad")}
        started = time.perf_counter()
        runs[variant] = run_previous(None, sample.prepared, genes, sample.q_init, options)
        process_seconds[variant] = time.perf_counter() - started
        figures[variant] = score(runs[variant]["corrected"].astype(np.float64), truth, tissue, genes)
        seconds[variant] = runs[variant]["seconds"]
    ours = runs["undiffuse"]
    return {
        "simulation": simulation,
        "n_spots": int(sample.adata.n_obs),
        "n_tissue_spots": int(tissue.sum()),
        "n_genes_corrected": len(genes),
        "figures": figures,
        "seconds": seconds,
        "process_seconds": {
            "spotclean": spotclean["process_seconds"],
            "undiffuse": process_seconds["undiffuse"],
        },
        "time_ratio_spotclean_over_undiffuse": seconds["spotclean"] / seconds["undiffuse"],
        "spotclean_fit": spotclean["meta"],
        "undiffuse_params_median": {
            name: float(ours["params"][name].median())
            for name in ("diffusion_length", "bleed", "distal")
            if name in ours["params"]
        },
        "low_rank_choice": {
            key: runs["undiffuse_programmes"]["config"].get(key)
            for key in ("programmes", "programme_updates", "programmes_held_out_deviance")
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--spotclean-src", type=Path, help="SpotClean source folder to install")
    parser.add_argument(
        "--r-dependency",
        type=Path,
        action="append",
        default=[],
        help="an R package source folder to install before SpotClean (repeatable, in order)",
    )
    parser.add_argument("--r-library", type=Path, default=DEFAULT_R_LIBRARY, help="private R library")
    parser.add_argument(
        "--setting", choices=sorted(SETTINGS), action="append", help="diffusion setting(s) (default: all)"
    )
    parser.add_argument("--n-rows", type=int, default=78)
    parser.add_argument("--n-cols", type=int, default=64)
    parser.add_argument("--n-genes", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bleed", type=float, default=0.3)
    parser.add_argument("--distal", type=float, default=0.1)
    parser.add_argument(
        "--gene-stride", type=int, default=5, metavar="K", help="correct every K-th selected gene"
    )
    parser.add_argument("--suffix", default="")
    args = parser.parse_args()

    install_spotclean(args.r_library, args.spotclean_src, args.r_dependency)
    results = {}
    for name in args.setting or list(SETTINGS):
        simulation = SETTINGS[name] | {
            "n_rows": args.n_rows,
            "n_cols": args.n_cols,
            "n_genes": args.n_genes,
            "seed": args.seed,
            "bleed": args.bleed,
            "distal": args.distal,
        }
        with tempfile.TemporaryDirectory(prefix="undiffuse-spotclean-bench-") as scratch:
            results[name] = benchmark_setting(
                Path(scratch), simulation, gene_stride=args.gene_stride, library=args.r_library
            )
        print(json.dumps({name: results[name]}, indent=2, default=float), flush=True)

    stem = "spotclean" + (f"_{args.suffix}" if args.suffix else "")
    # Settings not rerun keep their earlier figures, so that settings can be run one at a time.
    earlier = RESULTS / f"{stem}.json"
    kept = json.loads(earlier.read_text())["settings"] if earlier.exists() else {}
    r_versions = {k: v for k, v in next(iter(results.values()))["spotclean_fit"].items() if "version" in k}
    report = {
        "settings": {name: (kept | results)[name] for name in SETTINGS if name in kept | results},
        "machine": {
            "description": "shared 2-core x86-64 CPU sandbox, no GPU; other jobs may run at the same time",
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
        }
        | r_versions,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    (RESULTS / f"{stem}.md").write_text(markdown(report))
    print(markdown(report))


def criteria(result: dict, variant: str = "undiffuse") -> list[tuple[str, str, bool]]:
    """Issue 12's accuracy criteria for one of undiffuse's rows (the defaults) on one setting: (label, value,
    met)."""
    figures = result["figures"]
    ours, theirs, oracle, raw = (figures[k] for k in (variant, "spotclean", "em_true_kernel", "raw"))
    ratio = ours["rmse"] / theirs["rmse"]
    purity = ours["marker_specificity_mean"]
    return [
        ("RMSE <= 0.9x SpotClean's", f"{ratio:.2f}x", ratio <= 0.9),
        (
            "marker specificity >= SpotClean's and > EM with the true kernel's",
            f"{purity:.4f} (SpotClean {theirs['marker_specificity_mean']:.4f}, "
            f"EM {oracle['marker_specificity_mean']:.4f})",
            purity >= theirs["marker_specificity_mean"] and purity > oracle["marker_specificity_mean"],
        ),
        (
            "mean Pearson >= raw's",
            f"{ours['pearson_mean']:.4f} (raw {raw['pearson_mean']:.4f})",
            ours["pearson_mean"] >= raw["pearson_mean"],
        ),
        ("background share <= 1%", f"{ours['background_share']:.4f}", ours["background_share"] <= 0.01),
    ]


def markdown(report: dict) -> str:
    """The results as Markdown: one table per setting."""
    machine = report["machine"]
    lines = [
        "# undiffuse against SpotClean on simulated samples",
        "",
        f"SpotClean {machine.get('version', '?')} ({machine.get('r_version', 'R ?')}) and undiffuse's `correct` "
        "(defaults), each in a process of its own, on the same genes of the same sample; scored over tissue "
        "spots by `benchmarks/accuracy.py`'s `score`. Produced by `benchmarks/spotclean.py` (how to reproduce: "
        "its docstring).",
        "",
        f"Machine: {machine['description']} ({machine['platform']}, torch {machine['torch']}). Times are "
        "seconds inside each method, measured in the same run: compare them as ratios, not as absolutes.",
    ]
    labels = {
        "raw": "raw",
        "zero_background_rescaled": "zero-background baseline",
        "em_true_kernel": "EM with the true kernel (maximum likelihood)",
        "spotclean": "SpotClean",
        "undiffuse": "undiffuse `correct` (defaults)",
        "undiffuse_uniform_prior": "undiffuse, prior without edge weights (`prior_weights: uniform`)",
        "undiffuse_programmes": "undiffuse, low-rank model, rank chosen from the data (`programmes: held_out`)",
        "undiffuse_reference": "undiffuse with the simulator's single-cell reference (`reference`)",
    }
    for name, result in report["settings"].items():
        simulation = result["simulation"]
        fit = result["spotclean_fit"]
        lines += [
            "",
            f"## {name}: {simulation['kernel']} diffusion, scale {simulation['kernel_scale']} pitches, "
            f"bleed {simulation['bleed']}, distal {simulation['distal']}",
            "",
            f"{simulation['n_rows']} x {simulation['n_cols']} spots ({result['n_tissue_spots']} in tissue), "
            f"{result['n_genes_corrected']} genes corrected, seed {simulation['seed']}.",
            "",
            "| method | RMSE (tissue) | mean Pearson | marker specificity | background share | seconds |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for method, values in result["figures"].items():
            seconds = result["seconds"].get(method)
            lines.append(
                f"| {labels[method]} | {values['rmse']:.3f} | {values['pearson_mean']:.4f} | "
                f"{values['marker_specificity_mean']:.4f} | {values['background_share']:.4f} | "
                f"{'' if seconds is None else f'{seconds:.1f}'} |"
            )
        ours = result["undiffuse_params_median"]
        for variant, title in (("undiffuse", "defaults"), ("undiffuse_reference", "with the reference")):
            if variant not in result["figures"]:
                continue
            lines += ["", f"| issue 12 criterion, {title} | value | met |", "| --- | --- | --- |"]
            lines += [
                f"| {label} | {value} | {'yes' if met else 'no'} |"
                for label, value, met in criteria(result, variant)
            ]
        lines += [
            "",
            f"Time ratio SpotClean / undiffuse: {result['time_ratio_spotclean_over_undiffuse']:.2f} "
            f"(whole processes: {result['process_seconds']['spotclean']:.1f} s / "
            f"{result['process_seconds']['undiffuse']:.1f} s).",
            f"SpotClean's fit: bleeding rate {fit['bleeding_rate']:.3f}, distal rate {fit['distal_rate']:.3f}, "
            f"radius {fit['contamination_radius']}, {fit['em_iterations']} EM iterations. undiffuse's medians: "
            + ", ".join(f"{k} {v:.3f}" for k, v in ours.items())
            + ".",
        ]
        if choice := result.get("low_rank_choice"):
            lines.append(
                f"The low-rank row chose {choice['programmes']} programmes and {choice['programme_updates']} "
                f"updates (held-out deviance by rank x updates: {choice['programmes_held_out_deviance']})."
            )
    lines += [
        "",
        "## How to reproduce",
        "",
        "SpotClean is not part of this repository and the benchmark is not part of CI. On Debian 12, install R "
        "and the Bioconductor 3.16 packages with `apt-get`, clone SpotClean and the three R packages Debian "
        "lacks (bmp, readbitmap, SpatialExperiment on its `RELEASE_3_16` branch), then run "
        "`benchmarks/spotclean.py --spotclean-src DIR --r-dependency DIR ...`: it installs them into a private "
        "R library and runs every setting (`--setting` picks some; the others keep their results here). The "
        "exact commands are in the script's docstring.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
