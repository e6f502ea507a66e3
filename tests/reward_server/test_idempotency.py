"""request_id replays never hand out a stale reward: the fingerprint covers every byte of the request.

Adversarial PNG encodings (fuzzed): two different images of the same size and encoded length,
followed by the same ancillary chunk before IEND, share their length and their last hundreds of
base64 characters; a reused request_id with the second must be refused (409), never answered
with the first one's reward.
"""

from __future__ import annotations

import base64
import io
import uuid

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from reward_server.idempotency import fingerprint
from shared.schemas import ScoreRequest
from tests.reward_server.fuzz_helpers import chunk
from tests.reward_server.server_utils import start_reward_server_thread

IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(
        buffer, "PNG", compress_level=0
    )  # stored blocks: length depends on size only
    return buffer.getvalue()


def with_chunk(data: bytes, extra: bytes, where: str) -> bytes:
    """Insert a chunk before IEND, or right after IHDR (byte 33)."""
    assert data.endswith(IEND)
    if where == "before_iend":
        return data[: -len(IEND)] + extra + IEND
    return data[:33] + extra + data[33:]


@pytest.fixture(scope="module")
def server():
    running = start_reward_server_thread({"rewards": ["jpeg_compressibility"], "max_wait_ms": 0})
    with httpx.Client(base_url=running.base_url, timeout=30) as http:
        yield http
    running.stop()


def post(http: httpx.Client, rid: str, image: bytes) -> httpx.Response:
    body = {
        "request_id": rid,
        "reward": "jpeg_compressibility",
        "images": [base64.b64encode(image).decode()],
        "prompts": ["p"],
    }
    return http.post("/score", json=body)


def test_ancillary_chunk_before_iend_is_409_not_a_stale_reward(server):
    rng = np.random.default_rng(0)
    a, b = (png(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(2))
    text = chunk(b"tEXt", b"Comment\x00" + b"x" * 400)
    first, second = with_chunk(a, text, "before_iend"), with_chunk(b, text, "before_iend")
    assert len(first) == len(second) and first[-300:] == second[-300:]
    r1 = post(server, "anc-1", first)
    assert r1.status_code == 200, r1.text
    r2 = post(server, "anc-1", second)
    assert r2.status_code == 409, r2.text
    assert r2.json()["error"] == "request_id_conflict"
    # A true retry (same bytes) is still replayed.
    r3 = post(server, "anc-1", first)
    assert r3.status_code == 200 and r3.headers["idempotent-replay"] == "true"
    assert r3.json() == r1.json()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seed=st.integers(0, 2**32 - 1),
    side=st.integers(1, 24),
    kind=st.sampled_from([b"tEXt", b"zTXt", b"iTXt", b"prVt", b"vpAg"]),
    payload=st.binary(min_size=192, max_size=600),  # long enough to fill the old 256-char tail
    where=st.sampled_from(["before_iend", "after_ihdr"]),
    change=st.sampled_from(["other_pixels", "one_pixel", "same_pixels_extra_chunk"]),
)
def test_fuzzed_encodings_never_replay_a_stale_reward(server, seed, side, kind, payload, where, change):
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    other = pixels.copy()
    if change == "other_pixels":
        other = rng.integers(0, 256, pixels.shape, dtype=np.uint8)
    elif change == "one_pixel":
        other[rng.integers(side), rng.integers(side), rng.integers(3)] ^= 0x01
    extra = chunk(kind, payload)
    first = with_chunk(png(pixels), extra, where)
    second = png(other) if change == "same_pixels_extra_chunk" else with_chunk(png(other), extra, where)
    if first == second:
        return
    rid = f"fuzz-{uuid.uuid4().hex}"
    r1 = post(server, rid, first)
    r2 = post(server, rid, second)
    assert r1.status_code in (200, 422), r1.text  # a random zTXt payload may not inflate
    if r1.status_code == 200:
        assert r2.status_code == 409, r2.text
    assert "idempotent-replay" not in r2.headers


def test_fingerprint_ignores_only_the_request_id_and_formatting():
    image = base64.b64encode(png(np.zeros((4, 4, 3), np.uint8))).decode()
    base = {"request_id": "a", "reward": "r", "images": [image], "prompts": ["p"], "metadata": [{"k": 1}]}
    same = ScoreRequest.model_validate_json(
        '{"prompts": ["p"], "reward": "r", "request_id": "b", "metadata": [{"k": 1}], "images": ["'
        + image
        + '"]}'
    )
    assert fingerprint(ScoreRequest(**base)) == fingerprint(same)
    for field, value in [
        ("reward", "s"),
        ("prompts", ["q"]),
        ("metadata", [{"k": 2}]),
        ("images", [image[:-4] + "AAA="]),
    ]:
        assert fingerprint(ScoreRequest(**{**base, field: value})) != fingerprint(ScoreRequest(**base)), field


def test_fingerprinting_a_large_request_lets_other_threads_run():
    """The fingerprint runs in a thread beside the event loop: hashing 100 MiB of base64 must
    not hold the interpreter lock in one piece (one serialization of the whole request held it
    for ~0.1 s). A ticker thread's longest gap stays far below that."""
    import threading
    import time

    image = base64.b64encode(np.random.default_rng(0).bytes(3 * 2**20)).decode()  # 4 MiB of base64
    request = ScoreRequest(request_id="r", reward="r", images=[image] * 25, prompts=["p"] * 25)
    fingerprint(request)  # warm-up
    gaps: list[float] = []
    done = threading.Event()

    def tick() -> None:
        last = time.perf_counter()
        while not done.is_set():
            time.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    ticker = threading.Thread(target=tick)
    ticker.start()
    try:
        for _ in range(3):
            fingerprint(request)
    finally:
        done.set()
        ticker.join()
    assert max(gaps) < 0.04, f"longest gap {max(gaps) * 1000:.0f} ms"


def test_binary_fingerprint_streamed_in_chunks_is_the_fingerprint():
    """The server hashes a binary body's pixels chunk by chunk as they arrive: same value, any split."""
    from reward_server.idempotency import binary_digest
    from shared import binary

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 20, 30, 3), dtype=np.uint8)
    limits = binary.Limits(8, 4096, 1 << 20)
    body = binary.encode("rid", "jpeg_compressibility", images, ["a", "b", "c"], [{"q": 1}, {}, {}])
    request = binary.decode(body, limits)
    whole = fingerprint(request)
    for cuts in (1, 7, 100):
        digest = binary_digest(request.fields, request.images.shape)
        pixels = images.tobytes()
        for piece in np.array_split(np.frombuffer(pixels, np.uint8), cuts):
            digest.update(piece)
        assert digest.hexdigest()[:32] == whole
    other = images.copy()
    other[2, 19, 29, 2] ^= 1
    assert (
        fingerprint(
            binary.decode(
                binary.encode("rid", "jpeg_compressibility", other, ["a", "b", "c"], [{"q": 1}, {}, {}]),
                limits,
            )
        )
        != whole
    )
    renamed = binary.encode("other-id", "jpeg_compressibility", images, ["a", "b", "c"], [{"q": 1}, {}, {}])
    assert fingerprint(binary.decode(renamed, limits)) == whole  # only the request_id is left out
