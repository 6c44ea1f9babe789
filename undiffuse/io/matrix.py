"""Feature-barcode matrices of Space Ranger: the 10x HDF5 file and the Matrix Market folder.

Both are stored genes x barcodes; the readers return spots x genes, as AnnData wants them.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import h5py
import numpy as np
import pandas as pd
import scipy.io
import scipy.sparse as sp

from ..errors import InputError
from ..validate import check_counts, check_not_empty, check_unique_barcodes

#: The only feature type that the correction uses; antibody or CRISPR features are dropped on reading.
GENE_EXPRESSION = "Gene Expression"

_GZIP_MAGIC = b"\x1f\x8b"

#: HDF5 attributes of a 10x matrix that are copied into ``uns['spatial'][sample]['metadata']``.
_KEPT_ATTRIBUTES = ("chemistry_description", "software_version", "library_ids")


@dataclass
class FeatureMatrix:
    """A count matrix as read from disk.

    Attributes
    ----------
    counts
        ``(n_barcodes, n_genes)`` CSR matrix of raw UMI counts, float32.
    barcodes
        Spot barcodes, in matrix order.
    features
        One row per gene: ``gene_ids``, ``gene_names``, ``feature_types``.
    path
        The file or folder it was read from.
    metadata
        HDF5 attributes worth keeping (chemistry, software version, library ids).
    """

    counts: sp.csr_matrix
    barcodes: pd.Index
    features: pd.DataFrame
    path: Path
    metadata: dict[str, str] = field(default_factory=dict)

    def gene_expression_only(self) -> FeatureMatrix:
        """Keep the gene-expression features when the matrix also holds other feature types."""
        is_gene = self.features["feature_types"].to_numpy() == GENE_EXPRESSION
        if is_gene.all() or not is_gene.any():
            return self
        return FeatureMatrix(
            self.counts[:, np.flatnonzero(is_gene)].tocsr(),
            self.barcodes,
            self.features.loc[is_gene].reset_index(drop=True),
            self.path,
            self.metadata,
        )


def _decode(values: np.ndarray) -> np.ndarray:
    return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in values], dtype=object)


def _check_csc_parts(
    path: Path, data: np.ndarray, indices: np.ndarray, indptr: np.ndarray, n_genes: int, n_barcodes: int
) -> None:
    problems = []
    if indptr.shape[0] != n_barcodes + 1:
        problems.append(f"indptr has {indptr.shape[0]} entries for {n_barcodes} barcodes")
    elif indptr[-1] != data.shape[0] or indices.shape[0] != data.shape[0]:
        problems.append("data, indices and indptr disagree in length")
    if indices.size and (indices.min() < 0 or indices.max() >= n_genes):
        problems.append("gene indices fall outside the feature list")
    if problems:
        raise InputError(path, "is not a valid 10x feature-barcode matrix: " + "; ".join(problems))


def read_10x_h5(path: str | Path) -> FeatureMatrix:
    """Read a 10x Genomics HDF5 feature-barcode matrix (Cell/Space Ranger v3+ and the older v2 layout).

    Raises
    ------
    InputError
        When the file is missing, truncated, not HDF5, or lacks the datasets of a 10x matrix; when barcodes
        repeat; when counts are not finite, non-negative integers.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file does not exist")
    try:
        with h5py.File(path, "r") as handle:
            metadata = {
                key: ",".join(_decode(np.atleast_1d(handle.attrs[key])))
                for key in _KEPT_ATTRIBUTES
                if key in handle.attrs
            }
            if "matrix" in handle:
                group = handle["matrix"]
                features = group["features"]
                gene_ids = _decode(features["id"][:])
                gene_names = _decode(features["name"][:])
                if "feature_type" in features:
                    feature_types = _decode(features["feature_type"][:])
                else:
                    feature_types = np.full(gene_ids.shape[0], GENE_EXPRESSION, dtype=object)
            else:
                genomes = [key for key in handle if isinstance(handle[key], h5py.Group)]
                if len(genomes) != 1 or "genes" not in handle[genomes[0]]:
                    raise InputError(path, "is HDF5 but not a 10x feature-barcode matrix (no 'matrix' group)")
                group = handle[genomes[0]]
                gene_ids = _decode(group["genes"][:])
                gene_names = _decode(group["gene_names"][:])
                feature_types = np.full(gene_ids.shape[0], GENE_EXPRESSION, dtype=object)
            barcodes = _decode(group["barcodes"][:])
            data = np.asarray(group["data"][:])
            indices = np.asarray(group["indices"][:], dtype=np.int64)
            indptr = np.asarray(group["indptr"][:], dtype=np.int64)
            n_genes, n_barcodes = (int(v) for v in group["shape"][:])
    except InputError:
        raise
    except KeyError as err:
        raise InputError(path, f"is not a 10x feature-barcode matrix: missing dataset ({err})") from err
    except (OSError, ValueError, TypeError) as err:
        raise InputError(path, f"cannot be read as HDF5 (truncated or corrupt file?): {err}") from err
    if gene_ids.shape[0] != n_genes or barcodes.shape[0] != n_barcodes:
        raise InputError(
            path,
            f"is not a valid 10x feature-barcode matrix: shape {n_genes} x {n_barcodes} but "
            f"{gene_ids.shape[0]} features and {barcodes.shape[0]} barcodes",
        )
    _check_csc_parts(path, data, indices, indptr, n_genes, n_barcodes)
    check_unique_barcodes(barcodes, path)
    # The genes x barcodes CSC arrays are, read as CSR, the barcodes x genes matrix.
    raw = sp.csr_matrix((data, indices, indptr), shape=(n_barcodes, n_genes))
    check_counts(raw, path, what="the count matrix", barcodes=barcodes, genes=gene_names)
    counts = raw.astype(np.float32)
    features = pd.DataFrame({"gene_ids": gene_ids, "gene_names": gene_names, "feature_types": feature_types})
    return FeatureMatrix(counts, pd.Index(barcodes, name="barcode"), features, path, metadata)


