"""The binary wire format of a score request: one safetensors file holding the raw uint8 images.

``POST /score`` with ``Content-Type: application/x-safetensors``, and the ``request`` field of a
Redis job entry, carry exactly this (docs/transport.md argues the choice):

    8 bytes   header length L, unsigned little-endian
    L bytes   JSON header (UTF-8, padded with spaces to a multiple of 8):
                {"__metadata__": {"format": "ddpo.score.v1", "request_id": "...", "reward": "...",
                                  "prompts": "<JSON list of str>", "metadata": "<JSON list of objects>"},
                 "images": {"dtype": "U8", "shape": [N, H, W, 3], "data_offsets": [0, N*H*W*3]}}
    N*H*W*3   the images, C order (row-major), RGB

It is a valid safetensors file (https://github.com/huggingface/safetensors, "Format"): any
safetensors writer produces it (``safetensors.numpy.save({"images": a}, metadata={...})``) and any
reader reads it; tests/shared/test_binary.py checks both directions against the library. This
module reads and writes it with numpy and json alone because the reader has two jobs the library's
Python API does not do: check the header against the server's limits before a byte of pixels is
read or allocated (``parse_header``, fed the first 8 + L bytes of a streamed body), and hand the
pixels to the scorers as a view of the received body, without a copy (``decode``).

Errors: ``MalformedBodyError`` (not a well-formed safetensors body, or its sizes disagree: the
server answers 400), ``InvalidContentError`` (well-formed but not a valid score request: 422),
``LimitError`` (over a limit: 413). Each names what is wrong.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import ValidationError

from shared.schemas import ScoreFields
from shared.validation import format_validation_error

MEDIA_TYPE = "application/x-safetensors"
FORMAT = "ddpo.score.v1"
TENSOR = "images"
PREFIX_BYTES = 8  # the header length
# Largest JSON header accepted (prompts and per-image metadata live there): a bound on what is
# parsed before the limits are known to hold; the safetensors library's own bound is 100 MB.
MAX_HEADER_BYTES = 16 * 1024 * 1024
SAFETENSORS_DTYPES = frozenset(
    {"BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64",
     "I64", "U64"}
)  # fmt: skip


class BinaryRequestError(ValueError):
    """A binary score request the server refuses; ``status`` and ``error`` are the HTTP answer."""

    status = 400
    error = "malformed_body"


class MalformedBodyError(BinaryRequestError):
    """Not a well-formed safetensors body, or its header disagrees with its length (400)."""


class InvalidContentError(BinaryRequestError):
    """A well-formed body that is not a valid score request: wrong dtype, shape, fields (422)."""

    status = 422
    error = "invalid_request"


class InvalidImagesError(InvalidContentError):
    """The images tensor is not N x H x W x 3 uint8 (422)."""

    error = "invalid_image"


class LimitError(BinaryRequestError):
    """Well-formed, but over one of the server's limits (413); ``error`` names which."""

    status = 413

    def __init__(self, error: str, reason: str):
        super().__init__(reason)
        self.error = error


@dataclass(frozen=True)
class Limits:
    """What the receiver accepts; checked from the header alone, before any pixel is read."""

    max_images: int
    max_image_pixels: int
    max_body_bytes: int
    max_header_bytes: int = MAX_HEADER_BYTES


@dataclass(frozen=True)
class Header:
    """A checked header: the images' shape and where everything lies in the body."""

    header_bytes: int  # L
    shape: tuple[int, int, int, int]  # N, H, W, 3
    metadata: dict[str, str]

    @property
    def data_start(self) -> int:
        return PREFIX_BYTES + self.header_bytes

    @property
    def data_bytes(self) -> int:
        n, h, w, c = self.shape
        return n * h * w * c

    @property
    def total_bytes(self) -> int:
        """The exact length of the whole body this header describes."""
        return self.data_start + self.data_bytes

    @property
    def pixels(self) -> int:
        n, h, w, _ = self.shape
        return n * h * w


