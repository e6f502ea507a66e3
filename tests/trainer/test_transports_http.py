"""The http transport against real reward servers (uvicorn on loopback): retries, errors, balancing."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import tests.transport_rewards  # noqa: F401  (registers test_slow_jpeg, test_every_other_refused)
from reward_server.rewards.jpeg import JpegCompressibility
from tests.trainer.conftest import tiny_config
from trainer.config import build_config
from trainer.reward_client import make_reward_client
from trainer.sampling import Trajectories
from trainer.train import Trainer
from trainer.transports.errors import RewardDeadlineError, RewardRejectedError, RewardUnavailableError
from trainer.transports.http import HttpRewardClient

PROMPTS = ["a cat", "a dog", "a horse"]


def batch(seed: int, n: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 24, 24, 3), dtype=np.uint8)


def expected(images: np.ndarray) -> np.ndarray:
    outputs = JpegCompressibility().score(list(images), PROMPTS[: len(images)], [{}] * len(images))
    return np.array([o.reward for o in outputs])


def metric(start_reward_server, index: int, name: str, **labels: str) -> float:
    registry = start_reward_server.servers[index].app.state.metrics.registry
    return registry.get_sample_value(name, labels) or 0.0


def fast_client(reward: str, urls: list[str], **kwargs) -> HttpRewardClient:
    options = {"max_attempts": 4, "backoff_initial_s": 0.05, "backoff_max_s": 0.5, "deadline_s": 30.0}
    return HttpRewardClient(reward, urls, **{**options, **kwargs})


@pytest.mark.parametrize("balancing", ["least_loaded", "round_robin"])
def test_rewards_equal_local_across_two_servers(start_reward_server, balancing):
    urls = [start_reward_server(), start_reward_server()]
    with fast_client("jpeg_compressibility", urls, load_balancing=balancing) as client:
        batches = [batch(i) for i in range(6)]
        futures = [client.submit(b, PROMPTS) for b in batches]
        for b, future in zip(batches, futures, strict=True):
            result = future.result(timeout=30)
            assert result.rewards.dtype == np.float64
            np.testing.assert_array_equal(result.rewards, expected(b))
            assert [d["jpeg_kb"] for d in result.details] == pytest.approx(-expected(b))
    scored = [
        metric(start_reward_server, i, "ddpo_reward_images_total", reward="jpeg_compressibility")
        for i in (0, 1)
    ]
    assert sum(scored) == 18 and min(scored) > 0  # every image once, both servers used


def test_batch_of_one(start_reward_server):
    with fast_client("jpeg_compressibility", [start_reward_server()]) as client:
        result = client.submit(batch(1, n=1), PROMPTS[:1]).result(timeout=30)
    assert result.rewards.shape == (1,)


def test_server_not_running_is_a_clear_bounded_error():
    from trainer.embedded import free_loopback_port

    url = f"http://127.0.0.1:{free_loopback_port()}"
    with fast_client("jpeg_compressibility", [url], max_attempts=3) as client:
        started = time.monotonic()
        with pytest.raises(RewardUnavailableError) as info:
            client.submit(batch(0), PROMPTS).result(timeout=30)
    message = str(info.value)
    assert f"connection refused to {url}/score after 3 attempts" in message
    assert "is the reward server running?" in message
    assert time.monotonic() - started < 10


def test_4xx_is_not_retried_and_carries_the_reason(start_reward_server):
    url = start_reward_server()
    with fast_client("no_such_reward", [url]) as client:
        with pytest.raises(
            RewardRejectedError, match=r"HTTP 400 .*unknown_reward.*unknown reward 'no_such_reward'"
        ):
            client.submit(batch(0), PROMPTS).result(timeout=30)
    assert metric(start_reward_server, 0, "ddpo_reward_requests_total", reward="unknown", status="400") == 1


def test_bearer_token_from_the_environment(start_reward_server, monkeypatch):
    url = start_reward_server({"api_key": "t0ken-t0ken"})
    cfg = build_config("tiny", {"reward": {"transport": "http", "urls": [url], "max_attempts": 2}}).reward
    monkeypatch.delenv("DDPO_REWARD_API_KEY", raising=False)
    with make_reward_client(cfg) as client:
        with pytest.raises(RewardRejectedError, match="HTTP 401") as info:
            client.submit(batch(0), PROMPTS).result(timeout=30)
        assert info.value.status == 401
    monkeypatch.setenv("DDPO_REWARD_API_KEY", "t0ken-t0ken")
    assert "t0ken" not in cfg.model_dump_json()
    with make_reward_client(cfg) as client:
        np.testing.assert_array_equal(
            client.submit(batch(0), PROMPTS).result(timeout=30).rewards, expected(batch(0))
        )


def test_retry_with_the_same_request_id_is_not_scored_twice(start_reward_server, monkeypatch):
    # Each attempt times out after 0.3 s while the server takes 1 s: the retries carry the same id
    # and wait for (then replay) the first attempt's result instead of scoring again.
    monkeypatch.setenv("DDPO_TEST_REWARD_DELAY_S", "1.0")
    url = start_reward_server({"rewards": ["test_slow_jpeg"]})
    with fast_client("test_slow_jpeg", [url], attempt_timeout_s=0.3, max_attempts=8) as client:
        result = client.submit(batch(2), PROMPTS, request_id="same-id").result(timeout=30)
    np.testing.assert_array_equal(result.rewards, expected(batch(2)))
    assert metric(start_reward_server, 0, "ddpo_reward_images_total", reward="test_slow_jpeg") == 3
    replays = metric(start_reward_server, 0, "ddpo_reward_idempotent_replays_total", reward="test_slow_jpeg")
    assert replays >= 1


def test_429_is_retried_after_retry_after(start_reward_server, monkeypatch):
    monkeypatch.setenv("DDPO_TEST_REWARD_DELAY_S", "0.5")
    url = start_reward_server({"rewards": ["test_slow_jpeg"], "max_inflight_requests": 1, "retry_after_s": 1})
    with fast_client("test_slow_jpeg", [url]) as client:
        started = time.monotonic()
        futures = [client.submit(batch(i), PROMPTS) for i in range(2)]
        results = [f.result(timeout=30) for f in futures]
        elapsed = time.monotonic() - started
    for i, result in enumerate(results):
        np.testing.assert_array_equal(result.rewards, expected(batch(i)))
    assert (
        metric(start_reward_server, 0, "ddpo_reward_requests_total", reward="test_slow_jpeg", status="429")
        >= 1
    )
    assert elapsed >= 1.0  # the refused one waited Retry-After (1 s), not the 0.05 s backoff


def test_deadline_exceeded_is_reported(start_reward_server, monkeypatch):
    monkeypatch.setenv("DDPO_TEST_REWARD_DELAY_S", "3.0")
    url = start_reward_server({"rewards": ["test_slow_jpeg"]})
    with fast_client("test_slow_jpeg", [url], deadline_s=0.8) as client:
        started = time.monotonic()
        with pytest.raises(RewardDeadlineError, match=r"deadline of 0\.8 s"):
            client.submit(batch(0), PROMPTS).result(timeout=30)
    assert time.monotonic() - started < 2.5


def test_combined_reward_is_the_weighted_sum_with_details_by_name(start_reward_server):
    url = start_reward_server()
    cfg = build_config(
        "tiny",
        {
            "reward": {
                "urls": [url],
                "components": [
                    {"name": "jpeg_compressibility", "weight": 0.5, "transport": "http"},
                    {"name": "jpeg_incompressibility", "weight": 2.0, "transport": "local"},
                ],
            }
        },
    ).reward
    assert cfg.name == "0.5*jpeg_compressibility+2*jpeg_incompressibility"
    images = batch(4)
    with make_reward_client(cfg) as client:
        result = client.submit(images, PROMPTS).result(timeout=30)
    kb = -expected(images)
    np.testing.assert_allclose(result.rewards, 0.5 * -kb + 2.0 * kb)
    assert result.details[0]["jpeg_compressibility"] == {"reward": -kb[0], "jpeg_kb": kb[0]}
    assert result.details[0]["jpeg_incompressibility"]["reward"] == kb[0]


def _samples(n: int) -> Trajectories:
    z = torch.zeros(n, 2, 1, 1, 1)
    return Trajectories(
        prompts=[f"p{i}" for i in range(n)],
        prompt_embeds=torch.arange(n, dtype=torch.float32).view(n, 1, 1),
        negative_embeds=torch.zeros(n, 1, 1),
        timesteps=torch.zeros(n, 2, dtype=torch.long),
        latents=z,
        next_latents=z,
        log_probs=torch.zeros(n, 2),
        final_latents=torch.zeros(n, 1, 1, 1),
        images=np.zeros((n, 4, 4, 3), np.uint8),
    )


@pytest.mark.parametrize("on_failure", ["error", "drop"])
def test_failed_batch_is_an_error_or_dropped_and_counted(start_reward_server, tmp_path, on_failure):
    # The server refuses every second request (422): batch 1 of 3 has no reward.
    url = start_reward_server({"rewards": ["test_every_other_refused"]})
    cfg = tiny_config(
        tmp_path,
        sample={"batch_size": 3, "num_batches_per_epoch": 3},
        train={"batch_size": 3},
        reward={
            "name": "test_every_other_refused",
            "transport": "http",
            "urls": [url],
            "on_failure": on_failure,
        },
    )
    trainer = SimpleNamespace(cfg=cfg)  # gather_rewards only reads the config
    with make_reward_client(cfg.reward) as client:
        futures = []
        for b in range(3):
            futures.append(client.submit(batch(b), PROMPTS))
            futures[-1].exception(timeout=30)  # in order: the server counts requests
        if on_failure == "error":
            with pytest.raises(RewardRejectedError, match=r"HTTP 422.*refused request number 2"):
                Trainer.gather_rewards(trainer, _samples(9), futures)
            return
        kept, results, dropped = Trainer.gather_rewards(trainer, _samples(9), futures)
    assert dropped == 3 and len(kept) == 6 and len(results) == 2
    assert kept.prompts == ["p0", "p1", "p2", "p6", "p7", "p8"]
    assert kept.prompt_embeds.flatten().tolist() == [0, 1, 2, 6, 7, 8]
    np.testing.assert_array_equal(results[1].rewards, expected(batch(2)))


def test_close_cancels_pending_requests(start_reward_server, monkeypatch):
    monkeypatch.setenv("DDPO_TEST_REWARD_DELAY_S", "2.0")
    url = start_reward_server({"rewards": ["test_slow_jpeg"]})
    client = fast_client("test_slow_jpeg", [url])
    future = client.submit(batch(0), PROMPTS)
    threading.Timer(0.3, client.close).start()
    with pytest.raises(Exception):  # noqa: B017 - cancelled, whatever the exact type
        future.result(timeout=30)
    assert future.cancelled()


# --- one retryable set (shared/errors.py) --------------------------------------------------------

STATUSES = [400, 401, 404, 408, 409, 413, 415, 422, 429, 500, 501, 502, 503, 504, 505]


def scripted_client(answers: list[tuple[int, dict[str, str]]], **kwargs) -> tuple[HttpRewardClient, list]:
    """A client whose server answers ``answers`` in turn (then 200 with the right rewards), in process."""
    import httpx

    from shared import binary

    calls: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(time.monotonic())
        if len(calls) <= len(answers):
            status, headers = answers[len(calls) - 1]
            return httpx.Response(status, headers=headers, json={"error": "scripted", "reason": f"{status}"})
        parsed = binary.decode(request.read(), binary.Limits(64, 10**6, 10**8))
        rewards = [0.5] * len(parsed.prompts)
        body = {
            "request_id": parsed.request_id,
            "reward": parsed.reward,
            "rewards": rewards,
            "details": [{}] * len(rewards),
        }
        return httpx.Response(200, json=body)

    client = fast_client("jpeg_compressibility", ["http://stub.invalid"], **kwargs)
    client._client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return client, calls


@pytest.mark.parametrize("status", STATUSES)
def test_retries_exactly_the_retryable_statuses(status):
    from shared.errors import is_retryable_status

    client, calls = scripted_client([(status, {})] * 10, max_attempts=3, backoff_initial_s=0.01)
    with client:
        future = client.submit(batch(0), PROMPTS)
        if is_retryable_status(status):
            with pytest.raises(RewardUnavailableError, match=f"HTTP {status} .* after 3 attempts"):
                future.result(timeout=30)
            assert len(calls) == 3
        else:
            with pytest.raises(RewardRejectedError, match=f"HTTP {status}") as info:
                future.result(timeout=30)
            assert info.value.status == status and len(calls) == 1


def test_retry_after_is_honoured_over_a_shorter_backoff():
    client, calls = scripted_client([(503, {"Retry-After": "1"})], backoff_initial_s=0.01)
    with client:
        assert client.submit(batch(0), PROMPTS).result(timeout=30).rewards.tolist() == [0.5] * 3
    assert len(calls) == 2 and calls[1] - calls[0] >= 1.0


def test_a_retry_after_past_the_deadline_fails_at_once():
    client, calls = scripted_client([(429, {"Retry-After": "30"})], deadline_s=5.0)
    started = time.monotonic()
    with client, pytest.raises(RewardDeadlineError, match=r"would pass before attempt 2.*HTTP 429"):
        client.submit(batch(0), PROMPTS).result(timeout=30)
    assert len(calls) == 1 and time.monotonic() - started < 2.0
