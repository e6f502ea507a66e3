"""The reward server over real HTTP (uvicorn on loopback): every status code, idempotency, metrics."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from reward_server.rewards.base import RewardOutput, Scorer, ScoringError, register_reward
from reward_server.vlm.base import VLMError
from shared.codec import encode_png_b64
from shared.schemas import ErrorResponse, ScoreResponse
from tests.reward_server.server_utils import start_reward_server_thread

TIMEOUT = 30


@register_reward("_test_controlled")
class Controlled(Scorer):
    """Test reward steered by its prompts: 'sleep:<s>', 'scoring_error', 'vlm_error', 'crash', 'nan'.

    reward = the image's mean pixel value; ``calls`` counts images scored (class-wide).
    """

    calls = 0

    def score(self, images, prompts, metadata):
        raise AssertionError("the server uses ascore")

    async def ascore(self, images, prompts, metadata):
        type(self).calls += len(images)
        for p in prompts:
            if p.startswith("sleep:"):
                await asyncio.sleep(float(p.split(":")[1]))
            if p == "scoring_error":
                raise ScoringError("the judge model is unhappy")
            if p == "vlm_error":
                raise VLMError("VLM call failed after 4 attempts: HTTP 503")
            if p == "crash":
                raise KeyError("some bug")
        return [
            RewardOutput(
                float("nan") if p == "nan" else float(img.mean()), {"prompt": p, "np": np.float32(1.5)}
            )
            for img, p in zip(images, prompts, strict=True)
        ]


LOAD_GATE = threading.Event()


@register_reward("_test_slow_load")
class SlowLoad(Controlled):
    @classmethod
    def from_settings(cls, settings=None):
        if not LOAD_GATE.wait(30):
            raise RuntimeError("gate never opened")
        return cls()


@register_reward("_test_broken_load")
class BrokenLoad(Controlled):
    @classmethod
    def from_settings(cls, settings=None):
        raise RuntimeError("no weights at /nowhere")


def image(value: int = 100, size: int = 16) -> np.ndarray:
    rng = np.random.default_rng(value)
    return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)


def body(reward="jpeg_compressibility", n=2, request_id=None, prompts=None, **extra) -> dict:
    imgs = [image(i) for i in range(n)]
    payload = {
        "request_id": request_id or f"req-{time.monotonic_ns()}",
        "reward": reward,
        "images": [encode_png_b64(i) for i in imgs],
        "prompts": prompts if prompts is not None else [f"prompt {i}" for i in range(n)],
    }
    payload.update(extra)
    return payload


def expect_error(response: httpx.Response, status: int, error: str) -> ErrorResponse:
    assert response.status_code == status, response.text
    parsed = ErrorResponse.model_validate(response.json())
    assert parsed.error == error
    assert parsed.reason and "Traceback" not in parsed.reason
    return parsed


def metric(base_url: str, name: str, headers=None) -> float:
    """Sum of all samples of one metric in the Prometheus exposition."""
    text = httpx.get(base_url + "/metrics", headers=headers, timeout=TIMEOUT).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture(scope="module")
def server():
    running = start_reward_server_thread(
        {
            "rewards": ["jpeg_compressibility", "jpeg_incompressibility", "_test_controlled"],
            "max_body_bytes": 1_000_000,
            "max_images_per_request": 8,
            "max_queue_images": 64,
            "max_image_pixels": 64 * 64,
            "max_wait_ms": 2,
        }
    )
    yield running.base_url
    running.stop()


# --- happy paths ---------------------------------------------------------------------------------


def test_health_ready_rewards_openapi(server):
    assert httpx.get(server + "/healthz").json() == {"status": "ok"}
    assert httpx.get(server + "/readyz").status_code == 200
    assert httpx.get(server + "/rewards").json() == {
        "rewards": ["jpeg_compressibility", "jpeg_incompressibility", "_test_controlled"]
    }
    spec = httpx.get(server + "/openapi.json").json()
    assert {"/score", "/rewards", "/healthz", "/readyz", "/metrics"} <= set(spec["paths"])
    score = spec["paths"]["/score"]["post"]
    assert "request_id" in score["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert {"400", "401", "413", "422", "429", "503"} <= set(score["responses"])


def test_jpeg_scores_over_http_match_pil(server):
    payload = body(n=3)
    response = httpx.post(server + "/score", json=payload, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    parsed = ScoreResponse.model_validate(response.json())
    assert parsed.request_id == payload["request_id"] and parsed.reward == "jpeg_compressibility"
    expected = []
    for i in range(3):
        buffer = io.BytesIO()
        Image.fromarray(image(i)).save(buffer, "JPEG", quality=95)
        expected.append(-len(buffer.getvalue()) / 1000)
    assert parsed.rewards == expected


def test_batch_of_one_is_a_list(server):
    response = httpx.post(server + "/score", json=body(n=1), timeout=TIMEOUT)
    assert response.status_code == 200 and len(response.json()["rewards"]) == 1


def test_details_are_plain_json(server):
    response = httpx.post(server + "/score", json=body("_test_controlled", n=1), timeout=TIMEOUT)
    assert response.json()["details"] == [{"prompt": "prompt 0", "np": 1.5}]


def test_concurrent_clients_get_their_own_results(server):
    def call(i: int):
        payload = body("_test_controlled", n=1 + i % 3, prompts=[f"c{i}-{j}" for j in range(1 + i % 3)])
        payload["images"] = [encode_png_b64(np.full((8, 8, 3), i, np.uint8))] * (1 + i % 3)
        return i, httpx.post(server + "/score", json=payload, timeout=TIMEOUT)

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(call, range(32)))
    for i, response in results:
        assert response.status_code == 200, response.text
        assert response.json()["rewards"] == [float(i)] * (1 + i % 3)
        assert [d["prompt"] for d in response.json()["details"]] == [f"c{i}-{j}" for j in range(1 + i % 3)]


def test_concurrent_requests_are_batched_together(start_reward_server):
    base = start_reward_server({"rewards": ["_test_controlled"], "max_wait_ms": 500, "max_batch_size": 8})

    def call(i: int):
        return httpx.post(server_url + "/score", json=body("_test_controlled", n=2), timeout=TIMEOUT)

    server_url = base
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(call, range(4)))
    assert all(r.status_code == 200 for r in responses)
    # 4 requests x 2 images, one full batch of 8 (the 500 ms wait is cut short by the full batch).
    assert metric(base, "ddpo_reward_batch_size_count") == 1
    assert metric(base, "ddpo_reward_batch_size_sum") == 8
    assert metric(base, "ddpo_reward_batch_requests_sum") == 4


# --- 422 ---------------------------------------------------------------------------------------


def png_b64(array: np.ndarray, fmt: str = "PNG", mode: str | None = None) -> str:
    buffer = io.BytesIO()
    img = Image.fromarray(array)
    if mode:
        img = img.convert(mode)
    img.save(buffer, fmt)
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize(
    "mutate",
    [
        lambda b: b.pop("request_id"),
        lambda b: b.update(request_id=""),
        lambda b: b.update(images=[]),
        lambda b: b.update(prompts=["only one"]),
        lambda b: b.update(metadata=[{}]),
        lambda b: b.update(extra_field=1),
        lambda b: b.update(images=["not base64!!"] * 2),
        lambda b: b.update(images=[base64.b64encode(b"hello").decode()] * 2),
        lambda b: b.update(images=[png_b64(image(1), fmt="JPEG")] * 2),
        lambda b: b.update(images=[png_b64(image(1), mode="L")] * 2),
        lambda b: b.update(images=[png_b64(image(1), mode="RGBA")] * 2),
        lambda b: b.update(prompts=[1, 2]),
    ],
    ids=[
        "no-id",
        "empty-id",
        "no-images",
        "count-mismatch",
        "metadata-mismatch",
        "extra-field",
        "bad-base64",
        "not-an-image",
        "jpeg",
        "grayscale",
        "rgba",
        "prompt-types",
    ],
)
def test_malformed_requests_are_422(server, mutate):
    payload = body()
    mutate(payload)
    response = httpx.post(server + "/score", json=payload, timeout=TIMEOUT)
    assert response.status_code == 422, response.text
    error = ErrorResponse.model_validate(response.json())
    assert error.error in ("invalid_request", "invalid_image") and error.reason


def test_bad_json_and_wrong_type_are_422(server):
    for raw in [b"", b"{", b"[1, 2]", b"null", b'"x"', '{"reward": "\u00e9"'.encode()]:
        response = httpx.post(server + "/score", content=raw, headers={"content-type": "application/json"})
        assert response.status_code == 422, (raw, response.text)
        ErrorResponse.model_validate(response.json())


def test_invalid_image_names_the_position(server):
    payload = body(n=3)
    payload["images"][2] = png_b64(image(1), fmt="JPEG")
    error = expect_error(httpx.post(server + "/score", json=payload, timeout=TIMEOUT), 422, "invalid_image")
    assert "images[2]" in error.reason and "PNG" in error.reason
    assert error.request_id == payload["request_id"]


# --- 400 / 413 -----------------------------------------------------------------------------------


def test_unknown_reward_is_400_listing_valid_names(server):
    error = expect_error(httpx.post(server + "/score", json=body("pickscore")), 400, "unknown_reward")
    assert "jpeg_compressibility" in error.reason and "_test_controlled" in error.reason
    # Registered but not enabled on this server: also unknown here.
    error = expect_error(httpx.post(server + "/score", json=body("aesthetic")), 400, "unknown_reward")
    assert "'aesthetic'" in error.reason


def test_too_many_images_is_413(server):
    expect_error(httpx.post(server + "/score", json=body(n=9), timeout=TIMEOUT), 413, "too_many_images")


def test_too_many_pixels_is_413(server):
    payload = body(n=1)
    payload["images"] = [encode_png_b64(np.zeros((65, 64, 3), np.uint8))]
    error = expect_error(httpx.post(server + "/score", json=payload, timeout=TIMEOUT), 413, "image_too_large")
    assert "4160" in error.reason


def test_decompression_bomb_is_refused_before_decoding(server):
    # 5000x5000 zeros: ~25 kB on the wire, 75 MB decoded; refused from the PNG header alone.
    buffer = io.BytesIO()
    Image.new("RGB", (5000, 5000)).save(buffer, "PNG", compress_level=9)
    assert len(buffer.getvalue()) < 200_000
    payload = body(n=1)
    payload["images"] = [base64.b64encode(buffer.getvalue()).decode()]
    error = expect_error(httpx.post(server + "/score", json=payload, timeout=TIMEOUT), 413, "image_too_large")
    assert "5000x5000" in error.reason


def test_large_body_is_413_before_parsing(server):
    blob = b'{"request_id": "big", "images": ["' + b"A" * 1_100_000 + b'"]}'
    expect_error(httpx.post(server + "/score", content=blob), 413, "body_too_large")

    def chunks():  # no Content-Length: the limit is enforced while streaming
        for _ in range(40):
            yield b" " * 30_000

    expect_error(httpx.post(server + "/score", content=chunks()), 413, "body_too_large")


# --- scorer failures: 500 / 502, never a traceback, never NaN -------------------------------------


@pytest.mark.parametrize(
    ("prompt", "status", "error", "text"),
    [
        ("scoring_error", 500, "scoring_failed", "the judge model is unhappy"),
        ("vlm_error", 502, "vlm_error", "HTTP 503"),
        ("crash", 500, "scoring_failed", "KeyError"),
        ("nan", 500, "scoring_failed", "non-finite"),
    ],
)
def test_scorer_failures(server, prompt, status, error, text):
    payload = body("_test_controlled", n=2, prompts=["fine", prompt])
    parsed = expect_error(httpx.post(server + "/score", json=payload, timeout=TIMEOUT), status, error)
    assert text in parsed.reason


def test_unknown_reward_reason_does_not_echo_the_input(server):
    error = expect_error(httpx.post(server + "/score", json=body("x" * 100_000)), 400, "unknown_reward")
    assert len(error.reason) < 300


def test_only_json_posts_are_accepted(server):
    # text/plain and form posts need no CORS preflight: a web page could make a browser send them.
    payload = json.dumps(body())
    for kind in [
        "text/plain",
        "Text/Plain; charset=utf-8",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
    ]:
        headers = {"content-type": kind}
        response = httpx.post(server + "/score", content=payload, headers=headers, timeout=TIMEOUT)
        expect_error(response, 415, "unsupported_media_type")
    response = httpx.post(
        server + "/score", content=payload, headers={"content-type": "application/json; charset=utf-8"}
    )
    assert response.status_code == 200, response.text


def test_other_routes_answer_with_the_error_schema(server):
    expect_error(httpx.get(server + "/nope"), 404, "not_found")
    expect_error(httpx.get(server + "/score"), 405, "method_not_allowed")


# --- idempotency ---------------------------------------------------------------------------------


def test_retry_of_a_request_id_is_not_rescored(server):
    payload = body("_test_controlled", n=3, request_id="idem-1")
    before_calls = Controlled.calls
    before_images = metric(server, "ddpo_reward_images_total")
    first = httpx.post(server + "/score", json=payload, timeout=TIMEOUT)
    second = httpx.post(server + "/score", json=payload, timeout=TIMEOUT)
    assert first.status_code == second.status_code == 200
    assert first.json() == second.json()
    assert second.headers["idempotent-replay"] == "true" and "idempotent-replay" not in first.headers
    assert Controlled.calls - before_calls == 3
    assert metric(server, "ddpo_reward_images_total") - before_images == 3


def test_retry_while_the_first_attempt_runs_waits_for_it(server):
    payload = body("_test_controlled", n=1, request_id="idem-slow", prompts=["sleep:0.5"])
    before = Controlled.calls
    with ThreadPoolExecutor(3) as pool:
        futures = [
            pool.submit(httpx.post, server + "/score", json=payload, timeout=TIMEOUT) for _ in range(3)
        ]
        responses = [f.result() for f in futures]
    assert all(r.status_code == 200 for r in responses)
    assert len({json.dumps(r.json()) for r in responses}) == 1
    assert Controlled.calls - before == 1


def test_reused_request_id_with_other_content_is_409(server):
    httpx.post(server + "/score", json=body(n=2, request_id="idem-2"), timeout=TIMEOUT)
    other = body(n=2, request_id="idem-2", prompts=["x", "y"])
    expect_error(httpx.post(server + "/score", json=other, timeout=TIMEOUT), 409, "request_id_conflict")


def test_failed_request_is_scored_again_on_retry(server):
    payload = body("_test_controlled", n=1, request_id="idem-fail", prompts=["scoring_error"])
    before = Controlled.calls
    for _ in range(2):
        expect_error(httpx.post(server + "/score", json=payload, timeout=TIMEOUT), 500, "scoring_failed")
    assert Controlled.calls - before == 2


# --- metrics -------------------------------------------------------------------------------------


def test_metrics_exposition(server):
    httpx.post(server + "/score", json=body(n=2), timeout=TIMEOUT)
    httpx.post(server + "/score", json=body("nope"), timeout=TIMEOUT)
    text = httpx.get(server + "/metrics").text
    for name in [
        'ddpo_reward_requests_total{reward="jpeg_compressibility",status="200"}',
        'ddpo_reward_requests_total{reward="unknown",status="400"}',
        'ddpo_reward_errors_total{reason="unknown_reward"}',
        "ddpo_reward_request_latency_seconds_bucket",
        "ddpo_reward_batch_size_bucket",
        'ddpo_reward_queue_depth{reward="jpeg_compressibility"}',
        "ddpo_reward_inflight_requests",
        'ddpo_reward_images_total{reward="jpeg_compressibility"}',
        "ddpo_reward_ready 1.0",
    ]:
        assert name in text, name


# --- 401 -----------------------------------------------------------------------------------------


def test_unauthenticated_probes_show_no_paths(start_reward_server):
    base = start_reward_server({"rewards": ["_test_broken_load"], "api_key": "s3cret-key"}, wait_ready=False)
    deadline = time.monotonic() + 10
    while httpx.get(base + "/healthz").status_code == 200:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    for path in ["/healthz", "/readyz"]:
        assert "/nowhere" not in expect_error(httpx.get(base + path), 503, "load_failed").reason
        good = {"Authorization": "Bearer s3cret-key"}
        assert "/nowhere" in expect_error(httpx.get(base + path, headers=good), 503, "load_failed").reason


def test_bearer_token(start_reward_server):
    base = start_reward_server({"api_key": "s3cret-key"})
    expect_error(httpx.post(base + "/score", json=body()), 401, "unauthorized")
    response = httpx.post(base + "/score", json=body(), headers={"Authorization": "Bearer wrong"})
    expect_error(response, 401, "unauthorized")
    assert response.headers["www-authenticate"] == "Bearer"
    expect_error(
        httpx.post(base + "/score", json=body(), headers={"Authorization": "s3cret-key"}), 401, "unauthorized"
    )
    expect_error(httpx.get(base + "/rewards"), 401, "unauthorized")
    expect_error(httpx.get(base + "/metrics"), 401, "unauthorized")
    # Unauthenticated callers cannot make the server read a big body: 401 comes first.
    expect_error(httpx.post(base + "/score", content=b"x" * 200_000_000), 401, "unauthorized")
    good = {"Authorization": "Bearer s3cret-key"}
    assert httpx.post(base + "/score", json=body(), headers=good, timeout=TIMEOUT).status_code == 200
    assert httpx.get(base + "/rewards", headers=good).status_code == 200
    assert httpx.get(base + "/metrics", headers=good).status_code == 200
    assert httpx.get(base + "/healthz").status_code == 200  # probes need no token
    assert httpx.get(base + "/readyz").status_code == 200


# --- 429 -----------------------------------------------------------------------------------------


def test_overload_is_429_with_retry_after(start_reward_server):
    base = start_reward_server(
        {
            "rewards": ["_test_controlled"],
            "max_inflight_requests": 2,
            "max_inflight_images": 100,
            "retry_after_s": 3,
        }
    )
    slow = [body("_test_controlled", n=1, prompts=["sleep:1.0"]) for _ in range(2)]
    with ThreadPoolExecutor(2) as pool:
        running = [pool.submit(httpx.post, base + "/score", json=p, timeout=TIMEOUT) for p in slow]
        time.sleep(0.4)
        response = httpx.post(base + "/score", json=body("_test_controlled", n=1), timeout=TIMEOUT)
        expect_error(response, 429, "overloaded")
        assert response.headers["retry-after"] == "3"
        assert all(f.result().status_code == 200 for f in running)
    assert httpx.post(base + "/score", json=body("_test_controlled", n=1), timeout=TIMEOUT).status_code == 200


def test_inflight_image_limit_is_429(start_reward_server):
    base = start_reward_server(
        {
            "rewards": ["_test_controlled"],
            "max_inflight_images": 3,
            "max_queue_images": 3,
            "max_images_per_request": 3,
        }
    )
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(
            httpx.post,
            base + "/score",
            json=body("_test_controlled", n=2, prompts=["sleep:1.0", "a"]),
            timeout=30,
        )
        time.sleep(0.4)
        expect_error(httpx.post(base + "/score", json=body("_test_controlled", n=2)), 429, "overloaded")
        assert httpx.post(base + "/score", json=body("_test_controlled", n=1), timeout=30).status_code == 200
        assert running.result().status_code == 200


def test_full_batch_queue_is_429(start_reward_server):
    base = start_reward_server(
        {
            "rewards": ["_test_controlled"],
            "max_queue_images": 2,
            "max_images_per_request": 2,
            "max_batch_size": 1,
        }
    )
    with ThreadPoolExecutor(3) as pool:
        running = [  # one being scored (1 s), two queued behind it: the queue of 2 images is full
            pool.submit(
                httpx.post, base + "/score", json=body("_test_controlled", n=1, prompts=["sleep:1.0"])
            )
            for _ in range(3)
        ]
        time.sleep(0.4)
        response = httpx.post(base + "/score", json=body("_test_controlled", n=1), timeout=TIMEOUT)
        expect_error(response, 429, "queue_full")
        assert "retry-after" in response.headers
        [f.result(timeout=TIMEOUT) for f in running]


# --- 503 -----------------------------------------------------------------------------------------


def test_not_ready_until_models_load(start_reward_server):
    LOAD_GATE.clear()
    try:
        base = start_reward_server({"rewards": ["_test_slow_load"], "retry_after_s": 2}, wait_ready=False)
        assert httpx.get(base + "/healthz").status_code == 200
        response = httpx.get(base + "/readyz")
        expect_error(response, 503, "not_ready")
        assert response.headers["retry-after"] == "2"
        expect_error(httpx.post(base + "/score", json=body("_test_slow_load")), 503, "not_ready")
        assert metric(base, "ddpo_reward_ready") == 0
    finally:
        LOAD_GATE.set()
    deadline = time.monotonic() + 10
    while httpx.get(base + "/readyz").status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert httpx.post(base + "/score", json=body("_test_slow_load"), timeout=TIMEOUT).status_code == 200


def test_failed_load_is_reported(start_reward_server):
    base = start_reward_server({"rewards": ["_test_broken_load"]}, wait_ready=False)
    deadline = time.monotonic() + 10
    while httpx.get(base + "/healthz").status_code == 200:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    error = expect_error(httpx.get(base + "/readyz"), 503, "load_failed")
    assert "no weights at /nowhere" in error.reason  # no API key configured: details for everyone
    expect_error(httpx.get(base + "/healthz"), 503, "load_failed")
    expect_error(httpx.post(base + "/score", json=body("_test_broken_load")), 503, "load_failed")
