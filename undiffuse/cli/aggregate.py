"""``undiffuse aggregate``: sum a Visium HD sample's bins into coarser bins or into cells."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import positive_int


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "aggregate",
        help="sum Visium HD bins into coarser bins or into cells",
        description=(
            "Sum the bins of a Visium HD sample (raw, prepared or corrected .h5ad) into square bins of the "
            "given sizes (Space Ranger's binning: 2 um bins into 8 or 16 um), and/or into the cells of a "
            "segmentation: a table with columns barcode and cell_id, or a label image in full-resolution "
            "pixels (0: no cell). X and every layer are summed, so gene totals are kept. Writes "
            "OUTDIR/square_XXXum.h5ad and OUTDIR/cells.h5ad."
        ),
    )
    parser.add_argument("sample", type=Path, metavar="SAMPLE.h5ad", help="e.g. corrected.h5ad of `merge`")
    parser.add_argument("-o", "--outdir", type=Path, required=True, help="folder to write into")
    parser.add_argument(
        "--bin-sizes", type=positive_int, nargs="+", default=[], metavar="UM", help="coarse bin sizes (um)"
    )
    parser.add_argument("--cells", type=Path, default=None, help="bin-to-cell table or label image")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> None:
    from ..aggregate import aggregate_bins, aggregate_cells, read_cell_labels
    from ..atomic import atomic_paths, check_output_path
    from ..errors import ConfigError
    from ..io.h5ad import read_h5ad

    if not args.bin_sizes and args.cells is None:
        raise ConfigError("nothing to do: give --bin-sizes and/or --cells")
    check_output_path(args.outdir, directory=True)
    adata = read_h5ad(args.sample, "sample to aggregate", record_source=True)
    results = {f"square_{size:03d}um.h5ad": aggregate_bins(adata, size) for size in args.bin_sizes}
    if args.cells is not None:
        results["cells.h5ad"] = aggregate_cells(adata, read_cell_labels(args.cells, adata))
    args.outdir.mkdir(parents=True, exist_ok=True)
    with atomic_paths([(args.outdir / name, False) for name in results]) as paths:
        for path, result in zip(paths, results.values(), strict=True):
            result.write_h5ad(path, compression="gzip")
    for name, result in results.items():
        print(f"wrote {args.outdir / name} ({result.n_obs} x {result.n_vars})")
