"""llava_strict under hostile metadata, over real HTTP with the chat-completions stand-in as the VLM:
questions, alternatives and answer lengths are bounded (413 naming the limit), VLM calls count
against the in-flight limit, and answer matching never blocks the event loop."""

from __future__ import annotations

import threading
import time

import httpx
import numpy as np
import pytest

from shared.codec import encode_png_b64
from tests.reward_server.openai_standin import StandinState, create_standin_app
from tests.reward_server.server_utils import serve_app_in_thread

RED = np.tile(np.array((220, 30, 30), np.uint8), (16, 16, 1))


@pytest.fixture(scope="module")
def standin():
    state = StandinState(model="tiny-llava")
    running = serve_app_in_thread(create_standin_app(state))
    yield state, running.base_url + "/v1"
    running.stop()


def strict_server(start_reward_server, url: str, **settings) -> str:
    return start_reward_server(
        {"rewards": ["llava_strict"], "vlm_base_url": url, "vlm_model": "tiny-llava", **settings}
    )


def body(rid: str, metadata: list[dict], n: int = 1) -> dict:
    return {
        "request_id": rid,
        "reward": "llava_strict",
        "images": [encode_png_b64(RED)] * n,
        "prompts": ["a red square"] * n,
        "metadata": metadata,
    }


@pytest.mark.parametrize(
    ("meta", "error", "words"),
    [
        ({"questions": ["colour?"] * 5, "answers": ["red"] * 5}, "too_many_questions", "5 questions"),
        ({"questions": ["colour?"], "answers": [["red"] * 4]}, "too_many_alternatives", "4 accepted answers"),
        ({"questions": ["colour?"], "answers": ["r" * 41]}, "answer_too_long", "41 characters"),
    ],
)
def test_limits_are_413_naming_the_setting(standin, start_reward_server, meta, error, words):
    state, url = standin
    state.latency_s = 0.0
    base = strict_server(
        start_reward_server,
        url,
        llava_strict_max_questions=4,
        llava_strict_max_alternatives=3,
        llava_strict_max_answer_chars=40,
    )
    calls = state.calls
    response = httpx.post(base + "/score", json=body(f"limit-{error}", [meta]), timeout=30)
    assert response.status_code == 413 and response.json()["error"] == error, response.text
    assert words in response.json()["reason"] and "llava_strict_max_" in response.json()["reason"]
    assert state.calls == calls  # refused before any VLM call
    at_limit = {"questions": ["colour?"] * 4, "answers": [["blue", "green", "red"]] * 3 + ["r" * 40]}
    response = httpx.post(base + "/score", json=body(f"ok-{error}", [at_limit]), timeout=30)
    assert response.status_code == 200, response.text
    assert response.json()["rewards"] == [0.75]  # red found in 3 of 4 replies
    assert state.calls == calls + 4


def test_vlm_calls_count_against_the_inflight_limit(standin, start_reward_server):
    state, url = standin
    base = strict_server(start_reward_server, url, max_inflight_images=8, llava_strict_max_questions=16)
    nine = {"questions": ["colour?"] * 9, "answers": ["red"] * 9}
    response = httpx.post(base + "/score", json=body("nine", [nine]), timeout=30)
    assert response.status_code == 413 and response.json()["error"] == "too_much_work", response.text
    assert "9 units of work (1 images)" in response.json()["reason"]
    # Two requests of 1 image x 6 questions: 12 VLM calls, over 8: the second waits its turn (429).
    six = {"questions": ["colour?"] * 6, "answers": ["red"] * 6}
    state.latency_s = 0.5
    try:
        first = {}
        thread = threading.Thread(
            target=lambda: first.update(r=httpx.post(base + "/score", json=body("six-a", [six]), timeout=30))
        )
        thread.start()
        time.sleep(0.25)
        second = httpx.post(base + "/score", json=body("six-b", [six]), timeout=30)
        thread.join()
    finally:
        state.latency_s = 0.0
    assert first["r"].status_code == 200, first["r"].text
    assert second.status_code == 429 and second.json()["error"] == "overloaded", second.text


def test_answer_matching_never_blocks_the_event_loop(standin, start_reward_server):
    """One question with 300k accepted answers (allowed here on purpose): /healthz keeps answering."""
    state, url = standin
    state.latency_s = 0.0
    base = strict_server(start_reward_server, url, llava_strict_max_alternatives=400_000)
    alternatives = [f"word{i}" for i in range(300_000)] + ["red"]
    meta = {"questions": ["colour?"], "answers": [alternatives]}
    result = {}
    thread = threading.Thread(
        target=lambda: result.update(r=httpx.post(base + "/score", json=body("many", [meta]), timeout=120))
    )
    thread.start()
    probes = []
    while thread.is_alive():
        started = time.perf_counter()
        assert httpx.get(base + "/healthz", timeout=30).status_code == 200
        probes.append(time.perf_counter() - started)
        time.sleep(0.01)
    thread.join()
    assert result["r"].status_code == 200 and result["r"].json()["rewards"] == [1.0], result["r"].text
    print(f"\n{len(probes)} /healthz probes during the request: max {max(probes) * 1000:.0f} ms")
    assert len(probes) >= 5  # the request took a while: matching 300k alternatives
    assert max(probes) < 1.0  # on the loop, it blocked /healthz for seconds
