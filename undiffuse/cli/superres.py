"""``undiffuse superres``: histology-guided super-resolution of a corrected sample's maps."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import positive_int


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "superres",
        help="super-resolve corrected spot maps with the H&E image",
        description=(
            "Restore each gene's map on a pixel grid FACTOR times finer than the spot pitch (5: 20 um pixels "
            "on Visium, 10: 10 um) from the corrected spots and the sample's H&E image. Every map aggregates "
            "back to its corrected spot values over each spot's footprint, and pixels outside tissue are zero. "
            "Writes an AnnData of the tissue pixels with uns['spatial'] (plot it with scanpy.pl.spatial)."
        ),
    )
    parser.add_argument("corrected", type=Path, metavar="CORRECTED.h5ad", help="output of `undiffuse merge`")
    parser.add_argument("-o", "--output", type=Path, required=True, help="super-resolved .h5ad to write")
    parser.add_argument("--factor", type=positive_int, default=10, help="pixels per spot pitch (default 10)")
    parser.add_argument("--genes", nargs="+", default=None, help="genes to super-resolve (default: all)")
    parser.add_argument(
        "--layer", default=None, help="layer of the spot values (default: 'corrected' when present, else X)"
    )
    parser.add_argument(
        "--model",
        choices=("cells", "network"),
        default="cells",
        help="cells: typed cells of the H&E's nuclei (default); network: per-pixel network with the C3-Diff "
        "contrastive term (docs/superres.md)",
    )
    parser.add_argument("--epochs", type=positive_int, default=None, help="training epochs (default 300)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    parser.add_argument("--threads", type=positive_int, default=None, help="CPU threads of PyTorch")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model's initialisation")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> None:
    from ..atomic import check_output_path
    from ..io.h5ad import read_h5ad
    from ..superres import superresolve, write_result

    check_output_path(args.output)
    adata = read_h5ad(
        args.corrected,
        "corrected sample",
        fix="pass corrected.h5ad from `undiffuse merge`",
        record_source=True,
    )
    overrides = {"model": args.model, "device": args.device, "threads": args.threads, "seed": args.seed}
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    result = superresolve(
        adata, factor=args.factor, genes=args.genes, layer=args.layer, progress=True, **overrides
    )
    write_result(result, adata, args.output)
    print(
        f"wrote {args.output} ({result.pixels.size} tissue pixels x {len(result.genes)} genes, "
        f"{result.grid.pixel_px:.1f} full-resolution pixels a side, {result.seconds:.0f} s on {result.device})"
    )
