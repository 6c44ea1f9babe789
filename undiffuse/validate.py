"""The validation layer: every entry point (library, command line, workflow) checks its inputs here.

Each check raises :class:`~undiffuse.errors.InputError` naming the file at fault, the problem and the fix, or
emits an :class:`~undiffuse.errors.UndiffuseWarning` when it repaired something. Nothing is ever silently
zeroed: counts must be finite, non-negative integers before any work, and a gene whose correction is not
finite is passed through unchanged and reported (:func:`failed_genes`).

Checks:

- :func:`check_counts`: finite, non-negative, integer counts; :func:`check_not_empty`: spots, genes and
  UMIs present.
- :func:`check_unique_barcodes` (duplicates are an error: each spot must take its own position) and
  :func:`unique_gene_names` (duplicates made unique, with a warning).
- :func:`check_tissue`: enough tissue spots, and a sane share of the UMIs on them; an error unless
  ``allow_degenerate``.
- :func:`check_registration`: the spots' pixel coordinates, the scale factors and the images agree (spot
  size against the lattice, swapped axes, an image at another scale).
- :func:`check_sample` (a canonical AnnData), :func:`check_prepared` (a ``prepared.h5ad``),
  :func:`check_genes` (a list of genes to correct) and :func:`check_correct_input` (what ``correct()``
  checks before it starts).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from os import PathLike
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp

from .errors import InputError, UndiffuseWarning

if TYPE_CHECKING:
    import pandas as pd
    from anndata import AnnData

PathLikeOrNone = str | PathLike[str] | None

#: Fewest tissue spots worth correcting; fewer is an error unless allowed.
MIN_TISSUE_SPOTS = 25

#: Smallest share of all UMIs that the tissue spots must hold; less is an error unless allowed.
MIN_TISSUE_UMI_SHARE = 0.10

#: Spot diameter over spot pitch, nominal (Visium: 55 um spots on a 100 um lattice; HD: square bins).
NOMINAL_DIAMETER_PER_PITCH = {"visium": 0.55, "visium_hd": 1.0}

#: How far (factor either way) the spot diameter of the scale factors may stray from the nominal one.
DIAMETER_TOLERANCE = 2.5

#: Spots must span at least this share of an image along its longer covered axis, else a warning.
MIN_IMAGE_COVERAGE = 0.35

#: Exchanging x and y must raise the tissue/background contrast of the image this much to call it swapped.
SWAP_CONTRAST_RATIO = 1.5
SWAP_MIN_CONTRAST = 0.5

#: Rows of a corrected field that :func:`failed_genes` checks at a time.
FAILURE_CHECK_ROWS = 4096

#: Items named in a message, at most.
_LISTED = 5

DEGENERATE_TISSUE_FLAG = "--allow-degenerate-tissue (allow_degenerate_tissue=True)"


def _shown(items: Sequence[object]) -> str:
    items = list(items)
    text = ", ".join(str(item) for item in items[:_LISTED])
    return text + (f" and {len(items) - _LISTED} more" if len(items) > _LISTED else "")


def _where(row: int, col: int, barcodes: Sequence[str] | None, genes: Sequence[str] | None) -> str:
    spot = barcodes[row] if barcodes is not None else f"row {row}"
    gene = genes[col] if genes is not None else f"column {col}"
    return f"gene {gene}, spot {spot}"


def check_counts(
    counts: np.ndarray | sp.spmatrix,
    source: PathLikeOrNone,
    *,
    what: str = "the count matrix",
    barcodes: Sequence[str] | None = None,
    genes: Sequence[str] | None = None,
) -> None:
    """Counts must be finite, non-negative integers (raw UMI counts).

    Parameters
    ----------
    counts
        ``(spots, genes)`` matrix, sparse or dense.
    source
        The file the counts were read from, named in the error.
    what
        Where in the file they are (``X``, ``layers['counts']``, ...).
    barcodes, genes
        Names of the rows and columns, to point at the first bad value.

    Raises
    ------
    InputError
        With the number of bad values, the first one's gene and spot, and the fix.
    """
    if sp.issparse(counts):
        matrix = sp.coo_matrix(counts)
        values, rows, cols = matrix.data, matrix.row, matrix.col
    else:
        dense = np.asarray(counts)
        values = dense.ravel()
        rows = cols = None
    if not np.issubdtype(values.dtype, np.number) or np.issubdtype(values.dtype, np.complexfloating):
        raise InputError(source, f"{what} is of type {values.dtype}, not numbers; give raw UMI counts")
    if np.issubdtype(values.dtype, np.integer):
        checks = [("negative", values < 0)]
    else:
        finite = np.isfinite(values)
        with np.errstate(invalid="ignore"):
            checks = [
                ("NaN or infinite", ~finite),
                ("negative", finite & (values < 0)),
                ("non-integer", finite & (values != np.round(values))),
            ]
    for kind, bad in checks:
        if not bad.any():
            continue
        first = int(np.flatnonzero(bad)[0])
        if rows is None:
            row, col = np.unravel_index(first, np.asarray(counts).shape)
        else:
            row, col = rows[first], cols[first]
        raise InputError(
            source,
            f"{what} does not hold raw counts: {int(bad.sum())} {kind} value(s) (first: {float(values[first]):g} at "
            f"{_where(int(row), int(col), barcodes, genes)}); undiffuse needs raw UMI counts (finite, "
            "non-negative integers): give Space Ranger's raw_feature_bc_matrix.h5 or an .h5ad with the raw "
            "counts in X or layers['counts']",
        )


def check_not_empty(
    counts: np.ndarray | sp.spmatrix,
    source: PathLikeOrNone,
    *,
    what: str = "the matrix",
    require_counts: bool = True,
) -> None:
    """At least one spot, one gene and (when ``require_counts``; readers leave it to the steps) one UMI."""
    n_spots, n_genes = counts.shape
    if n_spots == 0:
        raise InputError(source, f"{what} holds no spot; give the sample's raw matrix with all its spots")
    if n_genes == 0:
        raise InputError(
            source,
            f"{what} holds no gene (no 'Gene Expression' feature); give a gene-expression matrix",
        )
    if require_counts and not counts.sum() > 0:
        raise InputError(
            source,
            f"every count in {what} is zero ({n_spots} spots x {n_genes} genes): there is nothing to correct; "
            "the file is empty or was written from an empty sample",
        )


def check_unique_barcodes(barcodes: Iterable[str], source: PathLikeOrNone) -> None:
    """Barcodes must be unique: each spot takes the position of its barcode."""
    import pandas as pd

    index = pd.Index(list(barcodes))
    if index.is_unique:
        return
    repeated = index[index.duplicated()].unique()
    raise InputError(
        source,
        f"lists {len(repeated)} barcode(s) more than once (e.g. {_shown(repeated)}): a spot's counts and "
        "position are found by its barcode, so every barcode must be unique; the file is corrupt or joins "
        "several samples, rewrite it with one entry per spot",
    )


def unique_gene_names(names: Iterable[str], source: PathLikeOrNone) -> pd.Index:
    """Gene names made unique as anndata does (``name``, ``name-1``, ...), with a warning naming them."""
    import pandas as pd

    index = pd.Index([str(name) for name in names])
    if index.is_unique:
        return index
    repeated = index[index.duplicated()].unique()
    seen: dict[str, int] = {}
    taken = set(index)
    unique = []
    for name in index:
        if name not in seen:
            seen[name] = 0
            unique.append(name)
            continue
        while True:
            seen[name] += 1
            candidate = f"{name}-{seen[name]}"
            if candidate not in taken:
                break
        taken.add(candidate)
        unique.append(candidate)
    warnings.warn(
        f"{source}: {len(repeated)} gene name(s) occur more than once (e.g. {_shown(repeated)}); the repeats "
        "are kept as separate genes named NAME-1, NAME-2, ... (list them by those names, or by gene id)",
        UndiffuseWarning,
        stacklevel=2,
    )
    return pd.Index(unique)


@dataclass(frozen=True)
class TissueStats:
    """Tissue spots and the share of all UMIs they hold."""

    n_spots: int
    n_tissue: int
    umi_share: float


def spot_totals(counts: np.ndarray | sp.spmatrix) -> np.ndarray:
    """UMIs per spot of a ``(spots, genes)`` matrix, float64."""
    return np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()


def check_tissue(
    tissue: np.ndarray,
    counts: np.ndarray | sp.spmatrix,
    source: PathLikeOrNone,
    *,
    min_spots: int = MIN_TISSUE_SPOTS,
    min_umi_share: float = MIN_TISSUE_UMI_SHARE,
    allow_degenerate: bool = False,
) -> TissueStats:
    """Enough tissue spots, holding a sane share of the UMIs.

    With one or a few tissue spots, or tissue spots that hold almost none of the UMIs, the correction would
    pile every molecule of the slide onto them; that is an error unless ``allow_degenerate``, which turns it
    into a warning. No tissue spot at all is always an error.

    Parameters
    ----------
    tissue
        ``(N,)`` boolean tissue mask.
    counts
        ``(N, G)`` counts, or ``(N,)`` UMIs per spot.
    source
        The file the tissue calls come from (positions, or the h5ad), named in the message.
    """
    tissue = np.asarray(tissue, dtype=bool)
    totals = np.asarray(counts, dtype=np.float64).ravel() if np.ndim(counts) == 1 else spot_totals(counts)
    n_tissue = int(tissue.sum())
    total = float(totals.sum())
    share = float(totals[tissue].sum() / total) if total > 0 else 0.0
    stats = TissueStats(n_spots=int(tissue.size), n_tissue=n_tissue, umi_share=share)
    if n_tissue == 0:
        raise InputError(
            source,
            "no spot is in tissue: without tissue spots there is nothing to correct; check the tissue calls "
            "(in_tissue) or the positions file",
        )
    if n_tissue >= min_spots and share >= min_umi_share:
        return stats
    problem = (
        f"only {n_tissue} of {tissue.size} spots are in tissue"
        if n_tissue < min_spots
        else f"the {n_tissue} tissue spots hold only {share:.1%} of the UMIs"
    )
    message = (
        f"degenerate tissue: {problem} ({share:.1%} of the UMIs in tissue, {1 - share:.1%} on background); "
        f"the correction would pile every molecule onto these spots. Expected at least {min_spots} tissue "
        f"spots holding at least {min_umi_share:.0%} of the UMIs: check the tissue calls (in_tissue), the "
        f"positions and the matrix, or override with {DEGENERATE_TISSUE_FLAG}"
    )
    if not allow_degenerate:
        raise InputError(source, message)
    warnings.warn(f"{source}: {message} (overridden)", UndiffuseWarning, stacklevel=2)
    return stats


def _tissue_contrast(gray: np.ndarray, xy: np.ndarray, tissue: np.ndarray) -> float:
    """Background minus tissue image intensity at the spots, in SDs of the intensity (H&E tissue is darker)."""
    height, width = gray.shape
    cols = np.clip(np.round(xy[:, 0]).astype(np.int64), 0, width - 1)
    rows = np.clip(np.round(xy[:, 1]).astype(np.int64), 0, height - 1)
    values = gray[rows, cols].astype(np.float64)
    spread = float(values.std())
    if spread <= 0 or tissue.all() or not tissue.any():
        return 0.0
    return float(abs(values[~tissue].mean() - values[tissue].mean()) / spread)


def check_registration(
    adata: AnnData,
    *,
    positions_file: PathLikeOrNone = None,
    scalefactors_file: PathLikeOrNone = None,
    image_files: Mapping[str, PathLikeOrNone] | None = None,
) -> None:
    """The spots' pixel coordinates, the scale factors and the images must agree.

    - The spot diameter of the scale factors must match the spot pitch of the coordinates (for Visium a
      55 um spot on a 100 um lattice): otherwise the scale factors belong to another sample or resolution.
    - The tissue spots must stand out in the image where they are: when they do markedly better with x and y
      exchanged, the coordinates' axes are swapped.
    - Spots spanning only a small part of an image suggest an image at another scale (a warning: a cropped
      sample looks the same).

    Spots falling outside an image are caught when the image is read
    (:func:`undiffuse.io.images.check_image_fits`).

    Raises
    ------
    InputError
        With the numbers that disagree.
    """
    from .io.canonical import library
    from .spatial import SPATIAL_KEY

    info = adata.uns["undiffuse"]
    source = info.get("source")
    content = library(adata)
    scalefactors = content.get("scalefactors", {})
    platform = info.get("platform", "visium")
    pitch = float(info["spot_pitch_px"])
    coords = np.asarray(adata.obsm[SPATIAL_KEY], dtype=np.float64)
    diameter = scalefactors.get("spot_diameter_fullres")
    nominal = NOMINAL_DIAMETER_PER_PITCH.get(platform, 0.55)
    if diameter is not None and pitch > 0:
        ratio = float(diameter) / pitch
        if not nominal / DIAMETER_TOLERANCE <= ratio <= nominal * DIAMETER_TOLERANCE:
            raise InputError(
                scalefactors_file or source,
                f"spot_diameter_fullres = {float(diameter):g} pixels, but the spots of "
                f"{positions_file or 'the positions'} lie {pitch:g} pixels apart (diameter/pitch "
                f"{ratio:.3g}, expected about {nominal:g} for {platform}): the scale factors and the positions "
                "belong to different samples or resolutions; use the files of one Space Ranger run",
            )
    tissue = adata.obs["in_tissue"].to_numpy(dtype=bool)
    # The contrast of a handful of spots says nothing; degenerate tissue is reported by check_tissue.
    contrast_usable = min(int(tissue.sum()), int((~tissue).sum())) >= MIN_TISSUE_SPOTS
    for key, image in content.get("images", {}).items():
        scale = scalefactors.get(f"tissue_{key}_scalef")
        image = np.asarray(image)
        if scale is None or image.ndim < 2 or image.size == 0:
            continue
        where = (image_files or {}).get(key) or source
        height, width = image.shape[:2]
        scaled = coords * float(scale)
        gray = image.mean(axis=2) if image.ndim == 3 else image
        given = _tissue_contrast(gray, scaled, tissue) if contrast_usable else 0.0
        swapped = _tissue_contrast(gray, scaled[:, ::-1], tissue) if contrast_usable else 0.0
        if contrast_usable and swapped >= SWAP_MIN_CONTRAST and swapped >= SWAP_CONTRAST_RATIO * given:
            raise InputError(
                positions_file or source,
                f"the spot coordinates look swapped (x for y) against {where}: tissue spots stand out from "
                f"the background by {given:.2f} SD of the image where the coordinates put them, but by "
                f"{swapped:.2f} SD with x and y exchanged; check that pxl_row_in_fullres and "
                "pxl_col_in_fullres are not exchanged (and obsm['spatial'] is (x, y) = (column, row))",
            )
        span = np.ptp(scaled, axis=0) if len(scaled) > 1 else np.zeros(2)
        coverage = float(max(span[0] / width, span[1] / height))
        if coverage < MIN_IMAGE_COVERAGE:
            warnings.warn(
                f"{where}: the spots span only {span[0]:.0f} x {span[1]:.0f} of its {width} x {height} "
                f"pixels ({coverage:.0%}; a whole Visium capture area spans about 75%) with "
                f"tissue_{key}_scalef = {float(scale):g}: the image may be at another scale than its scale "
                "factor (fine for a cropped sample)",
                UndiffuseWarning,
                stacklevel=2,
            )


def check_sample(
    adata: AnnData,
    *,
    source: PathLikeOrNone = None,
    tissue_key: str | None = None,
    allow_degenerate_tissue: bool = False,
    tissue: bool = True,
) -> TissueStats | None:
    """Check a canonical AnnData in memory: raw counts in ``X``, names, coordinates and (unless ``tissue`` is
    false) tissue.

    Parameters
    ----------
    adata
        Canonical AnnData (``read_sample`` output or a ``prepared.h5ad``).
    source
        Named in errors; default ``uns['undiffuse']['source']``.
    tissue_key
        ``obs`` column of the tissue mask; default ``tissue`` when present, else ``in_tissue``.
    allow_degenerate_tissue
        See :func:`check_tissue`.
    tissue
        Whether to check the tissue mask (``prepare`` checks the mask it makes instead).
    """
    from .spatial import SPATIAL_KEY, tissue_spots

    if source is None:
        source = adata.uns.get("undiffuse", {}).get("source")
    # X is what prepare and correct work on: in a canonical AnnData it holds the raw counts.
    counts, where = adata.X, "X"
    if counts is None:
        raise InputError(source, "holds no count matrix (X is empty); X must hold the raw UMI counts")
    check_counts(counts, source, what=where, barcodes=adata.obs_names, genes=adata.var_names)
    check_not_empty(counts, source, what=where)
    check_unique_barcodes(adata.obs_names, source)
    if not adata.var_names.is_unique:
        repeated = adata.var_names[adata.var_names.duplicated()].unique()
        raise InputError(
            source,
            f"gene names repeat (e.g. {_shown(repeated)}); make them unique (adata.var_names_make_unique()) "
            "or read the sample with undiffuse.read_sample, which does",
        )
    if SPATIAL_KEY not in adata.obsm:
        raise InputError(source, "has no obsm['spatial'] with the spots' pixel coordinates")
    coords = np.asarray(adata.obsm[SPATIAL_KEY], dtype=np.float64)
    if coords.ndim != 2 or coords.shape[1] != 2 or not np.all(np.isfinite(coords)):
        raise InputError(source, "obsm['spatial'] must hold finite (x, y) pixel coordinates of every spot")
    if not tissue:
        return None
    return check_tissue(
        tissue_spots(adata, key=tissue_key, source=source),
        counts,
        source,
        allow_degenerate=allow_degenerate_tissue,
    )


#: What ``prepare`` adds, and the correction needs.
PREPARED_FIELDS = (
    ("obs", "tissue"),
    ("var", "selected"),
    ("obsm", "spatial"),
    ("uns", "undiffuse"),
)


def check_prepared(
    adata: AnnData, path: PathLikeOrNone, *, allow_degenerate_tissue: bool = False
) -> TissueStats:
    """Check a ``prepared.h5ad`` (the output of ``undiffuse prepare``) as read from ``path``.

    Besides :func:`check_sample`: ``obs['tissue']``, ``var['selected']``, ``obsm['spatial']`` and
    ``uns['undiffuse']`` are present.
    """
    missing = [
        f"{slot}[{key!r}]"
        for slot, key in PREPARED_FIELDS
        if key not in (getattr(adata, slot).keys() if slot in ("obsm", "uns") else getattr(adata, slot))
    ]
    if missing:
        raise InputError(
            path,
            f"is not a prepared sample: it lacks {', '.join(missing)}; run `undiffuse prepare` on it first "
            "(or give the Space Ranger folder)",
        )
    return check_sample(
        adata, source=path, tissue_key="tissue", allow_degenerate_tissue=allow_degenerate_tissue
    )


def check_genes(
    genes: Sequence[str], adata: AnnData, source: PathLikeOrNone, *, what: str = "the gene list"
) -> list[str]:
    """Genes to correct: at least one, none repeated, each a gene name (or id) of ``adata``.

    Returns
    -------
    The gene names (``var_names``) in the order given; ids are translated to names.

    Raises
    ------
    InputError
        Naming ``source`` (the gene file, or the option that listed them).
    """
    import pandas as pd

    genes = [str(gene) for gene in genes]
    if not genes:
        raise InputError(source, f"{what} names no gene; list at least one gene to correct")
    listed = pd.Index(genes)
    if not listed.is_unique:
        repeated = listed[listed.duplicated()].unique()
        raise InputError(source, f"{what} names {_shown(repeated)} more than once; list each gene once")
    names = pd.Index(adata.var_names)
    ids = adata.var["gene_ids"].astype(str).to_numpy() if "gene_ids" in adata.var else np.array([], dtype=str)
    resolved, unknown = [], []
    for gene in genes:
        if gene in names:
            resolved.append(gene)
            continue
        matches = np.flatnonzero(ids == gene)
        if len(matches) > 1:
            raise InputError(
                source,
                f"gene id {gene} in {what} belongs to {len(matches)} genes ({_shown(names[matches])}); list "
                "them by name",
            )
        if len(matches) == 1:
            resolved.append(str(names[matches[0]]))
        else:
            unknown.append(gene)
    if unknown:
        raise InputError(
            source,
            f"{len(unknown)} gene(s) are not in the matrix: {_shown(unknown)}; list gene names or ids of the "
            "sample (check the spelling and the species)",
        )
    if len(set(resolved)) != len(resolved):
        repeated = pd.Index(resolved)[pd.Index(resolved).duplicated()].unique()
        raise InputError(source, f"{what} names {_shown(repeated)} twice (by name and by id); list each once")
    return resolved


def check_correct_input(
    adata: AnnData,
    genes: Sequence[str] | None = None,
    *,
    allow_degenerate_tissue: bool = False,
) -> list[str] | None:
    """What ``correct()`` checks before any work: the sample (:func:`check_sample`) and the genes.

    Returns
    -------
    The genes as names of ``adata`` (:func:`check_genes`), or None when ``genes`` is None.
    """
    check_sample(adata, allow_degenerate_tissue=allow_degenerate_tissue)
    if genes is None:
        return None
    return check_genes(genes, adata, adata.uns.get("undiffuse", {}).get("source"), what="genes")


def failed_genes(corrected: np.ndarray, raw_totals: np.ndarray, genes: Sequence[str]) -> np.ndarray:
    """``(G,)`` whether the correction of each gene failed, reported in a warning; the caller passes those
    genes through unchanged (their raw counts), so that nothing is zeroed.

    A correction failed when it holds NaN, Inf or negative values, or is zero everywhere while the gene has
    counts (every gene's total is kept, so that is a NaN that was zeroed).

    Parameters
    ----------
    corrected
        ``(M, G)`` corrected values (of any spots holding them; on Visium HD, the tissue's), genes in ``genes``
        order; read a block of rows at a time, without copies.
    raw_totals
        ``(G,)`` each gene's raw total.
    """
    finite = np.ones(corrected.shape[1], dtype=bool)
    negative = np.zeros(corrected.shape[1], dtype=bool)
    totals = np.zeros(corrected.shape[1])
    for start in range(0, corrected.shape[0], FAILURE_CHECK_ROWS):
        block = corrected[start : start + FAILURE_CHECK_ROWS]
        finite &= np.isfinite(block).all(axis=0)
        with np.errstate(invalid="ignore"):
            negative |= (block < 0).any(axis=0)
            totals += np.abs(block).sum(axis=0, dtype=np.float64)
    failed = ~finite | negative | ((totals == 0) & (np.asarray(raw_totals) > 0))
    names = [genes[int(j)] for j in np.flatnonzero(failed)]
    if names:
        warnings.warn(
            f"the correction of {len(names)} gene(s) did not converge to finite counts ({_shown(names)}); "
            "they are passed through uncorrected (raw counts)",
            UndiffuseWarning,
            stacklevel=2,
        )
    return failed
