"""Validation and conversion of one image file with Pillow, before it becomes a record.

Every file is decoded in full, so undecodable, truncated, zero-byte and
non-image files are found here rather than by a paid accelerator mid-epoch.
Records store RGB JPEG only: a JPEG already in RGB is kept byte for byte (no
second lossy encode); anything else Pillow reads (PNG, GIF, BMP, grayscale
or CMYK JPEG, WebP, TIFF, ...) is converted, and so is an image larger than
the optional maximum side.

A decompression bomb (a small file whose header promises, say, 40,000 x
40,000 pixels) is skipped before decoding: ``Image.open`` reads only the
header, and an image over ``max_pixels`` (``--max_image_pixels``, by default
Pillow's own ``MAX_IMAGE_PIXELS``, 89,478,485) is never loaded. Pillow's
hard stop at twice its ``MAX_IMAGE_PIXELS`` stays in force above any larger
flag value. ``oversize_reason`` serves ``trainer.predict`` the same way.

Conversion follows what the trainer's ``tf.io.decode_image(channels=3)``
does with the same file at serving time: the first frame of an animation,
palette expanded, alpha dropped (not composited), so training and serving
see the same pixels.
"""

import dataclasses
import io
import warnings
from typing import Tuple

from PIL import Image, UnidentifiedImageError

OK = "ok"
CONVERTED = "converted"
SKIPPED = "skipped"
# Decoded pixels (width x height) above which an image is skipped unread: Pillow's default.
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS

# Formats TF decodes as JPEG: camera MPO files start with an ordinary JPEG stream.
_JPEG_FORMATS = ("JPEG", "MPO")
_MODE_NAMES = {"L": "grayscale", "LA": "grayscale with alpha", "CMYK": "CMYK",
               "RGBA": "RGBA", "P": "palette", "PA": "palette with alpha", "1": "1-bit",
               "I": "32-bit integer", "I;16": "16-bit", "F": "float", "YCbCr": "YCbCr"}


@dataclasses.dataclass(frozen=True)
class CheckedImage:
    """What became of one file.

    Attributes:
      status: OK (stored as it was), CONVERTED or SKIPPED.
      reason: why it was converted or skipped; empty when OK.
      encoded: RGB JPEG bytes to store; empty when skipped.
      height: stored height, pixels (0 when skipped).
      width: stored width, pixels (0 when skipped).
      source_format: Pillow's name of the file's format ('' if unknown).
      source_size: (width, height) of the file's image, (0, 0) if unknown.
    """

    status: str
    reason: str = ""
    encoded: bytes = b""
    height: int = 0
    width: int = 0
    source_format: str = ""
    source_size: Tuple[int, int] = (0, 0)


def _skip(reason: str, source_format: str = "", size=(0, 0)) -> CheckedImage:
    return CheckedImage(SKIPPED, reason, source_format=source_format, source_size=size)


def check_image(data: bytes, max_side: int = 0, jpeg_quality: int = 95,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> CheckedImage:
    """Decodes ``data`` fully and returns what to store, or why not.

    Args:
      data: the file's bytes.
      max_side: downscale (keeping the aspect ratio) so that neither side
        exceeds this many pixels; 0 keeps every size.
      jpeg_quality: quality of JPEGs written for converted images, 1-100.
      max_pixels: skip, without decoding, an image whose header gives more
        pixels than this (``--max_image_pixels``).

    Returns:
      A CheckedImage. Never raises for bad input: every failure is a SKIPPED
      result with the reason.
    """
    if not data:
        return _skip("zero-byte file")
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        return _skip("not an image (Pillow cannot identify the format)")
    except Image.DecompressionBombError as e:
        return _skip(f"too large to decode safely (Pillow's limit): {e}")
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        return _skip(_failure("header", e))
    source_format, size = image.format or "", image.size
    if size[0] * size[1] > max_pixels:
        return _skip(too_large(size, max_pixels), source_format, size)
    try:
        image.load()  # A full decode: truncation and corrupt data surface here.
    except Image.DecompressionBombError as e:
        return _skip(f"too large to decode safely: {e}", source_format, size)
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        return _skip(_failure(source_format, e), source_format, size)
    return _convert_if_needed(data, image, max_side, jpeg_quality)


def too_large(size: Tuple[int, int], max_pixels: int) -> str:
    """The reason given for an image over the pixel limit."""
    return (f"too large to decode safely: {size[0]}x{size[1]} = {size[0] * size[1]:,} "
            f"pixels, over --max_image_pixels={max_pixels:,}")


def oversize_reason(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> str:
    """Why ``data`` is too large to decode, from its header alone; '' when it is not.

    A file Pillow cannot read a header from gets '': its decoder reports it.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            size = Image.open(io.BytesIO(data)).size
    except Image.DecompressionBombError as e:
        return f"too large to decode safely (Pillow's limit): {e}"
    except (OSError, SyntaxError, ValueError, EOFError):
        return ""
    return too_large(size, max_pixels) if size[0] * size[1] > max_pixels else ""


def _failure(what: str, error: Exception) -> str:
    kind = "truncated" if "truncated" in str(error).lower() else "corrupt"
    return f"{kind} {what}: {error}"


def _convert_if_needed(data: bytes, image: Image.Image, max_side: int,
                       jpeg_quality: int) -> CheckedImage:
    source_format, (width, height) = image.format or "", image.size
    reasons = []
    if source_format not in _JPEG_FORMATS:
        frames = getattr(image, "n_frames", 1)
        first = f" (first of {frames} frames)" if frames > 1 else ""
        reasons.append(f"{source_format}{first} to JPEG")
    if image.mode != "RGB":
        reasons.append(f"{_MODE_NAMES.get(image.mode, image.mode)} to RGB")
    new_size = _downscaled_size(width, height, max_side)
    if new_size != (width, height):
        reasons.append(f"downscaled {width}x{height} to {new_size[0]}x{new_size[1]}")
    if not reasons:
        return CheckedImage(OK, encoded=data, height=height, width=width,
                            source_format=source_format, source_size=(width, height))
    rgb = image.convert("RGB")
    if new_size != (width, height):
        rgb = rgb.resize(new_size, Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    # 4:4:4 chroma: converted sources are often graphics (PNG, GIF, BMP) whose
    # sharp colour edges 4:2:0 subsampling would smear.
    rgb.save(buffer, format="JPEG", quality=jpeg_quality, subsampling=0)
    return CheckedImage(CONVERTED, "; ".join(reasons), buffer.getvalue(), new_size[1],
                        new_size[0], source_format, (width, height))


def _downscaled_size(width: int, height: int, max_side: int) -> Tuple[int, int]:
    if not max_side or max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))
