"""The wire image codec: lossless round trip, and every way an image is refused."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from shared.codec import ImageDecodeError, ImageTooLargeError, decode_png_b64, encode_png_b64


@settings(max_examples=40, deadline=None)
@given(arrays(np.uint8, st.tuples(st.integers(1, 20), st.integers(1, 20), st.just(3))))
def test_round_trip_is_lossless(image):
    assert np.array_equal(decode_png_b64(encode_png_b64(image)), image)


def test_encode_rejects_non_rgb_uint8():
    with pytest.raises(ValueError):
        encode_png_b64(np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError):
        encode_png_b64(np.zeros((4, 4, 3), np.float32))


def b64(img: Image.Image, fmt: str) -> str:
    buffer = io.BytesIO()
    img.save(buffer, fmt)
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ("%%%", "base64"),
        (base64.b64encode(b"not an image").decode(), "decodable"),
        (b64(Image.new("RGB", (4, 4)), "JPEG"), "PNG"),
        (b64(Image.new("L", (4, 4)), "PNG"), "RGB"),
        (b64(Image.new("RGBA", (4, 4)), "PNG"), "RGB"),
    ],
)
def test_refused_images(data, match):
    with pytest.raises(ImageDecodeError, match=match):
        decode_png_b64(data)


def test_pixel_limit_is_its_own_error():
    data = encode_png_b64(np.zeros((10, 11, 3), np.uint8))
    with pytest.raises(ImageTooLargeError, match="110 pixels"):
        decode_png_b64(data, max_pixels=109)
    assert decode_png_b64(data, max_pixels=110).shape == (10, 11, 3)


def test_truncated_png_is_refused():
    raw = base64.b64decode(encode_png_b64(np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8)))
    with pytest.raises(ImageDecodeError):
        decode_png_b64(base64.b64encode(raw[: len(raw) // 2]).decode())
