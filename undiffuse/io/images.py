"""H&E images and scale factors, checked against the spot coordinates they must frame."""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import InputError

SCALEFACTORS_FILE = "scalefactors_json.json"

#: Space Ranger's image names in ``spatial/``, by scanpy's image key.
IMAGE_FILES = {"hires": "tissue_hires_image.png", "lowres": "tissue_lowres_image.png"}

#: Long side, in pixels, of the hires image made from a full-resolution one (Space Ranger's size).
HIRES_LONG_SIDE = 2000

#: How far (share of the image size) spot centres may fall outside an image before its scale is wrong.
FIT_TOLERANCE = 0.02


def read_scalefactors(path: str | Path) -> dict[str, float]:
    """Read ``scalefactors_json.json``; every value must be a positive finite number."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file does not exist")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(path, f"cannot be read as JSON: {err}") from err
    if not isinstance(raw, dict):
        raise InputError(path, "is not a JSON object of scale factors")
    scalefactors: dict[str, float] = {}
    for key, value in raw.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise InputError(path, f"scale factor {key} is not a number: {value!r}")
        if value <= 0:
            raise InputError(path, f"scale factor {key} must be positive, not {value}")
        scalefactors[key] = float(value)
    if "spot_diameter_fullres" not in scalefactors:
        raise InputError(path, "lacks spot_diameter_fullres")
    return scalefactors


def _to_rgb_float(image: Image.Image) -> np.ndarray:
    if image.mode in {"I;16", "I;16B", "I;16L", "I"}:
        gray = np.asarray(image, dtype=np.float32)
        gray /= max(float(gray.max()), 1.0)
        return np.repeat(gray[..., None], 3, axis=2)
    return np.asarray(image.convert("RGB"), dtype=np.float32) / np.float32(255.0)


@contextmanager
def _open_image(path: str | Path) -> Iterator[Image.Image]:
    """Open an image file; a missing, corrupt or truncated file raises :class:`InputError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file does not exist")
    previous_limit = Image.MAX_IMAGE_PIXELS
    # Full-resolution H&E scans legitimately exceed PIL's decompression-bomb limit.
    Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings(), Image.open(path) as image:
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield image
    except (OSError, SyntaxError, ValueError, Image.UnidentifiedImageError) as err:
        raise InputError(path, f"cannot be read as an image (corrupt or truncated file?): {err}") from err
    finally:
        Image.MAX_IMAGE_PIXELS = previous_limit


def read_image(path: str | Path, *, max_long_side: int | None = None) -> np.ndarray:
    """Read an image as float32 RGB in ``[0, 1]``, shape ``(height, width, 3)``.

    Parameters
    ----------
    path
        PNG, JPEG or TIFF file.
    max_long_side
        Downscale (area averaging) so that the longer side has at most this many pixels; used for
        full-resolution microscope images, which can exceed the memory of a laptop at full size.

    Raises
    ------
    InputError
        When the file is missing or cannot be decoded (corrupt or truncated).
    """
    with _open_image(path) as image:
        image.load()
        if max_long_side is not None and max(image.size) > max_long_side:
            factor = max_long_side / max(image.size)
            size = (max(1, round(image.size[0] * factor)), max(1, round(image.size[1] * factor)))
            image = image.convert("RGB").resize(size, Image.Resampling.BOX)
        return _to_rgb_float(image)


def image_size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` of an image file, read from its header only."""
    with _open_image(path) as image:
        return image.size


def check_image_fits(
    coords_xy: np.ndarray,
    scale: float,
    image_shape: tuple[int, ...],
    *,
    image_path: str | Path | None,
    scale_source: str,
) -> None:
    """Check that spot centres, scaled into an image's pixels, fall inside the image.

    A wrong scale factor (or an image of another section or resolution) puts spots outside the picture,
    which would silently misplace the tissue mask and every image-based loss.

    Parameters
    ----------
    coords_xy
        ``(N, 2)`` full-resolution spot centres ``(x, y)``.
    scale
        Factor from full-resolution pixels to the image's pixels.
    image_shape
        ``(height, width, ...)``.
    image_path
        Named in the error.
    scale_source
        Where ``scale`` came from (e.g. ``scalefactors_json.json: tissue_lowres_scalef``), named in the error.
    """
    height, width = image_shape[0], image_shape[1]
    scaled = np.asarray(coords_xy, dtype=np.float64) * scale
    x_min, y_min = scaled.min(axis=0)
    x_max, y_max = scaled.max(axis=0)
    if not _fits(scaled, width, height):
        hint = "the image or its scale factors belong to another resolution or sample"
        if _fits(scaled[:, ::-1], width, height):
            hint = (
                "the spots would fit with x and y exchanged: pxl_row_in_fullres and pxl_col_in_fullres look "
                "swapped in the positions"
            )
        raise InputError(
            image_path,
            f"the scale factor ({scale_source} = {scale:g}) does not fit the spot coordinates: scaled "
            f"spots span x {x_min:.0f}..{x_max:.0f}, y {y_min:.0f}..{y_max:.0f} pixels but the image is "
            f"{width} x {height}; {hint}",
        )


def _fits(scaled: np.ndarray, width: int, height: int) -> bool:
    x_min, y_min = scaled.min(axis=0)
    x_max, y_max = scaled.max(axis=0)
    return not (
        x_max > width * (1 + FIT_TOLERANCE)
        or y_max > height * (1 + FIT_TOLERANCE)
        or x_min < -width * FIT_TOLERANCE
        or y_min < -height * FIT_TOLERANCE
    )
