"""Visium HD bin folders (``binned_outputs/square_XXXum/``): checks that one folder is complete and holds one
bin size, before its bins are read as square spots.

The generic Space Ranger reader (:mod:`undiffuse.io.spaceranger`) calls these for HD folders. A filtered
matrix (tissue bins only) is read like any filtered matrix and refused by ``prepare`` unless allowed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import InputError
from .images import SCALEFACTORS_FILE, read_scalefactors

#: The positions file Space Ranger writes into every HD bin folder.
HD_POSITIONS_FILE = "tissue_positions.parquet"
#: The file at the top of an HD ``outs/`` whose ``metadata_json`` attribute names the layout's file format.
HD_FEATURE_SLICE = "feature_slice.h5"

_BIN_FOLDER = re.compile(r"^square_(\d+)um$")
#: Bin barcodes name their size: ``s_008um_00012_00034-1``.
_BARCODE_SIZE = re.compile(r"^s_(\d{3})um_$")


def folder_bin_size(folder: Path) -> int | None:
    """Bin size in microns named by a ``square_XXXum`` folder, or None for another folder."""
    match = _BIN_FOLDER.match(Path(folder).name)
    return int(match.group(1)) if match else None


def hd_barcodes(bin_um: int, array_row: np.ndarray, array_col: np.ndarray) -> np.ndarray:
    """Space Ranger's bin barcodes ``s_008um_00012_00034-1`` as a NumPy bytes array (no Python strings).

    Sorting them sorts the bins row-major, the order in which Space Ranger writes the matrix.
    """
    prefix = np.frombuffer(f"s_{bin_um:03d}um_".encode(), dtype=np.uint8)
    n = len(array_row)
    out = np.empty((n, prefix.size + 13), dtype=np.uint8)
    out[:, : prefix.size] = prefix
    for offset, values in ((prefix.size, array_row), (prefix.size + 6, array_col)):
        values = np.asarray(values, dtype=np.int64)
        for digit in range(5):
            out[:, offset + 4 - digit] = ord("0") + (values // 10**digit) % 10
    out[:, prefix.size + 5] = ord("_")
    out[:, -2:] = np.frombuffer(b"-1", dtype=np.uint8)
    return out.view(f"S{out.shape[1]}").ravel()


def barcode_bin_sizes(barcodes: Iterable[str]) -> dict[int, str]:
    """Bin sizes (microns) found in HD barcodes, each with one example barcode; other barcodes are ignored."""
    index = pd.Index(barcodes)
    if index.empty:
        return {}
    # Millions of 2 um barcodes: compare fixed-width prefixes, and parse only the few distinct ones.
    prefixes = index.str.slice(0, 8)
    sizes: dict[int, str] = {}
    for prefix in prefixes.unique():
        match = _BARCODE_SIZE.match(str(prefix))
        if match:
            sizes[int(match.group(1))] = str(index[prefixes.get_indexer_for([prefix])[0]])
    return sizes


def check_hd_folder(folder: Path) -> None:
    """An HD bin folder must hold ``spatial/tissue_positions.parquet``.

    Raises
    ------
    InputError
        Naming the missing Parquet file.
    """
    parquet = Path(folder) / "spatial" / HD_POSITIONS_FILE
    if not parquet.is_file():
        raise InputError(
            parquet,
            "file does not exist: a Visium HD bin folder needs Space Ranger's tissue_positions.parquet (the "
            "array indices and pixel positions of every bin); copy the folder's spatial/ from the Space "
            "Ranger output",
        )


def check_hd_bins(
    folder: Path, matrix: Path, positions: Path, matrix_barcodes: pd.Index, position_barcodes: pd.Index
) -> None:
    """The matrix, the positions and the scale factors of an HD folder must describe one bin size.

    Checks that neither file mixes barcodes of several bin sizes, that both hold the size the folder is
    named after, and that ``bin_size_um`` of ``scalefactors_json.json`` agrees.

    Raises
    ------
    InputError
        Naming the file that holds a second bin size, or disagrees with the folder.
    """
    expected = folder_bin_size(folder)
    for path, barcodes in ((positions, position_barcodes), (matrix, matrix_barcodes)):
        sizes = barcode_bin_sizes(barcodes)
        if len(sizes) > 1:
            listed = ", ".join(f"{size} um (e.g. {example})" for size, example in sorted(sizes.items()))
            raise InputError(
                path,
                f"mixes bins of several sizes: {listed}; a square_XXXum folder holds one bin size, so take "
                "the matrix and the positions from the same Space Ranger bin folder",
            )
        if expected is not None and sizes and expected not in sizes:
            ((size, example),) = sizes.items()
            raise InputError(
                path,
                f"holds {size} um bins (e.g. {example}) but its folder is {Path(folder).name}; the file was "
                f"copied from another bin size: take it from square_{size:03d}um or replace it with the "
                f"{expected} um one",
            )
    scalefactors = Path(folder) / "spatial" / SCALEFACTORS_FILE
    if expected is not None and scalefactors.is_file():
        bin_size = read_scalefactors(scalefactors).get("bin_size_um")
        if bin_size is not None and not np.isclose(bin_size, expected):
            raise InputError(
                scalefactors,
                f"bin_size_um is {bin_size:g} but the folder is {Path(folder).name}; the scale factors belong to "
                "another bin size: take them from the same Space Ranger bin folder",
            )
