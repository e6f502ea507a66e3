"""What a base64 PNG will cost before it is decoded: its header, read from the first 44 base64 characters.

The server charges every image's decoded size against the memory budget and refuses images over
``max_image_pixels`` (413) from this header alone, before the decoder allocates anything; the
full decode (shared/codec.py, with PIL) happens later, one scorer batch at a time.

The wire contract is 8-bit RGB (docs/reward_server.md "Image formats"): any size, interlaced or
not, any ancillary chunks. Every other PNG is refused (422) with a reason naming what it is, never
converted: 16-bit samples would have to be rounded, alpha or a tRNS chunk composited onto a
background the server would have to choose, and grayscale or palette images are not what the
trainer sends (a client that optimizes its PNGs must keep them RGB).
"""

from __future__ import annotations

import base64
import binascii
import io
import struct
from dataclasses import dataclass

import numpy as np
from PIL import Image

from shared.codec import ImageDecodeError, ImageTooLargeError, b64decode_image, png_decoding

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_HEADER_B64_CHARS = 44  # 33 bytes: signature (8) + IHDR length/type (8) + IHDR data (13) + CRC (4)
COLOR_TYPES = {0: "grayscale", 2: "RGB", 3: "palette", 4: "grayscale+alpha", 6: "RGBA"}
CONVERT_HINT = "convert it to 8-bit RGB without transparency before sending"


class PngHeaderError(ImageDecodeError):
    """Not a base64 8-bit RGB PNG, judged from its header (the server answers 422)."""


@dataclass(frozen=True)
class PngHeader:
    width: int
    height: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


def png_header_b64(data: str) -> PngHeader:
    """Width and height of a base64 PNG from its IHDR chunk; raise PngHeaderError unless 8-bit RGB."""
    try:
        head = base64.b64decode(data[:_HEADER_B64_CHARS], validate=True)
    except (binascii.Error, ValueError) as err:
        raise PngHeaderError(f"not valid base64: {err}") from None
    if not head.startswith(PNG_SIGNATURE):
        raise PngHeaderError("expected a PNG image (no PNG signature)")
    if len(head) < 33 or head[12:16] != b"IHDR":
        raise PngHeaderError("expected a PNG image (truncated, or no IHDR chunk first)")
    width, height, bit_depth, color_type = struct.unpack(">IIBB", head[16:26])
    if width == 0 or height == 0:
        raise PngHeaderError(f"invalid PNG size {width}x{height}")
    if color_type != 2 or bit_depth != 8:
        kind = COLOR_TYPES.get(color_type, f"color type {color_type}")
        raise PngHeaderError(f"expected an 8-bit RGB PNG, got {bit_depth}-bit {kind}: {CONVERT_HINT}")
    return PngHeader(width, height)


def decode_rgb_png_b64(data: str, max_pixels: int) -> np.ndarray:
    """Decode a base64 8-bit RGB PNG into an HxWx3 uint8 array (at most 7 bytes per pixel at the peak).

    Like ``shared.codec.decode_png_b64`` (same errors) without its extra ``convert`` copy: PIL's
    decoded image (4 bytes per pixel) and the array (3) are all that is ever allocated.
    """
    header = png_header_b64(data)  # PngHeaderError is an ImageDecodeError
    if header.pixels > max_pixels:
        raise ImageTooLargeError(_too_large(header, max_pixels))
    raw = b64decode_image(data)
    with png_decoding(), Image.open(io.BytesIO(raw), formats=["PNG"]) as img:
        if img.size != (header.width, header.height) or img.mode != "RGB":
            raise ImageDecodeError(f"expected an RGB image, got mode {img.mode}")
        if "transparency" in img.info:  # a tRNS chunk (before the pixels: read by open)
            raise ImageDecodeError(f"expected an opaque PNG, got a tRNS chunk: {CONVERT_HINT}")
        img.load()
        del raw
        return np.asarray(img, dtype=np.uint8)


def _too_large(header: PngHeader, max_pixels: int) -> str:
    return f"image is {header.width}x{header.height} = {header.pixels} pixels, over the limit of {max_pixels}"
