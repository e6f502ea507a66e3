"""POST /score with the binary codec (Content-Type: application/x-safetensors) over real HTTP:
the same rewards as JSON, limits checked from the header before the pixels are read, every bad body
a 4xx naming what is wrong, and the server healthy afterwards."""

from __future__ import annotations

import json
import socket
import struct
import time

import httpx
import numpy as np
import pytest

from shared import binary
from shared.codec import encode_png_b64
from shared.schemas import ErrorResponse
from tests.reward_server.server_utils import start_reward_server_thread

TIMEOUT = 30
BINARY = {"content-type": binary.MEDIA_TYPE}
MAX_BODY = 1_000_000


def images(n: int = 3, h: int = 24, w: int = 40, seed: int = 0) -> np.ndarray:
    # Smooth gradients + noise: JPEG sizes that differ per image.
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    out = [
        (x * rng.uniform(1, 6) + y * rng.uniform(1, 6))[..., None] + rng.normal(0, 20, (h, w, 3))
        for _ in range(n)
    ]
    return np.clip(np.stack(out), 0, 255).astype(np.uint8)


def prompts(n: int) -> list[str]:
    return [f"prompt {i}" for i in range(n)]


def binary_body(
    array: np.ndarray, rid: str | None = None, reward: str = "jpeg_compressibility", **kw
) -> bytes:
    return binary.encode(rid or f"bin-{time.monotonic_ns()}", reward, array, prompts(len(array)), **kw)


def json_body(array: np.ndarray, rid: str | None = None, reward: str = "jpeg_compressibility") -> dict:
    return {
        "request_id": rid or f"json-{time.monotonic_ns()}",
        "reward": reward,
        "images": [encode_png_b64(i) for i in array],
        "prompts": prompts(len(array)),
    }


def expect_error(response: httpx.Response, status: int, error: str, *words: str) -> ErrorResponse:
    assert response.status_code == status, response.text
    parsed = ErrorResponse.model_validate(response.json())
    assert parsed.error == error, parsed
    for word in words:
        assert word in parsed.reason, parsed.reason
    return parsed


@pytest.fixture(scope="module")
def server():
    running = start_reward_server_thread(
        {
            "rewards": ["jpeg_compressibility", "jpeg_incompressibility"],
            "max_body_bytes": MAX_BODY,
            "max_images_per_request": 8,
            "max_image_pixels": 64 * 64,
            "max_inflight_bytes": 2**20,  # the smallest budget: 2 x a 600 kB body is over it
            "max_wait_ms": 2,
        }
    )
    yield running
    running.stop()


def inflight_bytes(running) -> int:
    return running.app.state.service.budget.used


def assert_healthy(running) -> None:
    """/healthz answers at once, a good binary request scores, and no memory stays reserved."""
    started = time.perf_counter()
    assert httpx.get(running.base_url + "/healthz", timeout=TIMEOUT).status_code == 200
    assert time.perf_counter() - started < 1.0
    good = httpx.post(
        running.base_url + "/score", content=binary_body(images(2)), headers=BINARY, timeout=TIMEOUT
    )
    assert good.status_code == 200, good.text
    assert inflight_bytes(running) == 0


# --- both codecs ----------------------------------------------------------------------------------


def test_openapi_declares_both_codecs(server):
    spec = httpx.get(server.base_url + "/openapi.json").json()
    content = spec["paths"]["/score"]["post"]["requestBody"]["content"]
    assert "request_id" in content["application/json"]["schema"]["properties"]
    assert content[binary.MEDIA_TYPE]["schema"]["format"] == "binary"
    assert "safetensors" in content[binary.MEDIA_TYPE]["schema"]["description"]


