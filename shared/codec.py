"""Image codec for the wire: RGB uint8 arrays <-> base64 PNG (lossless, so pixel rewards are exact)."""

from __future__ import annotations

import base64
import binascii
import io
import warnings

import numpy as np
from PIL import Image

# Decompression-bomb guard: refuse anything with more pixels than this before decoding it.
DEFAULT_MAX_PIXELS = 4096 * 4096


class ImageDecodeError(ValueError):
    """An image on the wire is not a valid base64 PNG RGB image within the limits."""


class ImageTooLargeError(ImageDecodeError):
    """A well-formed image with more pixels than allowed (the server answers 413, not 422)."""


def encode_png_b64(image: np.ndarray) -> str:
    """Encode one HxWx3 uint8 image as base64 PNG text."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 uint8 image, got shape {image.shape} dtype {image.dtype}")
    buffer = io.BytesIO()
    # compress_level 0: PNG is lossless at any level; stored (unzipped) blocks are the cheapest to
    # encode and ~4x faster for the server to decode (512x512: 15 vs 26 ms, 1.0 vs 3.8 ms), ~20% larger.
    Image.fromarray(image, mode="RGB").save(buffer, format="PNG", compress_level=0)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_png_b64(data: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode base64 PNG text into an HxWx3 uint8 array, or raise ImageDecodeError with a reason."""
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ImageDecodeError(f"not valid base64: {err}") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw)) as img:
                if img.format != "PNG":
                    raise ImageDecodeError(f"expected a PNG image, got {img.format}")
                width, height = img.size
                if width * height > max_pixels:
                    raise ImageTooLargeError(
                        f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}"
                    )
                if img.mode != "RGB":
                    raise ImageDecodeError(f"expected an RGB image, got mode {img.mode}")
                array = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except ImageDecodeError:
        raise
    except (
        OSError,
        SyntaxError,
        ValueError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    ) as err:
        raise ImageDecodeError(f"not a decodable PNG: {err}") from None
    return array