@dataclass
class BinaryScoreRequest:
    """A decoded binary request: the JSON fields, and the images as a view of the body (no copy)."""

    fields: ScoreFields
    images: np.ndarray  # N x H x W x 3 uint8
    body_bytes: int = 0  # the whole body's length

    @property
    def request_id(self) -> str:
        return self.fields.request_id

    @property
    def reward(self) -> str:
        return self.fields.reward

    @property
    def prompts(self) -> list[str]:
        return self.fields.prompts

    @property
    def metadata(self) -> list[dict[str, Any]] | None:
        return self.fields.metadata


# --- writing --------------------------------------------------------------------------------------


def encode(
    request_id: str,
    reward: str,
    images: np.ndarray,
    prompts: Sequence[str],
    metadata: Sequence[dict[str, Any]] | None = None,
) -> bytes:
    """The binary body of a score request (one copy of the pixels, into the returned bytes)."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected (N,H,W,3) uint8 images, got shape {images.shape} dtype {images.dtype}")
    fields = {
        "format": FORMAT,
        "request_id": request_id,
        "reward": reward,
        "prompts": json.dumps(list(prompts)),
    }
    if metadata is not None:
        fields["metadata"] = json.dumps(list(metadata))
    size = images.size
    header = json.dumps(
        {
            "__metadata__": fields,
            TENSOR: {"dtype": "U8", "shape": list(images.shape), "data_offsets": [0, size]},
        },
        separators=(",", ":"),
    ).encode()
    header += b" " * (-len(header) % 8)  # the library's alignment: data starts at a multiple of 8
    return b"".join((struct.pack("<Q", len(header)), header, np.ascontiguousarray(images).data))


# --- reading --------------------------------------------------------------------------------------


def header_length(prefix: bytes | bytearray | memoryview, limits: Limits) -> int:
    """L, from the first 8 bytes; refuses a header over ``max_header_bytes`` or past the body limit."""
    if len(prefix) < PREFIX_BYTES:
        raise MalformedBodyError(
            f"body of {len(prefix)} bytes is too short for a safetensors header (8-byte length first)"
        )
    (length,) = struct.unpack("<Q", bytes(prefix[:PREFIX_BYTES]))
    if length < 2:
        raise MalformedBodyError(f"header length {length} is too small for a JSON object")
    if length > limits.max_header_bytes:
        raise MalformedBodyError(
            f"header length {length} is over the limit of {limits.max_header_bytes} bytes "
            "(is the body safetensors?)"
        )
    if PREFIX_BYTES + length > limits.max_body_bytes:
        raise LimitError(
            "body_too_large",
            f"a header of {length} bytes makes the body over the limit of {limits.max_body_bytes} bytes",
        )
    return length


def parse_header(data: bytes | bytearray | memoryview, limits: Limits) -> Header:
    """Check the first 8 + L bytes of a body: structure (400), content (422), limits (413).

    Nothing here depends on the pixels, so a streamed body can be refused before they are read.
    """
    length = header_length(data, limits)
    raw = bytes(data[PREFIX_BYTES : PREFIX_BYTES + length])
    if len(raw) < length:
        raise MalformedBodyError(
            f"body of {len(data)} bytes ends inside its {length}-byte header (truncated)"
        )
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise MalformedBodyError(f"header is not UTF-8 JSON: {str(err)[:200]}") from None
    if not isinstance(header, dict):
        raise MalformedBodyError(f"header is a JSON {type(header).__name__}, expected an object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise MalformedBodyError("__metadata__ must be an object of strings to strings")
    names = sorted(header)
    if names != [TENSOR]:
        raise InvalidContentError(
            f"expected exactly one tensor named {TENSOR!r}, got {', '.join(map(repr, names[:5])) or 'none'}"
        )
    info = header[TENSOR]
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise MalformedBodyError(f"{TENSOR}: expected the keys dtype, shape and data_offsets")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in SAFETENSORS_DTYPES:
        raise MalformedBodyError(f"{TENSOR}: {str(dtype)[:20]!r} is not a safetensors dtype")
    if dtype != "U8":
        raise InvalidImagesError(f"{TENSOR}: dtype {dtype}, expected U8 (uint8 RGB)")
    if not isinstance(shape, list) or not all(type(d) is int for d in shape):
        raise MalformedBodyError(f"{TENSOR}: shape must be a list of integers")
    if len(shape) != 4 or shape[3] != 3 or min(shape) < 1:
        raise InvalidImagesError(
            f"{TENSOR}: shape {str(shape)[:100]}, expected [N, H, W, 3] with N, H, W >= 1 "
            "(N RGB images of H x W pixels)"
        )
    n, h, w, _ = shape
    if n > limits.max_images:
        raise LimitError("too_many_images", f"{n} images in one request; limit {limits.max_images}")
    if h * w > limits.max_image_pixels:
        raise LimitError(
            "image_too_large",
            f"images are {w}x{h} = {h * w} pixels, over the limit of {limits.max_image_pixels}",
        )
    checked = Header(length, (n, h, w, 3), metadata)
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
        or offsets != [0, checked.data_bytes]
    ):
        raise MalformedBodyError(
            f"{TENSOR}: data_offsets {str(offsets)[:100]} disagree with shape {shape} of uint8, "
            f"which needs [0, {checked.data_bytes}]"
        )
    if checked.total_bytes > limits.max_body_bytes:
        raise LimitError(
            "body_too_large",
            f"the header describes a body of {checked.total_bytes} bytes, over the limit of "
            f"{limits.max_body_bytes}",
        )
    return checked


def check_length(header: Header, length: int, what: str = "body") -> None:
    """The body must be exactly as long as its header says (400 naming both lengths)."""
    if length != header.total_bytes:
        kind = "truncated" if length < header.total_bytes else "longer than its header says"
        raise MalformedBodyError(
            f"{what} is {length} bytes but its header describes {header.total_bytes} "
            f"({header.data_start} of header + {header.data_bytes} of {list(header.shape)} uint8): {kind}"
        )


def request_fields(header: Header) -> ScoreFields:
    """The request's JSON fields from the header's ``__metadata__`` (422 naming the field)."""
    meta = header.metadata
    if meta.get("format", FORMAT) != FORMAT:
        raise InvalidContentError(f"__metadata__.format {meta['format'][:40]!r}, expected {FORMAT!r}")
    unknown = sorted(set(meta) - {"format", "request_id", "reward", "prompts", "metadata"})
    if unknown:
        raise InvalidContentError(
            f"__metadata__: unknown keys {', '.join(repr(k[:40]) for k in unknown[:5])}"
        )
    values: dict[str, Any] = {}
    for key in ("request_id", "reward"):
        if key in meta:
            values[key] = meta[key]
    for key in ("prompts", "metadata"):
        if key in meta:
            try:
                values[key] = json.loads(meta[key])
            except ValueError as err:
                raise InvalidContentError(f"__metadata__.{key} is not JSON: {str(err)[:200]}") from None
    try:
        fields = ScoreFields.model_validate(values)
    except ValidationError as err:
        raise InvalidContentError("__metadata__." + format_validation_error(err, root="request")) from None
    n = header.shape[0]
    if len(fields.prompts) != n:
        raise InvalidContentError(f"{len(fields.prompts)} prompts for {n} images")
    if fields.metadata is not None and len(fields.metadata) != n:
        raise InvalidContentError(
            f"metadata must have one entry per image, got {len(fields.metadata)} for {n}"
        )
    return fields


def decode(
    body: bytes | bytearray | memoryview | np.ndarray,
    limits: Limits,
    header: Header | None = None,
    fields: ScoreFields | None = None,
) -> BinaryScoreRequest:
    """A whole body -> request; the images are a view of ``body`` (no copy of the pixels).

    ``header``, ``fields``: what ``parse_header`` and ``request_fields`` gave, if the caller already
    checked them (while streaming the body, before its pixels arrived).
    """
    view = memoryview(body.reshape(-1)) if isinstance(body, np.ndarray) else memoryview(body).cast("B")
    if header is None:
        header = parse_header(view[: PREFIX_BYTES + header_length(view, limits)], limits)
    check_length(header, len(view))
    if fields is None:
        fields = request_fields(header)
    images = np.frombuffer(view, dtype=np.uint8, count=header.data_bytes, offset=header.data_start)
    return BinaryScoreRequest(fields, images.reshape(header.shape), len(view))
