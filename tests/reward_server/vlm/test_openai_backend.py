"""The OpenAI-compatible VLM backend against a chat-completions stand-in on loopback."""

from __future__ import annotations

import asyncio
import socket
import time

import numpy as np
import pytest

from reward_server.vlm import VLMError, build_vlm_backend
from reward_server.vlm.openai_backend import OpenAIChatBackend
from tests.reward_server.openai_standin import StandinState, create_standin_app, describe
from tests.reward_server.server_utils import serve_app_in_thread


@pytest.fixture
def standin():
    state = StandinState(model="tiny-llava", api_key="vlm-secret")
    running = serve_app_in_thread(create_standin_app(state))
    yield state, running.base_url + "/v1"
    running.stop()


def solid(colour: tuple[int, int, int], size: int = 24) -> np.ndarray:
    return np.tile(np.array(colour, dtype=np.uint8), (size, size, 1))


def backend(base_url: str, **kw) -> OpenAIChatBackend:
    opts = dict(model="tiny-llava", api_key="vlm-secret", max_retries=2, backoff_s=0.01, timeout_s=10)
    opts.update(kw)
    return OpenAIChatBackend(base_url, **opts)


def test_answers_each_image_in_order_with_the_protocol(standin):
    state, url = standin
    images = [solid((220, 30, 30)), solid((30, 30, 220)), solid((30, 200, 30))]
    vlm = backend(url, max_tokens=17, temperature=0.0)
    answers = asyncio.run(vlm.answer(images, ["q1", "q2", "q3"]))
    assert answers == [describe(i) for i in images]
    assert "red" in answers[0] and "blue" in answers[1] and "green" in answers[2]
    assert sorted(state.questions) == ["q1", "q2", "q3"]
    assert all(b == {"model": "tiny-llava", "max_tokens": 17, "temperature": 0.0} for b in state.bodies)


def test_built_from_settings_through_the_registry(standin):
    from reward_server.settings import ServerSettings

    _, url = standin
    settings = ServerSettings(vlm_base_url=url, vlm_model="tiny-llava", vlm_api_key="vlm-secret")
    vlm = build_vlm_backend("openai", settings)
    assert isinstance(vlm, OpenAIChatBackend)
    assert asyncio.run(vlm.answer([solid((245, 245, 245))], ["q"])) == [describe(solid((245, 245, 245)))]


@pytest.mark.parametrize("status", [429, 500, 503, 408])
def test_transient_statuses_are_retried(standin, status):
    state, url = standin
    state.fail_with = [status, status]
    answers = asyncio.run(backend(url, max_retries=2).answer([solid((10, 10, 10))], ["q"]))
    assert answers == [describe(solid((10, 10, 10)))]
    assert state.calls == 3


def test_retry_budget_exhausted_raises_with_reason(standin):
    state, url = standin
    state.fail_with = [500, 500, 500]
    with pytest.raises(VLMError, match=r"after 3 attempts.*HTTP 500"):
        asyncio.run(backend(url, max_retries=2).answer([solid((10, 10, 10))], ["q"]))
    assert state.calls == 3


@pytest.mark.parametrize("status", [400, 404, 422])
def test_other_client_errors_are_not_retried(standin, status):
    state, url = standin
    state.fail_with = [status]
    with pytest.raises(VLMError, match=f"rejected.*HTTP {status}"):
        asyncio.run(backend(url, max_retries=3).answer([solid((10, 10, 10))], ["q"]))
    assert state.calls == 1


def test_protocol_violation_is_a_400_not_retried(standin):
    state, url = standin
    with pytest.raises(VLMError, match="model 'wrong-model' does not exist"):
        asyncio.run(backend(url, model="wrong-model").answer([solid((10, 10, 10))], ["q"]))
    assert state.calls == 1


def test_bad_api_key_is_not_retried(standin):
    state, url = standin
    with pytest.raises(VLMError, match="HTTP 401"):
        asyncio.run(backend(url, api_key="nope").answer([solid((10, 10, 10))], ["q"]))
    assert state.calls == 1


def test_connection_refused_is_retried_then_reported():
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    vlm = OpenAIChatBackend(f"http://127.0.0.1:{port}/v1", "m", max_retries=2, backoff_s=0.01, timeout_s=2)
    with pytest.raises(VLMError, match=r"after 3 attempts.*ConnectError"):
        asyncio.run(vlm.answer([solid((10, 10, 10))], ["q"]))


def test_concurrency_limit_is_respected(standin):
    state, url = standin
    state.latency_s = 0.2
    vlm = backend(url, concurrency=2)
    images = [solid((220, 30, 30))] * 6

    async def run() -> float:
        loop = asyncio.get_running_loop()
        started = loop.time()
        await vlm.answer(images, ["q"] * 6)
        return loop.time() - started

    elapsed = asyncio.run(run())
    # 6 calls of 0.2 s, 2 at a time: at least 3 rounds; unlimited would take one.
    assert elapsed >= 0.55
    assert state.calls == 6


def test_timeout_is_a_transport_error_and_retried(standin):
    state, url = standin
    state.latency_s = 1.0
    with pytest.raises(VLMError, match=r"after 2 attempts.*Timeout"):
        asyncio.run(backend(url, timeout_s=0.2, max_retries=1).answer([solid((10, 10, 10))], ["q"]))
    assert state.calls == 2


# --- the one retryable set and Retry-After (shared/errors.py, shared/retry.py) --------------------


@pytest.mark.parametrize("status", [400, 401, 404, 408, 409, 413, 422, 429, 500, 501, 502, 503, 504, 505])
def test_retries_exactly_the_retryable_statuses(standin, status):
    from shared.errors import is_retryable_status

    state, url = standin
    state.fail_with = [status] * 3
    vlm = backend(url, max_retries=2)
    if is_retryable_status(status):
        with pytest.raises(VLMError, match=f"after 3 attempts.*HTTP {status}"):
            asyncio.run(vlm.answer([solid((10, 10, 10))], ["q"]))
        assert state.calls == 3
    else:
        with pytest.raises(VLMError, match=f"rejected.*HTTP {status}"):
            asyncio.run(vlm.answer([solid((10, 10, 10))], ["q"]))
        assert state.calls == 1


def test_retry_after_is_honoured(standin):
    state, url = standin
    state.fail_with, state.retry_after = [429], "1"
    vlm = backend(url, backoff_s=0.01)
    started = time.monotonic()
    assert asyncio.run(vlm.answer([solid((10, 10, 10))], ["q"])) == [describe(solid((10, 10, 10)))]
    assert time.monotonic() - started >= 1.0 and state.calls == 2


# --- one HTTP pool, made once ---------------------------------------------------------------------


def test_one_client_for_every_call(standin, monkeypatch):
    import httpx

    made = []
    original = httpx.AsyncClient.__init__

    def counting(self, *args, **kwargs):
        made.append(self)
        original(self, *args, **kwargs)

    monkeypatch.setattr(httpx.AsyncClient, "__init__", counting)
    _, url = standin
    vlm = backend(url)

    async def three_batches() -> None:
        for _ in range(3):
            await vlm.answer([solid((10, 10, 10))] * 2, ["q", "q"])
        await vlm.aclose()

    asyncio.run(three_batches())
    assert len(made) == 1  # not one per call (it was rebuilt for every new event loop)


def test_a_second_event_loop_is_refused_clearly(standin):
    _, url = standin
    vlm = backend(url)
    asyncio.run(vlm.answer([solid((10, 10, 10))], ["q"]))
    with pytest.raises(RuntimeError, match="second event loop"):
        asyncio.run(vlm.answer([solid((10, 10, 10))], ["q"]))
