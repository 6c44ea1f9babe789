"""``undiffuse report`` (one sample's metrics and HTML report) and ``undiffuse summary`` (across samples)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import InputError


def register(subparsers: argparse._SubParsersAction) -> None:
    report = subparsers.add_parser(
        "report",
        help="metrics and HTML report of one corrected sample",
        description=(
            "Evaluate CORRECTED (metrics with and without ground truth, cell types before and after), "
            "run the report notebook and convert it to self-contained HTML. Writes OUTDIR/metrics/*.tsv, "
            "OUTDIR/metrics/metrics.json, OUTDIR/report.ipynb, OUTDIR/report.html and OUTDIR/figures/*.png."
        ),
    )
    report.add_argument("corrected", type=Path, metavar="CORRECTED.h5ad", help="output of `undiffuse merge`")
    report.add_argument("outdir", type=Path, metavar="OUTDIR", help="folder of the report (results/{sample})")
    report.add_argument("--qc-dir", type=Path, default=None, help="qc/ folder of the prepare step")
    report.add_argument("--truth", type=Path, default=None, help="truth.h5ad of a simulated sample")
    report.add_argument(
        "--markers",
        type=Path,
        default=None,
        help="marker table (TSV: cell_type, gene) for the cell-type maps",
    )
    report.add_argument("--sample", default=None, help="sample name shown in the report (default: OUTDIR's)")
    report.set_defaults(func=_run_report)

    summary = subparsers.add_parser(
        "summary",
        help="one HTML summary of several samples' metrics",
        description=(
            "Collect the metrics of several samples (folders written by `undiffuse report`) into one table "
            "and figures, as an executed notebook and self-contained HTML. Each METRICS_DIR is named after "
            "its parent folder (results/{sample}/metrics) unless --names is given; the sample's report.html "
            "beside it is linked when it exists."
        ),
    )
    summary.add_argument("output", type=Path, metavar="OUT.html", help="summary HTML to write")
    summary.add_argument("metrics_dirs", type=Path, nargs="+", metavar="METRICS_DIR", help="metrics folders")
    summary.add_argument("--names", nargs="+", default=None, help="sample names, one per METRICS_DIR")
    summary.add_argument(
        "--notebook", type=Path, default=None, help="executed notebook to keep (default: OUT.ipynb)"
    )
    summary.set_defaults(func=_run_summary)


def _run_report(args: argparse.Namespace) -> None:
    from ..atomic import check_output_path
    from ..report import build_report

    check_output_path(args.outdir, directory=True, what="report")
    outputs = build_report(
        args.corrected,
        args.outdir,
        qc_dir=args.qc_dir,
        truth=args.truth,
        markers=args.markers,
        sample=args.sample,
    )
    print(f"wrote {outputs.html} (metrics in {outputs.metrics_dir})")


def _run_summary(args: argparse.Namespace) -> None:
    from ..atomic import check_output_path
    from ..report import build_summary

    check_output_path(args.output, what="summary")
    if args.notebook is not None:
        check_output_path(args.notebook, what="notebook")
    names = args.names or [folder.resolve().parent.name for folder in args.metrics_dirs]
    if len(names) != len(args.metrics_dirs):
        raise InputError(
            None, f"--names gives {len(names)} names for {len(args.metrics_dirs)} metrics folders"
        )
    if len(set(names)) != len(names):
        raise InputError(None, f"sample names must be unique, got {names}; name them with --names")
    metrics_dirs = dict(zip(names, args.metrics_dirs, strict=True))
    reports = {
        name: folder.parent / "report.html"
        for name, folder in metrics_dirs.items()
        if (folder.parent / "report.html").is_file()
    }
    html = build_summary(metrics_dirs, args.output, notebook=args.notebook, reports=reports)
    print(f"wrote {html}: {len(metrics_dirs)} samples")
