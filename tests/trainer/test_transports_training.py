# ruff: noqa: F811  (pytest fixtures imported from tests.transport_support)
"""A tiny training run gives the same rewards over every transport: local, http (a real reward server
process, SIGKILLed and restarted while the epoch is in flight) and redis (two worker processes)."""

from __future__ import annotations

import re
import threading
import time

import httpx
import pytest

import tests.transport_rewards  # noqa: F401  (test_slow_jpeg in this process, for the local run)
from tests.trainer.conftest import tiny_config
from tests.transport_support import (  # noqa: F401  (fixtures)
    EXTRA_REWARDS,
    RedisServer,
    Workers,
    redis_server,
    reward_workers,
    subprocess_env,
)
from trainer.embedded import EmbeddedRewardServer
from trainer.train import Trainer

SMALL = {
    "sample": {"num_steps": 2, "batch_size": 2, "num_batches_per_epoch": 2, "resolution": 32},
    "train": {"batch_size": 2, "gradient_accumulation_steps": 1},
    "advantage": {"buffer_size": 4, "min_count": 2},
    "run": {"num_epochs": 1, "eval_num_images": 2, "save_every": 100},
}


def run(tmp_path, name: str, reward: dict) -> list[tuple]:
    sections = {k: dict(v) for k, v in SMALL.items()}
    sections["run"]["name"] = name
    cfg = tiny_config(tmp_path, **sections, reward={"name": "test_slow_jpeg", **reward})
    history = Trainer(cfg).run()
    return [
        (
            m["reward_mean"],
            m["reward_std"],
            m["reward_min"],
            m["eval_reward_mean"],
            m["loss"],
            m["num_dropped"],
        )
        for m in history
    ]


def inflight(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=2).text
    match = re.search(r"^ddpo_reward_inflight_requests (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


@pytest.mark.slow
def test_same_rewards_over_local_http_with_restart_and_redis(
    tmp_path, reward_workers: Workers, redis_server: RedisServer
):
    local = run(tmp_path, "local", {"transport": "local"})

    # http: the server scores in 1 s per batch; it is SIGKILLed while scoring the first batch and
    # comes back on the same port 1 s later. The client's retries (same request_id) carry the epoch.
    server = EmbeddedRewardServer(
        ["test_slow_jpeg"],
        extra_rewards_modules=[EXTRA_REWARDS],
        env=subprocess_env(DDPO_TEST_REWARD_DELAY_S="1.0"),
        log_path=tmp_path / "server.log",
    ).start()
    restarted = threading.Event()

    def crash_and_restart() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if inflight(server.url) >= 1:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.02)
        server.kill()
        time.sleep(1.0)
        server.start()
        restarted.set()

    killer = threading.Thread(target=crash_and_restart, daemon=True)
    killer.start()
    try:
        http = run(
            tmp_path,
            "http",
            {"transport": "http", "urls": [server.url], "max_attempts": 12, "backoff_max_s": 2.0},
        )
        killer.join(60)
        assert restarted.is_set()
    finally:
        server.stop()

    reward_workers.start("w1", delay_s=0.5)
    reward_workers.start("w2", delay_s=0.5)
    redis = run(tmp_path, "redis", {"transport": "redis", "redis_url": redis_server.url})
    r = redis_server.client()
    dead = r.xlen("ddpo:rewards:jobs:dead") if r.exists("ddpo:rewards:jobs:dead") else 0

    assert http == local
    assert redis == local
    assert local[0][-1] == 0  # nothing dropped
    assert dead == 0
