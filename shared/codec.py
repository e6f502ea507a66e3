"""Image codec for the wire: RGB uint8 arrays <-> base64 PNG (lossless, so pixel rewards are exact)."""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import warnings
from collections.abc import Iterator

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
    raw = b64decode_image(data)
    with png_decoding(), Image.open(io.BytesIO(raw)) as img:
        if img.format != "PNG":
            raise ImageDecodeError(f"expected a PNG image, got {img.format}")
        width, height = img.size
        if width * height > max_pixels:
            raise ImageTooLargeError(
                f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}"
            )
        if img.mode != "RGB":
            raise ImageDecodeError(f"expected an RGB image, got mode {img.mode}")
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


def b64decode_image(data: str) -> bytes:
    """The bytes of a base64 image, or ImageDecodeError if ``data`` is not strict base64."""
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ImageDecodeError(f"not valid base64: {err}") from None


@contextlib.contextmanager
def png_decoding() -> Iterator[None]:
    """Around PIL opening and decoding an image: a decompression bomb, or anything PIL cannot
    decode, is an ImageDecodeError ("not a decodable PNG"); ImageDecodeErrors raised inside pass."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
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
