"""``undiffuse correct``: correct one sample (all selected genes, or a list) into an h5ad file.

Everything the user gives is checked before the correction starts: the output path, the config (against the
workflow's schema), the gene list, the quantile table and the input (a prepared ``.h5ad`` is checked like a
raw one: :func:`undiffuse.io.h5ad.read_prepared`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from . import positive_int

if TYPE_CHECKING:
    from ..correct import CorrectionConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "correct",
        help="correct lateral diffusion of a sample",
        description=(
            "Correct lateral diffusion. INPUT is a prepared .h5ad (from `undiffuse prepare`) or anything "
            "`undiffuse prepare` accepts, which is then prepared with default settings first. OUT.h5ad is the "
            "prepared sample with the correction added (as `undiffuse.correct` writes it): raw counts in X, "
            "corrected counts of all genes in layer 'corrected' (genes not corrected keep their raw counts), "
            "learned parameters in var['undiffuse_*'] and varm['undiffuse_phi'], provenance in "
            "uns['undiffuse']['correction']."
        ),
    )
    parser.add_argument("input", type=Path, metavar="INPUT")
    parser.add_argument("output", type=Path, metavar="OUT.h5ad")
    parser.add_argument(
        "--operator",
        choices=["auto", "lattice", "pairs"],
        default=None,
        help="apply kernels by FFT on the spot lattice or on neighbour pairs (default auto: the lattice if any)",
    )
    genes = parser.add_mutually_exclusive_group()
    genes.add_argument(
        "--genes", nargs="+", default=None, metavar="GENE", help="genes to correct (names or ids)"
    )
    genes.add_argument(
        "--genes-file",
        type=Path,
        default=None,
        help="file with one gene name or id per line ('#' starts a comment), as `prepare --genes`",
    )
    parser.add_argument("--quantiles", type=Path, default=None, help="quantiles.tsv from `init-quantiles`")
    parser.add_argument(
        "--reference",
        type=Path,
        default=None,
        help="an .h5ad of single cells (or of a less-diffused spatial sample) whose cell types guide the "
        "correction (the config's correct.reference is for the workflow)",
    )
    parser.add_argument(
        "--reference-key",
        default=None,
        metavar="COLUMN",
        help="obs column of the reference's cell types (default cell_type)",
    )
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None)
    parser.add_argument("--epochs", type=positive_int, default=None)
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="workflow config YAML (validated against its schema); its `correct:` section is used",
    )
    parser.add_argument(
        "--allow-degenerate-tissue",
        action="store_true",
        help="accept very few tissue spots, or tissue spots holding almost none of the UMIs (a warning)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def correction_config(args: argparse.Namespace) -> CorrectionConfig:
    """The ``CorrectionConfig`` of the command.

    The config file is validated whole against the workflow's schema (the same check as the workflow's);
    the keys its ``correct:`` section sets, then the command-line options, override the library's defaults.
    """
    from ..config import correction_options, read_config_file, validate_config
    from ..correct import CorrectionConfig
    from ..errors import ConfigError, InputError

    settings = {}
    if args.config is not None:
        raw = read_config_file(args.config)
        given = set((raw.get("correct") or {}) if isinstance(raw.get("correct"), dict) else ())
        options = correction_options(validate_config(raw, source=args.config))
        if "gpu" in given:
            given.add("device")
        settings = {key: value for key, value in options.items() if key in given}
    for key in ("operator", "device", "epochs", "reference_key"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    if args.quiet:
        settings["progress"] = False
    try:
        return CorrectionConfig.from_dict(settings)
    except ConfigError as err:
        raise InputError(args.config, f"{err}; fix the correct: section or the options") from err


def run(args: argparse.Namespace) -> None:
    import tempfile

    from ..atomic import atomic_path, check_output_path
    from ..correct import correct
    from ..errors import InputError
    from ..genes import read_gene_list, selected_genes
    from ..io.h5ad import is_prepared, read_prepared
    from ..validate import check_genes

    # Fail before the work: the output, the config, the reference, the gene list and the quantile table first.
    check_output_path(args.output)
    config = correction_config(args)
    genes, gene_source, gene_what = args.genes, None, "--genes"
    if args.genes_file is not None:
        genes, gene_source, gene_what = read_gene_list(args.genes_file), args.genes_file, "the gene list"
    reference = None
    if args.reference is not None:
        from ..reference import read_reference

        reference = read_reference(args.reference, config.reference_key)
    q_init = None
    if args.quantiles is not None:
        from ..quantiles import read_quantile_table

        q_init = read_quantile_table(args.quantiles)["q_init"]

    if not args.input.exists():
        raise InputError(args.input, "input not found; give a prepared .h5ad or a Space Ranger folder")
    if is_prepared(args.input):
        adata = read_prepared(args.input, allow_degenerate_tissue=args.allow_degenerate_tissue)
    else:
        from ..prepare import prepare_sample

        with tempfile.TemporaryDirectory(prefix="undiffuse-prepare-") as scratch:
            adata = prepare_sample(
                args.input, Path(scratch), allow_degenerate_tissue=args.allow_degenerate_tissue
            )

    if genes is not None:
        genes = check_genes(genes, adata, gene_source, what=gene_what)
    else:
        genes = selected_genes(adata)
        if not genes:
            raise InputError(
                args.input, "selects no gene to correct (var['selected'] is false everywhere); give --genes"
            )
    if q_init is not None:
        missing = [gene for gene in genes if gene not in q_init.index]
        if missing:
            raise InputError(
                args.quantiles,
                f"has no q_init for {len(missing)} gene(s) to correct (e.g. {', '.join(missing[:5])}); rerun "
                "`undiffuse init-quantiles` on this sample or leave --quantiles out",
            )
        values = q_init.loc[genes].to_numpy(dtype=float)
        if not ((values >= 0) & (values <= 1)).all():
            raise InputError(args.quantiles, "q_init values must lie in [0, 1]")

    correct(adata, genes=genes, q_init=q_init, reference=reference, config=config)
    with atomic_path(args.output) as tmp:
        adata.write_h5ad(tmp, compression="gzip")
    print(args.output)