@pytest.mark.parametrize("reward", ["jpeg_compressibility", "jpeg_incompressibility"])
def test_binary_and_json_give_identical_rewards(server, reward):
    for seed, (n, h, w) in enumerate([(1, 8, 8), (3, 24, 40), (5, 64, 64)]):
        array = images(n, h, w, seed)
        by_json = httpx.post(
            server.base_url + "/score", json=json_body(array, reward=reward), timeout=TIMEOUT
        )
        by_binary = httpx.post(
            server.base_url + "/score",
            content=binary_body(array, reward=reward),
            headers=BINARY,
            timeout=TIMEOUT,
        )
        assert by_json.status_code == by_binary.status_code == 200, (by_json.text, by_binary.text)
        assert by_binary.json()["rewards"] == by_json.json()["rewards"]
        assert by_binary.json()["details"] == by_json.json()["details"]
        assert len(set(by_json.json()["rewards"])) == n  # distinct images, distinct rewards


def test_binary_metadata_and_chunked_upload(server):
    array = images(2)
    body = binary_body(array, rid="chunky", metadata=[{"a": 1}, {"b": [2]}])

    def chunks():
        for i in range(0, len(body), 1000):
            yield body[i : i + 1000]

    response = httpx.post(server.base_url + "/score", content=chunks(), headers=BINARY, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    reference = httpx.post(server.base_url + "/score", json=json_body(array), timeout=TIMEOUT)
    assert response.json()["rewards"] == reference.json()["rewards"]
    truncated = body[:-10]
    response = httpx.post(
        server.base_url + "/score", content=iter([truncated[:500], truncated[500:]]), headers=BINARY
    )
    expect_error(response, 400, "malformed_body", "truncated")
    assert_healthy(server)


def test_binary_retry_is_replayed_and_other_pixels_are_a_conflict(server):
    array = images(2)
    first = httpx.post(server.base_url + "/score", content=binary_body(array, rid="same"), headers=BINARY)
    again = httpx.post(server.base_url + "/score", content=binary_body(array, rid="same"), headers=BINARY)
    assert first.status_code == again.status_code == 200
    assert again.headers.get("idempotent-replay") == "true" and again.json() == first.json()
    for where in [(0, 0, 0, 0), (1, 5, 7, 2), (-1, -1, -1, -1)]:  # first, some and last byte of the pixels
        changed = array.copy()
        changed[where] ^= 1  # one bit
        other = httpx.post(
            server.base_url + "/score", content=binary_body(changed, rid="same"), headers=BINARY
        )
        expect_error(other, 409, "request_id_conflict")
    as_json = httpx.post(server.base_url + "/score", json=json_body(array, rid="same"))
    expect_error(as_json, 409, "request_id_conflict")  # codecs fingerprint differently: the safe side


def test_unknown_reward_and_wrong_content_type(server):
    expect_error(
        httpx.post(server.base_url + "/score", content=binary_body(images(1), reward="nope"), headers=BINARY),
        400,
        "unknown_reward",
        "jpeg_compressibility",
    )
    # A binary body sent as JSON, and JSON sent as binary: refused, named.
    as_json = httpx.post(
        server.base_url + "/score",
        content=binary_body(images(1)),
        headers={"content-type": "application/json"},
    )
    expect_error(as_json, 422, "invalid_request")
    as_binary = httpx.post(
        server.base_url + "/score", content=json.dumps(json_body(images(1))), headers=BINARY
    )
    expect_error(as_binary, 400, "malformed_body", "header length")
    assert_healthy(server)


# --- bad bodies -----------------------------------------------------------------------------------


def raw_header(shape, dtype="U8", offsets=None, n_prompts=None) -> bytes:
    n = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else 1
    size = int(np.prod(shape)) if all(isinstance(d, int) and d >= 0 for d in shape) else 0
    header = {
        "__metadata__": {
            "request_id": f"bad-{time.monotonic_ns()}",
            "reward": "jpeg_compressibility",
            "prompts": json.dumps(["p"] * (n_prompts if n_prompts is not None else n)),
        },
        "images": {"dtype": dtype, "shape": list(shape), "data_offsets": offsets or [0, size]},
    }
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


BAD_BODIES = {
    # name: (body, status, error, words in the reason)
    "header disagrees with the length": (
        raw_header([2, 8, 8, 3]) + bytes(2 * 8 * 8 * 3 + 50),
        400,
        "malformed_body",
        "longer than its header says",
    ),
    "truncated body": (raw_header([2, 8, 8, 3]) + bytes(100), 400, "malformed_body", "truncated"),
    "cut inside the header": (raw_header([2, 8, 8, 3])[:40], 400, "malformed_body", "truncated"),
    "negative shape": (raw_header([-1, 8, 8, 3], offsets=[0, 0]), 422, "invalid_image", "[-1, 8, 8, 3]"),
    "huge shape": (raw_header([1, 2**40, 2**40, 3]), 413, "image_too_large", "over the limit of 4096"),
    "too many images": (raw_header([9, 8, 8, 3]) + bytes(9 * 192), 413, "too_many_images", "limit 8"),
    "float32": (raw_header([1, 8, 8, 3], dtype="F32") + bytes(768), 422, "invalid_image", "dtype F32"),
    "int64": (raw_header([1, 8, 8, 3], dtype="I64") + bytes(1536), 422, "invalid_image", "dtype I64"),
    "offsets lie": (
        raw_header([1, 8, 8, 3], offsets=[0, 10]) + bytes(10),
        400,
        "malformed_body",
        "data_offsets",
    ),
    "prompt count": (raw_header([2, 8, 8, 3], n_prompts=3) + bytes(384), 422, "invalid_request", "3 prompts"),
    "header length absurd": (struct.pack("<Q", 2**63) + b"{}", 400, "malformed_body", "header length"),
    "not safetensors": (b"\x89PNG\r\n\x1a\n" + bytes(100), 400, "malformed_body", "header length"),
}


@pytest.mark.parametrize("case", BAD_BODIES)
def test_bad_binary_bodies_are_4xx_with_the_reason_and_the_server_stays_healthy(server, case):
    body, status, error, words = BAD_BODIES[case]
    response = httpx.post(server.base_url + "/score", content=body, headers=BINARY, timeout=TIMEOUT)
    expect_error(response, status, error, words)
    assert_healthy(server)


def test_a_body_over_the_memory_budget_is_413_before_it_is_read(server):
    # 2 x 600 kB is over the 1 MiB budget: refused from Content-Length, nothing read or allocated.
    response = httpx.post(server.base_url + "/score", content=bytes(600_000), headers=BINARY, timeout=TIMEOUT)
    expect_error(response, 413, "over_memory_budget", "max_inflight_bytes")
    assert_healthy(server)


# --- limits from the header, before the pixels ----------------------------------------------------


def post_header_only(base_url: str, header: bytes, content_length: int) -> tuple[int, dict]:
    """Send the HTTP request line, headers and only the binary header; read the answer."""
    host, port = base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            (
                f"POST /score HTTP/1.1\r\nHost: {host}\r\nContent-Type: {binary.MEDIA_TYPE}\r\n"
                f"Content-Length: {content_length}\r\n\r\n"
            ).encode()
            + header
        )
        data = b""
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(payload[payload.index(b"{") :])


@pytest.mark.parametrize(
    ("shape", "length_delta", "status", "error"),
    [
        ([9, 64, 64, 3], 0, 413, "too_many_images"),  # 9 images, limit 8
        ([1, 128, 128, 3], 0, 413, "image_too_large"),
        ([2, 64, 64, 3], -1, 400, "malformed_body"),  # Content-Length one byte short of the header's size
        ([2, 64, 64, 3], +7, 400, "malformed_body"),
    ],
)
def test_limits_are_checked_from_the_header_before_the_pixels_arrive(
    server, shape, length_delta, status, error
):
    header = raw_header(shape)
    total = len(header) + int(np.prod(shape)) + length_delta
    code, answer = post_header_only(server.base_url, header, min(total, MAX_BODY))
    assert (code, answer["error"]) == (status, error), answer
    assert_healthy(server)
