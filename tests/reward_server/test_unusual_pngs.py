"""Unusual but valid PNGs through ``POST /score`` (JSON, base64), for every reward, over real HTTP.

The contract is 8-bit RGB (docs/reward_server.md "Image formats"): every 8-bit RGB PNG is scored,
whatever its size (1xN, Nx1), interlacing (Adam7) or compression, with exactly the reward of the
same pixels encoded plainly; every other kind (16-bit, grayscale, alpha, palette, tRNS) is refused
with 422 ``invalid_image`` and a reason naming what it is. Never a 5xx.
"""

from __future__ import annotations

import io
import math

import httpx
import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from shared.codec import encode_png_b64
from shared.schemas import ErrorResponse
from tests.reward_server.fuzz_helpers import SERVED_REWARDS, b64, make_png, tiny_reward_settings
from tests.reward_server.rewards.test_aesthetic import tiny_aesthetic  # noqa: F401
from tests.reward_server.server_utils import start_reward_server_thread

RNG = np.random.default_rng(13)
RGB = RNG.integers(0, 256, (7, 5, 3), dtype=np.uint8)  # odd sizes: every Adam7 pass is partial
WIDE = RNG.integers(0, 256, (1, 64, 3), dtype=np.uint8)
TALL = RNG.integers(0, 256, (64, 1, 3), dtype=np.uint8)
DOT = RNG.integers(0, 256, (1, 1, 3), dtype=np.uint8)
GREY = RGB[..., :1]
ALPHA = RNG.integers(0, 256, (7, 5, 1), dtype=np.uint8)
PALETTE = bytes(RNG.integers(0, 256, 4 * 3, dtype=np.uint8))
INDICES = RNG.integers(0, 4, (7, 5, 1), dtype=np.uint8)


def pillow_png(image: Image.Image, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **params)
    return buffer.getvalue()


def with_text() -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "ancillary chunks are ignored")
    return info


# name -> (PNG bytes, the RGB pixels it holds)
SCORED: dict[str, tuple[bytes, np.ndarray]] = {
    "rgb-adam7": (make_png(RGB, 2, interlace=True), RGB),
    "rgb-optimized-with-text": (pillow_png(Image.fromarray(RGB), optimize=True, pnginfo=with_text()), RGB),
    "rgb-by-hand": (make_png(RGB, 2), RGB),
    "1x64": (make_png(WIDE, 2), WIDE),
    "1x64-adam7": (make_png(WIDE, 2, interlace=True), WIDE),  # passes 2, 4 and 6 are empty
    "64x1": (make_png(TALL, 2), TALL),
    "64x1-adam7": (make_png(TALL, 2, interlace=True), TALL),
    "1x1": (make_png(DOT, 2), DOT),
    "1x1-adam7": (make_png(DOT, 2, interlace=True), DOT),
}

# name -> (PNG bytes, what the reason must say)
REFUSED: dict[str, tuple[bytes, str]] = {
    "rgb16": (make_png(RGB.astype(np.uint16) * 257, 2, bit_depth=16), "16-bit RGB"),
    "rgba8": (make_png(np.concatenate([RGB, ALPHA], axis=2), 6), "8-bit RGBA"),
    "rgba16": (make_png(np.concatenate([RGB, ALPHA], axis=2).astype(np.uint16), 6, 16), "16-bit RGBA"),
    "grey8": (pillow_png(Image.fromarray(GREY[..., 0], "L")), "8-bit grayscale"),
    "grey1": (pillow_png(Image.fromarray(GREY[..., 0] > 127)), "1-bit grayscale"),
    "grey16": (make_png(GREY.astype(np.uint16) * 257, 0, bit_depth=16), "16-bit grayscale"),
    "grey8-adam7": (make_png(GREY, 0, interlace=True), "8-bit grayscale"),
    "grey-alpha8": (make_png(np.concatenate([GREY, ALPHA], axis=2), 4), "8-bit grayscale+alpha"),
    "grey-alpha16": (
        make_png(np.concatenate([GREY, ALPHA], axis=2).astype(np.uint16), 4, 16),
        "16-bit grayscale+alpha",
    ),
    "palette": (make_png(INDICES, 3, chunks=[(b"PLTE", PALETTE)]), "8-bit palette"),
    "palette-trns": (
        make_png(INDICES, 3, chunks=[(b"PLTE", PALETTE), (b"tRNS", bytes([0, 128]))]),
        "8-bit palette",
    ),
    "palette-pillow-4bit": (pillow_png(Image.fromarray(RGB).quantize(4), bits=4), "palette"),
    "rgb-trns": (make_png(RGB, 2, chunks=[(b"tRNS", b"\x00\x01\x00\x02\x00\x03")]), "tRNS"),
}


@pytest.fixture(scope="module")
def base_url(tiny_aesthetic):  # noqa: F811
    folder, _state = tiny_aesthetic
    running = start_reward_server_thread(tiny_reward_settings(folder))
    yield running.base_url
    running.stop()


def post(base_url: str, reward: str, image_b64: str, request_id: str) -> httpx.Response:
    body = {"request_id": request_id, "reward": reward, "images": [image_b64], "prompts": ["a photo"]}
    return httpx.post(base_url + "/score", json=body, timeout=60)


def test_the_hand_encoder_writes_what_pillow_reads():
    """The test's own Adam7/16-bit encoder is right: Pillow decodes its files to the same pixels."""
    for name, (data, pixels) in SCORED.items():
        with Image.open(io.BytesIO(data)) as img:
            assert img.mode == "RGB" and np.array_equal(np.asarray(img), pixels), name
            assert img.info.get("interlace", 0) == int("adam7" in name), name
    with Image.open(io.BytesIO(REFUSED["grey16"][0])) as img:
        assert np.array_equal(np.asarray(img), GREY[..., 0].astype(np.uint16) * 257)


@pytest.mark.parametrize("reward", SERVED_REWARDS)
def test_every_8bit_rgb_png_is_scored_like_its_plain_encoding(base_url, reward):
    reference: dict[bytes, float] = {}
    for name, (data, pixels) in SCORED.items():
        response = post(base_url, reward, b64(data), f"{reward}-{name}")
        assert response.status_code == 200, (name, response.text)
        (value,) = response.json()["rewards"]
        assert math.isfinite(value), name
        key = pixels.tobytes() + bytes(pixels.shape)
        if key not in reference:
            plain = post(base_url, reward, encode_png_b64(pixels), f"{reward}-{name}-plain")
            assert plain.status_code == 200, (name, plain.text)
            reference[key] = plain.json()["rewards"][0]
        assert value == reference[key], (name, value, reference[key])


@pytest.mark.parametrize("reward", SERVED_REWARDS)
def test_every_other_png_kind_is_refused_with_its_name(base_url, reward):
    for name, (data, said) in REFUSED.items():
        response = post(base_url, reward, b64(data), f"{reward}-{name}")
        assert response.status_code == 422, (name, response.status_code, response.text)
        error = ErrorResponse.model_validate(response.json())
        assert error.error == "invalid_image", (name, error)
        assert said in error.reason and "images[0]" in error.reason and "8-bit RGB" in error.reason, (
            name,
            error.reason,
        )
