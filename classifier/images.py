"""Opening untrusted images safely and turning any PIL mode into RGB or L.

Every image that enters the project, from a dataset folder or from an upload in the app, goes
through `open_image`, so the rules live in one place: EXIF rotation is applied, decompression bombs
and truncated files are refused with a readable message, and the odd modes (palette, RGBA, CMYK,
16-bit, float) become plain 8-bit pixels.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from classifier.errors import ImageError

# Pillow's own default (about 89 megapixels) warns at 1x and raises at 2x. We raise at 1x: a
# classifier never needs more pixels than that, and a 90 MP upload is almost certainly hostile.
MAX_IMAGE_PIXELS = 89_478_485
# The files the library reads as images (dataset folders, predict's folders, the app's examples).
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}

ImageSource = Union[str, os.PathLike, bytes, BinaryIO, Image.Image, np.ndarray]


def list_images(folder: Path) -> list[str]:
    """Every image file under `folder` (any depth, IMAGE_EXTENSIONS), as sorted path strings."""
    return sorted(
        str(p) for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
    )


def _describe(source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return "the image"


def _error(source, problem: str, detail: str = "") -> ImageError:
    """An ImageError whose `problem` is plain words a person can act on ("is empty (0 bytes)"),
    kept apart from Pillow's own `detail`, which helps a log but means nothing to an uploader."""
    error = ImageError(f"{_describe(source)} {problem}" + (f" ({detail})" if detail else ""))
    error.problem = problem
    return error


# A large JPEG decoded at reduced size (Pillow's draft: the decoder's own 1/2, 1/4 or 1/8 DCT
# scaling) keeps at least DRAFT_MARGIN times the side the preprocessing needs, so the resize after
# it still averages many decoded pixels into each one it keeps; only above DRAFT_ABOVE_PIXELS,
# where decoding dominates (a 48-megapixel photo: ~800 ms whole). Smaller images decode whole, so
# they give exactly what the model card's plain-PIL snippet gives.
DRAFT_MARGIN = 4
DRAFT_ABOVE_PIXELS = 4_000_000


def _draft(image: Image.Image, min_side: int | None) -> None:
    """Decode a large JPEG at the smallest DCT scale whose shorter side stays >= DRAFT_MARGIN x
    min_side: a 48-megapixel photo decodes at 1/4 or 1/8 of each side, several times faster. Only
    JPEG has such a decoder; other formats, and images up to DRAFT_ABOVE_PIXELS, decode whole."""
    width, height = image.size
    if not min_side or image.format != "JPEG" or width * height <= DRAFT_ABOVE_PIXELS:
        return
    scale = min(width, height) / (DRAFT_MARGIN * min_side)
    if scale >= 2:
        image.draft(None, (max(1, int(width / scale)), max(1, int(height / scale))))


def _open(source: ImageSource, min_side: int | None = None) -> Image.Image:
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, np.ndarray):
        return Image.fromarray(source)
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise _error(path, "was not found (no such file)")
        if path.stat().st_size == 0:
            raise _error(path, "is empty (0 bytes)")
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            # Turn Pillow's bomb *warning* (between 1x and 2x the limit) into an error too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(source)  # reads the header only: the bomb check on its size is here
            _draft(image, min_side)
            image.load()  # decode now, so truncation shows up here and not deep in a transform
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _error(source, f"is too large to decode safely (more than {MAX_IMAGE_PIXELS / 1e6:.0f} "
                             "megapixels)") from exc
    except UnidentifiedImageError as exc:
        raise _error(source, "is not an image file in a format that can be read") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        # OSError: truncated or corrupt data; SyntaxError/ValueError: malformed headers.
        raise _error(source, "is damaged or truncated", str(exc)) from exc
    finally:
        Image.MAX_IMAGE_PIXELS = previous
    return image


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit and float single-channel images scaled into 0..255 (Pillow's convert would clip)."""
    array = np.asarray(image)
    if array.dtype == np.uint8:
        return Image.fromarray(array)
    if np.issubdtype(array.dtype, np.integer) and array.max(initial=0) <= 255:
        return Image.fromarray(array.astype(np.uint8))
    if np.issubdtype(array.dtype, np.integer):
        # 16-bit data (I;16 or I): the full range of the type is 0..65535.
        return Image.fromarray((array.astype(np.float64) / 257.0).clip(0, 255).astype(np.uint8))
    low, high = float(np.nanmin(array)), float(np.nanmax(array))
    scale = 255.0 / (high - low) if high > low else 0.0
    return Image.fromarray(((np.nan_to_num(array, nan=low) - low) * scale).astype(np.uint8))


def to_channels(image: Image.Image, channels: int = 3) -> Image.Image:
    """Any PIL image as RGB (channels=3) or L (channels=1); transparency is flattened onto white."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, not {channels}")
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        image = _to_8bit(image)
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    target = "RGB" if channels == 3 else "L"
    return image if image.mode == target else image.convert(target)


def open_image(source: ImageSource, channels: int = 3, min_side: int | None = None) -> Image.Image:
    """Open a path, bytes, file object, array or PIL image as an upright 8-bit RGB or L image.

    `min_side`: the shorter side the caller's preprocessing needs at most; a large JPEG is then
    decoded at reduced size (_draft), never below DRAFT_MARGIN times it. Raises ImageError, with
    a message fit to show a user, for anything that is not a usable image.
    """
    image = _open(source, min_side)
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block should not cost us an otherwise good image
        pass
    return to_channels(image, channels)
