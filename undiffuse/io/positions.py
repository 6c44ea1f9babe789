"""Spot positions of Space Ranger: ``tissue_positions_list.csv`` (v1, no header), ``tissue_positions.csv``
(v2, header) and ``tissue_positions.parquet`` (Visium HD)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import InputError

#: Columns of a positions table after the barcode, in Space Ranger's order.
POSITION_COLUMNS = ("in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres")

#: File names Space Ranger uses, most recent first.
POSITION_FILES = ("tissue_positions.parquet", "tissue_positions.csv", "tissue_positions_list.csv")


def find_positions(spatial_dir: Path) -> Path:
    """The positions file in a ``spatial/`` folder."""
    for name in POSITION_FILES:
        if (spatial_dir / name).is_file():
            return spatial_dir / name
    raise InputError(spatial_dir, f"no spot positions found (expected one of {', '.join(POSITION_FILES)})")


def _read_raw_table(path: Path) -> pd.DataFrame:
    if path.suffix == ".parquet":
        try:
            table = pd.read_parquet(path)
        except Exception as err:  # pyarrow raises several unrelated types for a bad file
            raise InputError(path, f"cannot be read as a Parquet table: {err}") from err
        return table.astype({column: object for column in table.columns if column != "barcode"})
    try:
        table = pd.read_csv(path, header=None, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError as err:
        raise InputError(path, "is empty") from err
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as err:
        raise InputError(path, f"cannot be read as CSV: {err}") from err
    has_header = table.shape[0] > 0 and table.iloc[0, 0].strip().lower() == "barcode"
    if has_header:
        table = table.iloc[1:].reset_index(drop=True)
        table.columns = [str(name).strip() for name in pd.read_csv(path, nrows=0).columns]
    elif table.shape[1] == len(POSITION_COLUMNS) + 1:
        table.columns = ["barcode", *POSITION_COLUMNS]
    else:
        raise InputError(
            path,
            f"has {table.shape[1]} columns and no header; expected barcode, {', '.join(POSITION_COLUMNS)}",
        )
    return table


def read_positions(path: str | Path) -> pd.DataFrame:
    """Read a positions table and check it.

    Returns
    -------
    DataFrame indexed by barcode with ``in_tissue`` (bool), ``array_row``, ``array_col`` (int64),
    ``pxl_row_in_fullres``, ``pxl_col_in_fullres`` (float64).

    Raises
    ------
    InputError
        For a missing file, missing columns, duplicated barcodes, missing or non-numeric coordinates, or
        ``in_tissue`` values other than 0 and 1.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file does not exist")
    table = _read_raw_table(path)
    missing = [column for column in ("barcode", *POSITION_COLUMNS) if column not in table.columns]
    if missing:
        raise InputError(path, f"lacks the column(s) {', '.join(missing)}")
    if table.shape[0] == 0:
        raise InputError(path, "lists no spots")
    barcodes = table["barcode"].astype(str).str.strip()
    duplicated = barcodes[barcodes.duplicated()]
    if len(duplicated):
        raise InputError(path, f"lists {len(duplicated)} barcodes twice, e.g. {duplicated.iloc[0]}")
    positions = pd.DataFrame(index=pd.Index(barcodes.to_numpy(), name="barcode"))
    for column in POSITION_COLUMNS:
        raw = table[column]
        text = raw.astype(str).str.strip()
        is_missing = raw.isna().to_numpy() | text.isin(["", "nan", "NaN", "NA", "None"]).to_numpy()
        values = pd.to_numeric(text.where(~is_missing), errors="coerce").to_numpy(dtype=np.float64)
        if is_missing.any():
            first = barcodes.iloc[int(np.flatnonzero(is_missing)[0])]
            raise InputError(path, f"{int(is_missing.sum())} spot(s) lack a value of {column}, e.g. {first}")
        bad = ~np.isfinite(values)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise InputError(
                path, f"non-numeric value {text.iloc[row]!r} in column {column} (spot {barcodes.iloc[row]})"
            )
        positions[column] = values
    in_tissue = positions["in_tissue"].to_numpy()
    if not np.isin(in_tissue, (0, 1)).all():
        raise InputError(path, "in_tissue must be 0 or 1")
    for column in ("array_row", "array_col"):
        if not np.all(positions[column] == np.round(positions[column])):
            raise InputError(path, f"{column} must hold integers")
    return positions.astype({"in_tissue": bool, "array_row": np.int64, "array_col": np.int64})
