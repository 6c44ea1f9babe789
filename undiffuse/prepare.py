"""The prepare step: read a sample, run QC, mask the tissue, choose the genes to correct, write it all.

``prepare`` works on an AnnData in memory, in scanpy's conventions (notebooks); ``prepare_sample`` goes from
an input path to the per-sample outputs of the workflow::

    OUTDIR/prepared.h5ad
    OUTDIR/qc/qc.json, qc.tsv           scalar QC metrics (one row in the TSV)
    OUTDIR/qc/background_decay.tsv      background UMIs by distance to the tissue, with the fitted curves
    OUTDIR/qc/tissue_mask.png, total_counts.png, background_decay.png
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from anndata import AnnData

from .atomic import atomic_paths, check_output_path
from .errors import InputError
from .genes import (
    DEFAULT_MIN_COUNTS,
    DEFAULT_N_TOP_GENES,
    check_selection_options,
    read_gene_list,
    select_genes,
)
from .io import read_sample
from .qc import QCReport, compute_qc, spot_totals
from .tissue import TissueMask, tissue_mask
from .validate import check_sample, check_tissue

logger = logging.getLogger(__name__)

PREPARED_FILE = "prepared.h5ad"
QC_DIR = "qc"


@dataclass(frozen=True)
class Preparation:
    """What ``prepare`` found: the QC report and the tissue mask (figures are drawn from these)."""

    qc: QCReport
    mask: TissueMask


def _finite_columns(frame: pd.DataFrame) -> None:
    """Replace NaN of numeric columns (scanpy's percentages of empty spots) by 0, in place."""
    for column in frame.columns:
        if pd.api.types.is_float_dtype(frame[column]):
            values = frame[column].to_numpy()
            if not np.all(np.isfinite(values)):
                frame[column] = np.where(np.isfinite(values), values, 0.0)


def prepare(
    adata: AnnData,
    *,
    genes: list[str] | str | Path | None = None,
    min_counts: int = DEFAULT_MIN_COUNTS,
    n_top_genes: int = DEFAULT_N_TOP_GENES,
    refine_mask: bool = False,
    allow_filtered: bool = False,
    allow_degenerate_tissue: bool = False,
    copy: bool = False,
) -> AnnData | None:
    """QC, tissue mask and gene selection of a sample, in scanpy's conventions.

    Adds ``obs['tissue']``, ``obs['distance_to_tissue']`` (spot pitches) and scanpy's QC columns;
    ``var['selected']`` and ``var['total_counts']``; ``uns['undiffuse']['qc']`` (the scalars of
    ``qc.json``), ``uns['undiffuse']['diffusion_cutoff']`` and ``['diffusion_scale']`` (spot pitches).

    Parameters
    ----------
    adata
        ``(N, G)`` canonical AnnData (:func:`undiffuse.read_sample`) of raw counts on all spots.
    genes
        Genes to correct (list, or file with one per line); overrides ``min_counts`` and ``n_top_genes``.
    min_counts
        Smallest total count of a corrected gene.
    n_top_genes
        Number of highly variable genes corrected.
    refine_mask
        Take the tissue mask from the H&E image instead of Space Ranger's ``in_tissue``.
    allow_filtered
        Accept a matrix without background spots (a filtered matrix); the correction then has no
        out-of-tissue evidence and the diffusion range falls back to defaults.
    allow_degenerate_tissue
        Accept a tissue mask with very few spots, or tissue spots that hold almost none of the UMIs
        (:func:`undiffuse.validate.check_tissue`), with a warning.
    copy
        Return a prepared copy instead of writing into ``adata``.

    Returns
    -------
    None, or the prepared copy when ``copy`` is true.

    Raises
    ------
    InputError
        For counts that are not raw UMI counts, a matrix without background spots (unless
        ``allow_filtered``), degenerate tissue (unless ``allow_degenerate_tissue``), an unknown gene in
        ``genes``, or ``refine_mask`` without an image.
    """
    adata = adata.copy() if copy else adata
    _prepare(
        adata,
        genes=genes,
        min_counts=min_counts,
        n_top_genes=n_top_genes,
        refine_mask=refine_mask,
        allow_filtered=allow_filtered,
        allow_degenerate_tissue=allow_degenerate_tissue,
    )
    return adata if copy else None


def _prepare(
    adata: AnnData,
    *,
    genes: list[str] | str | Path | None,
    min_counts: int,
    n_top_genes: int,
    refine_mask: bool,
    allow_filtered: bool,
    allow_degenerate_tissue: bool,
) -> Preparation:
    """:func:`prepare` in place, returning what the QC figures are drawn from."""
    info = adata.uns["undiffuse"]
    source = info.get("source")
    check_sample(adata, tissue=False)
    has_background = bool((~adata.obs["in_tissue"].to_numpy(dtype=bool)).any())
    if not has_background and not allow_filtered:
        raise InputError(
            source,
            "holds no background spots (every spot is in tissue): this looks like a filtered matrix, but the "
            "correction needs the raw one (raw_feature_bc_matrix.h5), whose background spots are the "
            "evidence of diffusion. Give the raw matrix, or rerun with --allow-filtered "
            "(allow_filtered=True) to correct without the out-of-tissue evidence",
        )
    mask = tissue_mask(adata, refine=refine_mask)
    # The tissue calls come from the positions file (Space Ranger's in_tissue), else from the input itself.
    calls = info.get("positions", source) if mask.source == "in_tissue" else source
    check_tissue(mask.tissue, adata.X, calls, allow_degenerate=allow_degenerate_tissue)
    adata.obs["tissue"] = mask.tissue
    report = compute_qc(adata, tissue=mask.tissue)
    selected = select_genes(
        adata, tissue=mask.tissue, genes=genes, min_counts=min_counts, n_top_genes=n_top_genes
    )
    _finite_columns(adata.obs)
    _finite_columns(adata.var)

    metrics = dict(report.metrics)
    metrics.update(mask.agreement())
    metrics.update(
        {
            "tissue_source": mask.source,
            "has_background": has_background,
            "n_genes_selected": int(selected.sum()),
            "gene_list": str(genes)
            if isinstance(genes, str | Path)
            else ("user" if genes is not None else ""),
            "min_counts": int(min_counts),
            "n_top_genes": int(n_top_genes),
            "refine_mask": bool(refine_mask),
            "allow_filtered": bool(allow_filtered),
            "allow_degenerate_tissue": bool(allow_degenerate_tissue),
        }
    )
    bad = [key for key, value in metrics.items() if isinstance(value, float) and not math.isfinite(value)]
    if bad:
        raise RuntimeError(f"QC metrics are not finite: {', '.join(bad)}")
    report = QCReport(metrics=metrics, decay=report.decay, estimate=report.estimate, fits=report.fits)
    info["qc"] = metrics
    info["diffusion_cutoff"] = float(report.estimate.cutoff)
    info["diffusion_scale"] = float(report.estimate.scale)
    logger.info(
        "%s: %d spots (%d tissue), %d genes selected; ARC %.4f; diffusion cutoff %.2f, scale %.2f pitches",
        info["sample_id"],
        adata.n_obs,
        int(mask.tissue.sum()),
        int(selected.sum()),
        metrics["arc_score"],
        report.estimate.cutoff,
        report.estimate.scale,
    )
    return Preparation(qc=report, mask=mask)


def write_qc(adata: AnnData, preparation: Preparation, folder: Path) -> None:
    """Write the QC tables and figures of a prepared sample into ``folder``."""
    from .plotting.qc import plot_background_decay, plot_tissue_mask, plot_total_counts

    folder.mkdir(parents=True, exist_ok=True)
    metrics = preparation.qc.metrics
    (folder / "qc.json").write_text(json.dumps(metrics, indent=2) + "\n")
    pd.DataFrame([metrics]).to_csv(folder / "qc.tsv", sep="\t", index=False)
    preparation.qc.decay.to_csv(folder / "background_decay.tsv", sep="\t", index=False, float_format="%.6g")
    figures = {
        "tissue_mask.png": plot_tissue_mask(adata, preparation.mask),
        "total_counts.png": plot_total_counts(adata, spot_totals(adata)),
        "background_decay.png": plot_background_decay(
            preparation.qc.decay, preparation.qc.estimate, preparation.qc.fits
        ),
    }
    for name, figure in figures.items():
        figure.savefig(folder / name, dpi=120)


def prepare_sample(
    input: str | Path,
    outdir: str | Path,
    *,
    image: str | Path | None = None,
    genes: list[str] | str | Path | None = None,
    min_counts: int = DEFAULT_MIN_COUNTS,
    n_top_genes: int = DEFAULT_N_TOP_GENES,
    refine_mask: bool = False,
    allow_filtered: bool = False,
    allow_degenerate_tissue: bool = False,
    sample_id: str | None = None,
) -> AnnData:
    """Read a sample, prepare it (:func:`prepare`) and write ``OUTDIR/prepared.h5ad`` and ``OUTDIR/qc/``.

    Every output appears only once complete; on any error nothing new is left in ``outdir``.

    Parameters
    ----------
    input
        Any input :func:`undiffuse.read_sample` accepts (a sample sheet row's ``input``).
    outdir
        Output folder of the sample (``results/{sample}``).
    image
        Full-resolution H&E image (a sample sheet row's ``image``), optional.
    genes, min_counts, n_top_genes, refine_mask, allow_filtered, allow_degenerate_tissue
        See :func:`prepare`; ``genes`` is a sample sheet row's gene list.
    sample_id
        Name of the sample (the sample sheet's), used as the key of ``uns['spatial']``.

    Returns
    -------
    The prepared AnnData, as written.

    Raises
    ------
    InputError
        Before any work, for output paths that cannot be written and a bad gene list or option; then for
        any bad input (:func:`prepare`).
    """
    outdir = Path(outdir)
    # Fail before the work: outputs, options and the gene list are checked before the sample is read.
    check_output_path(outdir, directory=True, what="output")
    check_output_path(outdir / QC_DIR, directory=True, what="QC")
    check_output_path(outdir / PREPARED_FILE, what="output")
    if genes is None:
        check_selection_options(min_counts, n_top_genes)
    elif isinstance(genes, str | Path):
        read_gene_list(genes)
    adata = read_sample(input, image=image, sample_id=sample_id)
    preparation = _prepare(
        adata,
        genes=genes,
        min_counts=min_counts,
        n_top_genes=n_top_genes,
        refine_mask=refine_mask,
        allow_filtered=allow_filtered,
        allow_degenerate_tissue=allow_degenerate_tissue,
    )
    created = not outdir.exists()
    try:
        # Both outputs are moved into place together, with SIGTERM/SIGINT held back: a failure or a signal
        # leaves both (complete) or neither.
        with atomic_paths([(outdir / QC_DIR, True), (outdir / PREPARED_FILE, False)]) as (qc_tmp, h5ad_tmp):
            write_qc(adata, preparation, qc_tmp)
            adata.write_h5ad(h5ad_tmp, compression="gzip")
    except BaseException:
        if created and outdir.is_dir() and not any(outdir.iterdir()):
            outdir.rmdir()
        raise
    return adata
