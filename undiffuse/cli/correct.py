"""``undiffuse correct``: correct one sample (all selected genes, or a list) into an h5ad file."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "correct",
        help="correct lateral diffusion of a sample",
        description=(
            "Correct lateral diffusion. INPUT is a prepared .h5ad (from `undiffuse prepare`) or anything "
            "`undiffuse prepare` accepts, which is then prepared with default settings first. OUT.h5ad holds the "
            "same spots and the corrected genes: raw counts in layer 'counts', corrected counts in X and in "
            "layer 'corrected', learned parameters in var."
        ),
    )
    parser.add_argument("input", type=Path, metavar="INPUT")
    parser.add_argument("output", type=Path, metavar="OUT.h5ad")
    parser.add_argument("--mode", choices=["deconvolve", "balanced"], default=None)
    parser.add_argument("--genes", nargs="+", default=None, metavar="GENE", help="genes to correct")
    parser.add_argument("--genes-file", type=Path, default=None, help="file with one gene per line")
    parser.add_argument("--quantiles", type=Path, default=None, help="quantiles.tsv from `init-quantiles`")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--config", type=Path, default=None, help="YAML with a `correct:` section")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    import tempfile

    import anndata as ad
    import pandas as pd
    import yaml

    from ..atomic import atomic_path
    from ..correct import CorrectionConfig, correct
    from ..errors import InputError

    settings = {}
    if args.config is not None:
        if not args.config.is_file():
            raise InputError(args.config, "config file not found")
        settings = (yaml.safe_load(args.config.read_text()) or {}).get("correct", {})
    for key in ("mode", "device", "epochs"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    if args.quiet:
        settings["progress"] = False
    config = CorrectionConfig.from_dict(settings)

    genes = args.genes
    if args.genes_file is not None:
        if not args.genes_file.is_file():
            raise InputError(args.genes_file, "gene list not found")
        genes = [line.strip() for line in args.genes_file.read_text().splitlines() if line.strip()]

    q_init = None
    if args.quantiles is not None:
        if not args.quantiles.is_file():
            raise InputError(args.quantiles, "quantile table not found")
        q_init = pd.read_csv(args.quantiles, sep="\t", index_col="gene")["q_init"]

    if not args.input.exists():
        raise InputError(args.input, "input not found")
    if args.input.suffix == ".h5ad" and _is_prepared(args.input):
        adata = ad.read_h5ad(args.input)
    else:
        from ..prepare import prepare_sample

        with tempfile.TemporaryDirectory(prefix="undiffuse-prepare-") as scratch:
            adata = prepare_sample(args.input, Path(scratch))

    result = correct(adata, genes=genes, q_init=q_init, config=config)
    with atomic_path(args.output) as tmp:
        result.to_anndata(adata).write_h5ad(tmp)
    print(args.output)


def _is_prepared(path: Path) -> bool:
    """A prepared h5ad carries the QC of `undiffuse prepare` in uns['undiffuse']['qc']."""
    import h5py

    try:
        with h5py.File(path, "r") as handle:
            return "uns/undiffuse/qc" in handle
    except OSError:
        return False
