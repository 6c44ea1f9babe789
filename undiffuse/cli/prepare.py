"""``undiffuse prepare INPUT OUTDIR``: read a sample, QC it, mask the tissue and choose the genes."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``prepare`` subcommand."""
    from ..genes import DEFAULT_MIN_COUNTS, DEFAULT_N_TOP_GENES
    from . import non_negative_int, positive_int

    parser = subparsers.add_parser(
        "prepare",
        help="read a sample, run QC, mask the tissue and select genes",
        description=(
            "Read a Visium sample (Space Ranger outs/ with the raw matrix, a Visium HD square_XXXum/ folder, "
            "a matrix with spatial/ beside it, or an .h5ad in scanpy's layout), measure QC and the diffusion "
            "range on the background spots, and write OUTDIR/prepared.h5ad and OUTDIR/qc/."
        ),
    )
    parser.add_argument("input", metavar="INPUT", help="sample folder, outs/, square_XXXum/, matrix or .h5ad")
    parser.add_argument("outdir", metavar="OUTDIR", help="output folder of the sample")
    parser.add_argument("--image", metavar="PATH", help="full-resolution H&E image of the slide")
    parser.add_argument(
        "--genes",
        metavar="FILE",
        help="genes to correct, one name or id per line, '#' comments (overrides HVGs)",
    )
    parser.add_argument(
        "--min-counts",
        type=non_negative_int,
        default=DEFAULT_MIN_COUNTS,
        metavar="N",
        help=f"smallest total count of a corrected gene (default {DEFAULT_MIN_COUNTS})",
    )
    parser.add_argument(
        "--n-top-genes",
        type=positive_int,
        default=DEFAULT_N_TOP_GENES,
        metavar="N",
        help=f"number of highly variable genes to correct (default {DEFAULT_N_TOP_GENES})",
    )
    parser.add_argument(
        "--refine-mask", action="store_true", help="take the tissue mask from the H&E image (Otsu)"
    )
    parser.add_argument(
        "--allow-filtered",
        action="store_true",
        help="accept a matrix without background spots; corrects without the out-of-tissue evidence",
    )
    parser.add_argument(
        "--allow-degenerate-tissue",
        action="store_true",
        help="accept very few tissue spots, or tissue spots holding almost none of the UMIs (a warning, not an error)",
    )
    parser.add_argument("--sample-id", metavar="ID", help="sample name (default: the input folder's name)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from ..prepare import prepare_sample

    adata = prepare_sample(
        args.input,
        args.outdir,
        image=args.image,
        genes=args.genes,
        min_counts=args.min_counts,
        n_top_genes=args.n_top_genes,
        refine_mask=args.refine_mask,
        allow_filtered=args.allow_filtered,
        allow_degenerate_tissue=args.allow_degenerate_tissue,
        sample_id=args.sample_id,
    )
    info = adata.uns["undiffuse"]
    qc = info["qc"]
    print(
        f"{info['sample_id']}: {adata.n_obs} spots ({qc['n_tissue_spots']} tissue), {qc['n_genes_selected']} "
        f"genes selected; ARC score {qc['arc_score']:.4f}; diffusion cutoff {info['diffusion_cutoff']:.2f} "
        f"and scale {info['diffusion_scale']:.2f} spot pitches -> {args.outdir}"
    )