def _open_maybe_gzip(path: Path) -> IO[bytes]:
    """Open a file that may or may not be gzipped, whatever its suffix says (fixtures in the wild lie)."""
    with open(path, "rb") as probe:
        magic = probe.read(2)
    return gzip.open(path, "rb") if magic == _GZIP_MAGIC else open(path, "rb")


def _find_member(folder: Path, stems: tuple[str, ...]) -> Path:
    for stem in stems:
        for candidate in (folder / stem, folder / f"{stem}.gz"):
            if candidate.is_file():
                return candidate
    names = " or ".join(f"{stem}[.gz]" for stem in stems)
    raise InputError(folder, f"Matrix Market folder has no {names}")


def _read_table(path: Path) -> pd.DataFrame:
    try:
        with _open_maybe_gzip(path) as handle:
            return pd.read_csv(handle, sep="\t", header=None, dtype=str, keep_default_na=False)
    except (OSError, EOFError, pd.errors.ParserError, UnicodeDecodeError) as err:
        raise InputError(path, f"cannot be read as a tab-separated table: {err}") from err
    except pd.errors.EmptyDataError as err:
        raise InputError(path, "is empty") from err


def read_10x_mtx(folder: str | Path) -> FeatureMatrix:
    """Read a Space Ranger Matrix Market folder: ``matrix.mtx``, ``barcodes.tsv`` and ``features.tsv``
    (or the older two-column ``genes.tsv``), each optionally gzipped.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, "folder does not exist")
    matrix_path = _find_member(folder, ("matrix.mtx",))
    barcodes_path = _find_member(folder, ("barcodes.tsv",))
    features_path = _find_member(folder, ("features.tsv", "genes.tsv"))
    try:
        with _open_maybe_gzip(matrix_path) as handle:
            genes_by_barcodes = sp.coo_matrix(scipy.io.mmread(handle))
    except (OSError, EOFError, ValueError) as err:
        raise InputError(matrix_path, f"cannot be read as a Matrix Market file: {err}") from err
    barcodes = _read_table(barcodes_path).iloc[:, 0].to_numpy(dtype=object)
    table = _read_table(features_path)
    gene_ids = table.iloc[:, 0].to_numpy(dtype=object)
    gene_names = table.iloc[:, 1].to_numpy(dtype=object) if table.shape[1] > 1 else gene_ids
    feature_types = (
        table.iloc[:, 2].to_numpy(dtype=object)
        if table.shape[1] > 2
        else np.full(gene_ids.shape[0], GENE_EXPRESSION, dtype=object)
    )
    if genes_by_barcodes.shape != (gene_ids.shape[0], barcodes.shape[0]):
        raise InputError(
            matrix_path,
            f"matrix is {genes_by_barcodes.shape[0]} x {genes_by_barcodes.shape[1]} but {features_path.name} "
            f"lists {gene_ids.shape[0]} features and {barcodes_path.name} {barcodes.shape[0]} barcodes",
        )
    check_unique_barcodes(barcodes, barcodes_path)
    check_counts(genes_by_barcodes.T, matrix_path, barcodes=barcodes, genes=gene_names)
    counts = genes_by_barcodes.T.tocsr().astype(np.float32)
    counts.sum_duplicates()
    features = pd.DataFrame({"gene_ids": gene_ids, "gene_names": gene_names, "feature_types": feature_types})
    return FeatureMatrix(counts, pd.Index(barcodes, name="barcode"), features, folder)


def read_matrix(path: str | Path) -> FeatureMatrix:
    """Read a 10x HDF5 file or a Matrix Market folder, keeping gene-expression features only."""
    path = Path(path)
    reader = read_10x_mtx if path.is_dir() else read_10x_h5
    matrix = reader(path).gene_expression_only()
    check_not_empty(matrix.counts, path, require_counts=False)
    return matrix
