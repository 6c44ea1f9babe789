"""Visium HD through the whole workflow: wall time and peak memory of every rule on a full-size slide.

The workflow runs as a user runs it (``snakemake --cores 2``) in a working directory of its own, on one sample
of the Visium HD simulator (``input: simulate_hd``, preset ``full``: the 6.5 mm capture area, about 660,000
bins of 8 um), so every rule runs: simulate_hd, prepare, init_quantiles, the correct_chunk jobs, merge,
aggregate_bins, spatialdata and the report with its comparison against the truth.

Per job it reads:
- the step's own log, which ends with its wall time and exact peak memory (``workflow_scripts/step_logging``);
- the memory and run time the workflow asked the scheduler for (snakemake's job listing).

It also checks that the corrected matrix is stored sparse, and copies the report's accuracy summary.

Writes ``benchmarks/results/hd_workflow_<bin>um_<genes>genes.json`` and ``.md``.

Usage::

    .venv/bin/python benchmarks/hd_workflow.py --bin-um 8 --genes 100 --workdir /tmp/hd_workflow
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import pandas as pd
from tables import markdown_table

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
SAMPLE = "hd"
FINISHED = re.compile(r"step finished in ([0-9.]+) s, peak memory ([0-9]+) MB$")


def write_config(
    workdir: Path, *, preset: str, bin_um: int, genes: int, chunk_size: int, programmes: int | str, seed: int
) -> Path:
    """Sample sheet and config of the run; every key not set here keeps the workflow's default."""
    sheet = workdir / "samples.tsv"
    sheet.write_text(f"sample\tinput\tseed\tbin_size\n{SAMPLE}\tsimulate_hd\t{seed}\t{bin_um}\n")
    config = workdir / "config.yaml"
    config.write_text(
        json.dumps(
            {
                "samples": str(sheet),
                "outdir": "results",
                "simulation_hd": {"preset": preset, "n_genes": genes},
                "prepare": {"n_top_genes": genes},
                "correct": {"chunk_size": chunk_size, "programmes": programmes},
            },
            indent=2,
        )
    )
    return config


def requested_resources(snakemake_log: str) -> dict[str, dict[str, str]]:
    """``{job: {mem_mb, runtime}}`` from snakemake's job listing; a job is named like its log file."""
    jobs, rule, wildcards = {}, None, {}
    for line in snakemake_log.splitlines():
        stripped = line.strip()
        if re.match(r"^(local)?(rule|checkpoint) \w+:$", stripped):
            rule, wildcards = stripped.split()[-1].rstrip(":"), {}
        elif rule and stripped.startswith("wildcards:"):
            wildcards = dict(item.split("=", 1) for item in stripped.removeprefix("wildcards:").split(", "))
        elif rule and stripped.startswith("resources:"):
            fields = dict(
                item.split("=", 1) for item in stripped.removeprefix("resources:").strip().split(", ")
            )
            jobs[job_name(rule, wildcards)] = {key: fields.get(key, "") for key in ("mem_mb", "runtime")}
            rule = None
    return jobs


def job_name(rule: str, wildcards: dict[str, str]) -> str:
    """The name of a job's log below ``logs/<sample>/``, as the rules name them."""
    if rule == "correct_chunk":
        return f"correct_chunk/{wildcards['chunk']}"
    if rule == "aggregate_bins":
        return f"aggregate_bins_{wildcards['size']}um"
    if rule == "superres":
        return f"superres_{wildcards['factor']}x"
    return rule


def step_table(workdir: Path, requested: dict[str, dict[str, str]], jobs: set[str]) -> list[dict]:
    """One row per finished job of the workflow's ``jobs``: wall time and peak memory from its log, and what
    it asked for. Logs of jobs that are no longer in the workflow (an earlier run's chunks) are left out."""
    rows = []
    # In the order the jobs finished.
    for log in sorted((workdir / "logs").rglob("*.log"), key=lambda path: path.stat().st_mtime):
        match = next(filter(None, map(FINISHED.search, reversed(log.read_text().splitlines()))), None)
        if match is None:
            continue
        relative = log.relative_to(workdir / "logs").with_suffix("")
        name = str(relative.relative_to(SAMPLE)) if relative.parts[0] == SAMPLE else str(relative)
        if name not in jobs:
            continue
        asked = requested.get(name, {})
        rows.append(
            {
                "step": name,
                "seconds": float(match.group(1)),
                "peak_mb": int(match.group(2)),
                "requested_mem_mb": asked.get("mem_mb", ""),
                "requested_runtime_min": asked.get("runtime", ""),
            }
        )
    return rows


def stored_layers(path: Path) -> dict[str, str]:
    """Encoding of X and each layer of an .h5ad file (csr_matrix, csc_matrix or array)."""
    with h5py.File(path, "r") as store:
        found = {"X": store["X"].attrs.get("encoding-type", "array")}
        for name, item in store["layers"].items():
            found[f"layers/{name}"] = item.attrs.get("encoding-type", "array")
    return {key: str(value) for key, value in found.items()}


