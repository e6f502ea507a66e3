"""The binary wire format (shared/binary.py): lossless, a real safetensors file both ways, and every
malformed body refused with the right status and a reason that names what is wrong."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import safetensors.numpy
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from safetensors import safe_open

from shared import binary
from shared.binary import InvalidContentError, InvalidImagesError, LimitError, MalformedBodyError

LIMITS = binary.Limits(max_images=16, max_image_pixels=64 * 64, max_body_bytes=1 << 20)
PROMPTS = ["a cat", "a dog"]


def images(n: int = 2, h: int = 8, w: int = 6, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def raw_body(header: dict, data: bytes, pad: bool = True) -> bytes:
    text = json.dumps(header).encode()
    if pad:
        text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def header_of(n: int = 2, h: int = 8, w: int = 6, dtype: str = "U8", **meta: str) -> dict:
    fields = {"request_id": "r1", "reward": "jpeg_compressibility", "prompts": json.dumps(["p"] * n), **meta}
    return {
        "__metadata__": fields,
        "images": {"dtype": dtype, "shape": [n, h, w, 3], "data_offsets": [0, n * h * w * 3]},
    }


@settings(max_examples=30, deadline=None)
@given(arrays(np.uint8, st.tuples(st.integers(1, 4), st.integers(1, 12), st.integers(1, 12), st.just(3))))
def test_round_trip_is_lossless_and_a_view(array):
    prompts = [f"p{i}" for i in range(len(array))]
    meta = [{"questions": ["q?"], "i": i} for i in range(len(array))]
    body = bytearray(binary.encode("rid", "jpeg_compressibility", array, prompts, meta))
    request = binary.decode(body, LIMITS)
    assert np.array_equal(request.images, array)
    assert (request.request_id, request.reward, request.prompts, request.metadata) == (
        "rid",
        "jpeg_compressibility",
        prompts,
        meta,
    )
    assert np.shares_memory(request.images, np.frombuffer(body, np.uint8))  # no copy of the pixels


def test_our_body_is_a_safetensors_file(tmp_path):
    array = images(3, 10, 7)
    body = binary.encode("rid", "jpeg_compressibility", array, ["a", "b", "c"], [{"k": 1}, {}, {}])
    assert np.array_equal(safetensors.numpy.load(body)["images"], array)
    path = tmp_path / "request.safetensors"
    path.write_bytes(body)
    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata()
    assert meta["request_id"] == "rid" and json.loads(meta["prompts"]) == ["a", "b", "c"]
    assert json.loads(meta["metadata"]) == [{"k": 1}, {}, {}]


def test_a_body_written_by_the_safetensors_library_is_read():
    array = images(2, 5, 9)
    meta = {"request_id": "lib", "reward": "jpeg_compressibility", "prompts": json.dumps(PROMPTS)}
    body = safetensors.numpy.save({"images": array}, metadata=meta)
    request = binary.decode(body, LIMITS)
    assert np.array_equal(request.images, array) and request.prompts == PROMPTS
    assert request.metadata is None


def test_header_is_checked_from_its_own_bytes():
    """A streamed body is judged from its first 8 + L bytes, before the pixels arrive."""
    body = binary.encode("rid", "jpeg_compressibility", images(), PROMPTS)
    length = binary.header_length(body[:8], LIMITS)
    header = binary.parse_header(body[: 8 + length], LIMITS)
    assert header.shape == (2, 8, 6, 3) and header.total_bytes == len(body)


def wrong_length(body: bytes) -> None:
    binary.check_length(binary.parse_header(body, LIMITS), len(body))


CASES = {
    # name: (body, error class, error code, words the reason must contain)
    "empty": (b"", MalformedBodyError, "malformed_body", "too short"),
    "header length beyond the limit": (
        struct.pack("<Q", 1 << 40) + b"{}",
        MalformedBodyError,
        "malformed_body",
        "over the limit",
    ),
    "header cut short": (
        struct.pack("<Q", 500) + b'{"images": ',
        MalformedBodyError,
        "malformed_body",
        "truncated",
    ),
    "header not JSON": (
        struct.pack("<Q", 8) + b"not json",
        MalformedBodyError,
        "malformed_body",
        "not UTF-8 JSON",
    ),
    "header a list": (raw_body([], b""), MalformedBodyError, "malformed_body", "expected an object"),  # type: ignore[arg-type]
    "metadata not strings": (
        raw_body({"__metadata__": {"prompts": ["a"]}, "images": header_of()["images"]}, bytes(288)),
        MalformedBodyError,
        "malformed_body",
        "strings to strings",
    ),
    "float32 images": (
        raw_body(header_of(dtype="F32"), bytes(288 * 4)),
        InvalidImagesError,
        "invalid_image",
        "dtype F32, expected U8",
    ),
    "not a dtype": (
        raw_body(header_of(dtype="uint8"), bytes(288)),
        MalformedBodyError,
        "malformed_body",
        "not a safetensors dtype",
    ),
    "negative shape": (
        raw_body(
            {**header_of(), "images": {"dtype": "U8", "shape": [-2, 8, 6, 3], "data_offsets": [0, 0]}}, b""
        ),
        InvalidImagesError,
        "invalid_image",
        "shape [-2, 8, 6, 3]",
    ),
    "grayscale shape": (
        raw_body(
            {**header_of(), "images": {"dtype": "U8", "shape": [2, 8, 6], "data_offsets": [0, 96]}}, bytes(96)
        ),
        InvalidImagesError,
        "invalid_image",
        "expected [N, H, W, 3]",
    ),
    "float shape": (
        raw_body(
            {**header_of(), "images": {"dtype": "U8", "shape": [2.0, 8, 6, 3], "data_offsets": [0, 288]}},
            bytes(288),
        ),
        MalformedBodyError,
        "malformed_body",
        "list of integers",
    ),
    "too many images": (raw_body(header_of(n=17), b""), LimitError, "too_many_images", "17 images"),
    "huge images": (
        raw_body(header_of(n=1, h=1 << 31, w=1 << 31), b""),
        LimitError,
        "image_too_large",
        "over the limit of 4096",
    ),
    "offsets disagree with the shape": (
        raw_body(
            {**header_of(), "images": {"dtype": "U8", "shape": [2, 8, 6, 3], "data_offsets": [0, 100]}},
            bytes(100),
        ),
        MalformedBodyError,
        "malformed_body",
        "needs [0, 288]",
    ),
    "two tensors": (
        raw_body(
            {**header_of(), "extra": {"dtype": "U8", "shape": [1], "data_offsets": [288, 289]}}, bytes(289)
        ),
        InvalidContentError,
        "invalid_request",
        "exactly one tensor",
    ),
    "truncated pixels": (
        raw_body(header_of(), bytes(287)),
        MalformedBodyError,
        "malformed_body",
        "truncated",
    ),
    "longer than its header": (
        raw_body(header_of(), bytes(300)),
        MalformedBodyError,
        "malformed_body",
        "longer than its header says",
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_malformed_bodies_are_refused_naming_what_is_wrong(case):
    body, kind, code, words = CASES[case]
    with pytest.raises(kind, match=None) as info:
        binary.decode(body, LIMITS)
    assert type(info.value) is kind, info.value
    assert info.value.error == code
    assert words in str(info.value), str(info.value)
    assert info.value.status == {"malformed_body": 400, "invalid_request": 422, "invalid_image": 422}.get(
        code, 413
    )


@pytest.mark.parametrize(
    ("meta", "words"),
    [
        ({"prompts": json.dumps(["only one"])}, "1 prompts for 2 images"),
        ({"prompts": "[not json"}, "__metadata__.prompts is not JSON"),
        ({"request_id": ""}, "request_id"),
        ({"metadata": json.dumps([{}])}, "one entry per image"),
        ({"metadata": json.dumps(["x", "y"])}, "metadata"),
        ({"format": "ddpo.score.v9"}, "expected 'ddpo.score.v1'"),
        ({"surprise": "x"}, "unknown keys 'surprise'"),
    ],
)
def test_wrong_request_fields_are_422(meta, words):
    body = raw_body(header_of(**meta), bytes(288))
    with pytest.raises(InvalidContentError) as info:
        binary.decode(body, LIMITS)
    assert info.value.status == 422 and words in str(info.value), str(info.value)


def test_missing_fields_are_named():
    header = header_of()
    del header["__metadata__"]["reward"]
    with pytest.raises(InvalidContentError, match="reward: Field required"):
        binary.decode(raw_body(header, bytes(288)), LIMITS)


def test_a_body_over_the_byte_limit_is_413_from_its_header():
    small = binary.Limits(max_images=16, max_image_pixels=64 * 64, max_body_bytes=500)
    with pytest.raises(LimitError, match="over the limit of 500") as info:
        binary.parse_header(raw_body(header_of(h=16, w=16), b""), small)  # pixels not needed to know
    assert info.value.error == "body_too_large"


def test_encode_refuses_what_is_not_rgb_uint8():
    with pytest.raises(ValueError, match="uint8"):
        binary.encode("r", "x", np.zeros((1, 4, 4, 3), np.float32), ["p"])
    with pytest.raises(ValueError, match="N,H,W,3"):
        binary.encode("r", "x", np.zeros((4, 4, 3), np.uint8), ["p"])
