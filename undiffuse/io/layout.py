"""Where the files of a sample are: Space Ranger ``outs/``, a bare matrix with ``spatial/`` beside it, or a
Visium HD ``binned_outputs/square_XXXum/`` folder."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from .images import IMAGE_FILES, SCALEFACTORS_FILE
from .positions import find_positions
from .visium_hd import check_hd_folder

#: Matrix names in an ``outs/`` folder, in order of preference: the raw matrix holds the background spots.
MATRIX_CANDIDATES = (
    ("raw_feature_bc_matrix.h5", "raw"),
    ("raw_feature_bc_matrix", "raw"),
    ("filtered_feature_bc_matrix.h5", "filtered"),
    ("filtered_feature_bc_matrix", "filtered"),
)

_HD_BIN_FOLDER = re.compile(r"^square_\d+um$")


@dataclass(frozen=True)
class SampleFiles:
    """The files of one Space Ranger sample.

    Attributes
    ----------
    matrix
        10x HDF5 file or Matrix Market folder.
    matrix_kind
        ``raw`` or ``filtered`` as far as the file name tells (``unknown`` otherwise).
    positions
        Spot positions table.
    scalefactors
        ``scalefactors_json.json`` or None when absent.
    images
        scanpy image key (``hires``, ``lowres``) -> PNG file, for those present.
    platform
        ``visium_hd`` for a ``square_XXXum`` folder, else ``visium`` (the reader also recognises Visium HD
        by the ``bin_size_um`` scale factor).
    sample_id
        Name derived from the folder names.
    """

    matrix: Path
    matrix_kind: str
    positions: Path
    scalefactors: Path | None
    images: dict[str, Path]
    platform: str
    sample_id: str


def _is_mtx_folder(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in ("matrix.mtx", "matrix.mtx.gz"))


def _matrix_kind(path: Path) -> str:
    name = path.name
    if name.startswith("raw_"):
        return "raw"
    if name.startswith("filtered_"):
        return "filtered"
    return "unknown"


def _sample_name(folder: Path) -> str:
    """The name of the sample folder that holds ``folder`` (skipping Space Ranger's own folder names)."""
    parts = [part for part in folder.resolve().parts if part not in {"/", ""}]
    generic = {"outs", "binned_outputs", "spatial"}
    names = [part for part in parts if part not in generic and not _HD_BIN_FOLDER.match(part)]
    bins = [part for part in parts if _HD_BIN_FOLDER.match(part)]
    base = names[-1] if names else "sample"
    return f"{base}_{bins[-1]}" if bins else base


def _binned_outputs_error(folder: Path) -> InputError:
    bins = sorted(p.name for p in folder.iterdir() if p.is_dir() and _HD_BIN_FOLDER.match(p.name))
    listed = ", ".join(bins) if bins else "none found"
    return InputError(
        folder,
        f"is a Visium HD binned_outputs folder; pass one bin size folder instead (available: {listed}), "
        "e.g. square_008um",
    )


def locate_sample(path: str | Path) -> SampleFiles:
    """Find the matrix, positions, scale factors and images of a sample from any accepted input path.

    Accepted: a sample folder holding ``outs/``; an ``outs/`` folder; a Visium HD ``square_XXXum/`` folder;
    a matrix file (``*.h5``) or Matrix Market folder with ``spatial/`` beside it.

    Raises
    ------
    InputError
        When the path does not exist or lacks a matrix or the spot positions.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "does not exist")
    if path.is_dir() and path.name == "binned_outputs":
        raise _binned_outputs_error(path)
    if path.is_dir() and (path / "binned_outputs").is_dir():
        raise _binned_outputs_error(path / "binned_outputs")
    if path.is_dir() and (path / "outs").is_dir():
        path = path / "outs"
    if path.is_dir() and (path / "binned_outputs").is_dir():
        raise _binned_outputs_error(path / "binned_outputs")

    if path.is_file() or _is_mtx_folder(path):
        matrix, folder = path, path.parent
        kind = _matrix_kind(path)
    else:
        folder = path
        found = [(folder / name, kind) for name, kind in MATRIX_CANDIDATES if (folder / name).exists()]
        if not found:
            raise InputError(
                folder,
                "holds no feature-barcode matrix (expected raw_feature_bc_matrix.h5 or a "
                "raw_feature_bc_matrix/ Matrix Market folder)",
            )
        matrix, kind = found[0]
    spatial_dir = folder / "spatial"
    if not spatial_dir.is_dir():
        raise InputError(folder, "has no spatial/ folder with the spot positions beside the matrix")
    if _HD_BIN_FOLDER.match(folder.name):
        check_hd_folder(folder)
    positions = find_positions(spatial_dir)
    scalefactors = spatial_dir / SCALEFACTORS_FILE
    images = {key: spatial_dir / name for key, name in IMAGE_FILES.items() if (spatial_dir / name).is_file()}
    is_hd = bool(_HD_BIN_FOLDER.match(folder.name))
    return SampleFiles(
        matrix=matrix,
        matrix_kind=kind,
        positions=positions,
        scalefactors=scalefactors if scalefactors.is_file() else None,
        images=images,
        platform="visium_hd" if is_hd else "visium",
        sample_id=_sample_name(folder),
    )