def shape_of(path: Path) -> tuple[int, int]:
    with h5py.File(path, "r") as store:
        return len(store["obs"][store["obs"].attrs["_index"]]), len(
            store["var"][store["var"].attrs["_index"]]
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--preset", choices=("ci", "full"), default="full", help="size of the simulated slide"
    )
    parser.add_argument("--bin-um", type=int, choices=(2, 8, 16), default=8)
    parser.add_argument("--genes", type=int, default=100)
    parser.add_argument("--chunk-size", type=int, default=100, help="genes per correct_chunk job")
    parser.add_argument(
        "--programmes",
        type=lambda value: value if value == "auto" else int(value),
        default="auto",
        help="correct.programmes (auto: 8 on Visium HD)",
    )
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--workdir", type=Path, help="working directory of the run (default: a new one in /tmp)"
    )
    parser.add_argument(
        "--rerun-from",
        metavar="RULE",
        help="in a working directory run before, run this rule and all after it again (e.g. prepare: the "
        "simulation is kept, and its log and figures from the earlier run)",
    )
    args = parser.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="undiffuse-hd-workflow-"))
    workdir.mkdir(parents=True, exist_ok=True)
    config = write_config(
        workdir,
        preset=args.preset,
        bin_um=args.bin_um,
        genes=args.genes,
        chunk_size=args.chunk_size,
        programmes=args.programmes,
        seed=args.seed,
    )
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile")]
    command += ["--directory", str(workdir), "--cores", str(args.cores), "--configfile", str(config)]
    if args.rerun_from:
        command += ["--forcerun", args.rerun_from]
    print("running:", " ".join(command), flush=True)
    started = time.perf_counter()
    with open(workdir / "snakemake.log", "w") as log:
        status = subprocess.run(
            command, stdout=log, stderr=subprocess.STDOUT, env=os.environ | {"PYTHONUNBUFFERED": "1"}
        )
    wall = time.perf_counter() - started
    snakemake_log = (workdir / "snakemake.log").read_text()
    if status.returncode != 0:
        sys.exit(f"the workflow failed (exit {status.returncode}); see {workdir / 'snakemake.log'}")

    # The jobs of this run, and those a dry run of the whole workflow lists: it cannot list the chunk jobs,
    # which the quantile checkpoint decides, so an earlier run's chunk logs are left out.
    listing = subprocess.run(
        [*command, "--forceall", "--dry-run"], capture_output=True, text=True, check=True
    ).stdout
    requested = requested_resources(snakemake_log)
    steps = step_table(workdir, requested, set(requested) | set(requested_resources(listing)))
    results = workdir / "results" / SAMPLE
    corrected = results / "corrected.h5ad"
    n_bins, n_genes = shape_of(corrected)
    summary = pd.read_csv(results / "metrics" / "summary.tsv", sep="\t")
    record = {
        "preset": args.preset,
        "bin_um": args.bin_um,
        "bins": n_bins,
        "genes": n_genes,
        "chunk_size": args.chunk_size,
        "programmes": args.programmes,
        "cores": args.cores,
        "rerun_from": args.rerun_from,
        "workflow_seconds": wall,
        "steps": steps,
        "corrected_storage": stored_layers(corrected),
        "corrected_mb": corrected.stat().st_size / 2**20,
        "dense_bins_x_genes_mb": n_bins * n_genes * 4 / 2**20,
        "report_summary": summary.to_dict(orient="records"),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
    }
    stem = f"hd_workflow_{args.bin_um}um_{n_genes}genes" + (
        "" if args.preset == "full" else f"_{args.preset}"
    )
    (RESULTS / f"{stem}.json").write_text(json.dumps(record, indent=2, default=str))
    (RESULTS / f"{stem}.md").write_text(markdown(record))
    print(markdown(record))


def markdown(record: dict) -> str:
    lines = [
        f"# Visium HD through the whole workflow: {record['bins']:,} bins of {record['bin_um']} um x "
        f"{record['genes']} genes",
        "",
        f"`snakemake --cores {record['cores']}` on one simulated sample (`simulate_hd`, preset `{record['preset']}`),"
        f" genes corrected in chunks of {record['chunk_size']} with `programmes: {record.get('programmes', 0)}`:"
        f" {record['workflow_seconds'] / 60:.1f} min in all"
        + (f" from `{record['rerun_from']}` on." if record.get("rerun_from") else ".")
        + " Wall time and peak memory of each job are the ones its log ends with (exact peak RSS of the job's"
        " process and its largest child); requested memory and run time are what the workflow asked the"
        " scheduler for."
        + (
            f" The steps before `{record['rerun_from']}` come from an earlier run in the same folder (the"
            " resources it asked for are not listed)."
            if record.get("rerun_from")
            else ""
        ),
        "",
        "| step | wall (s) | peak memory (MB) | requested memory (MB) | requested run time (min) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in record["steps"]:
        lines.append(
            f"| {row['step']} | {row['seconds']:.0f} | {row['peak_mb']:,} | {row['requested_mem_mb']} |"
            f" {row['requested_runtime_min']} |"
        )
    storage = ", ".join(f"{key}: {value}" for key, value in record["corrected_storage"].items())
    lines += [
        "",
        f"`corrected.h5ad`: {record['corrected_mb']:.0f} MB on disk ({storage}). A dense float32 bins x genes"
        f" matrix of this sample would take {record['dense_bins_x_genes_mb']:.0f} MB.",
        "",
        "The report's summary against the truth (`results/hd/metrics/summary.tsv`):",
        "",
    ]
    lines += markdown_table(
        pd.DataFrame(record["report_summary"]), lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    )
    lines += ["", f"Machine: {record['machine']}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
