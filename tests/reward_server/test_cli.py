"""``ddpo-reward-server`` as a real process: flags, uvicorn, one and two workers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from shared.codec import encode_png_b64

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "reward_server.cli", *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_ready(base: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {proc.stdout.read()}")
        try:
            if httpx.get(base + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("server never became ready")


@pytest.mark.parametrize("workers", [1, 2])
def test_serves_with_flags_over_env(workers):
    port = free_port()
    flags = ["--port", str(port), "--workers", str(workers), "--rewards", "jpeg_incompressibility"]
    env = {"DDPO_REWARD_API_KEY": "k" * 16, "DDPO_REWARD_REWARDS": '["jpeg_compressibility"]'}
    proc = run_cli(*flags, "--log-level", "warning", env=env)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, proc)
        auth = {"Authorization": "Bearer " + "k" * 16}
        assert httpx.get(base + "/rewards", headers=auth).json() == {"rewards": ["jpeg_incompressibility"]}
        image = encode_png_b64(np.zeros((8, 8, 3), np.uint8))
        body = {"request_id": "cli", "reward": "jpeg_incompressibility", "images": [image], "prompts": ["p"]}
        for _ in range(4):  # with two workers, requests land on both
            response = httpx.post(base + "/score", json=body, headers=auth, timeout=30)
            assert response.status_code == 200, response.text
            assert response.json()["rewards"][0] > 0
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_refuses_bad_settings():
    proc = run_cli("--host", "0.0.0.0", "--api-key", "a-secret-value", "--port", "70000")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "port" in out and "a-secret-value" not in out
    proc = run_cli("--host", "0.0.0.0")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "refusing to bind non-loopback host" in out


def test_help_documents_the_flags():
    out = subprocess.run(
        [sys.executable, "-m", "reward_server.cli", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for flag in ["--host", "--port", "--workers", "--api-key", "--rewards", "DDPO_REWARD_API_KEY"]:
        assert flag in out
