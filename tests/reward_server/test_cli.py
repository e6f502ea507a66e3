"""``ddpo-reward-server`` and ``ddpo-reward-worker`` command lines: flags, config files, --help, and
the server as a real process under uvicorn with one and two workers."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import numpy as np
import pytest
from pydantic_settings import BaseSettings

from reward_server.cli import settings_from_args
from reward_server.settings import ScoringSettings, ServerSettings
from reward_server.worker import WorkerSettings
from reward_server.worker import settings_from_args as worker_settings_from_args
from shared.cli import CommandLineError
from shared.codec import encode_png_b64
from tests.reward_server.server_utils import wait_ready

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


# --- one mechanism for both programs: pydantic-settings flags from the settings models -----------


def squeezed(text: str) -> str:
    """Help text without whitespace: argparse wraps lines (and breaks words at hyphens)."""
    return re.sub(r"\s+", "", text)


def run_help(module: str) -> str:
    return subprocess.run(
        [sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout


def assert_documents(help_text: str, settings_cls: type[BaseSettings], env_prefix: str) -> None:
    """Every field is a flag whose help line carries the field's description and variable."""
    text = squeezed(help_text)
    for name, field in settings_cls.model_fields.items():
        flag = "--" + name.replace("_", "-")
        assert re.search(rf"{re.escape(flag)}\b", help_text), f"{flag} missing from --help"
        assert field.description and squeezed(field.description) in text, f"{name}: description missing"
        assert f"{env_prefix}{name.upper()}" in help_text, f"{name}: variable missing"


def test_server_help_documents_every_setting():
    out = run_help("reward_server.cli")
    assert_documents(out, ServerSettings, "DDPO_REWARD_")
    for flag in ["--config", "--extra-rewards-module", "--parent-pid"]:
        assert flag in out


def test_worker_help_shows_only_the_worker_flags():
    out = run_help("reward_server.worker")
    flags = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", out))
    for server_only in ["--host", "--port", "--workers", "--api-key", "--allowed-hosts", "--parent-pid"]:
        assert server_only not in flags, f"{server_only} does nothing for a worker"
    assert "--allow-insecure-remote" not in flags
    assert_documents(out, WorkerSettings, "DDPO_WORKER_")
    assert_documents(out, ScoringSettings, "DDPO_REWARD_")
    for flag in ["--config", "--extra-rewards-module", "--redis-url", "--concurrency", "--rewards"]:
        assert flag in flags
    expected = {"--help", "--config", "--extra-rewards-module"}
    for name, field in [*WorkerSettings.model_fields.items(), *ScoringSettings.model_fields.items()]:
        expected.add("--" + name.replace("_", "-"))
        if field.annotation is bool:
            expected.add("--no-" + name.replace("_", "-"))
    assert flags == expected


def test_worker_refuses_server_flags():
    with pytest.raises(CommandLineError, match="unrecognized arguments: --host"):
        worker_settings_from_args(["--host", "0.0.0.0"])
    proc = subprocess.run(
        [sys.executable, "-m", "reward_server.worker", "--api-key", "k" * 16],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "--api-key" in proc.stderr and "k" * 16 not in proc.stderr


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def test_server_config_file_yaml_between_flags_and_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("DDPO_REWARD_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("DDPO_REWARD_MAX_WAIT_MS", "9")
    config = write_yaml(
        tmp_path / "server.yaml",
        """
        port: 9300
        max_batch_size: 64          # the file beats the environment
        rewards: [jpeg_incompressibility]
        batching: {jpeg_incompressibility: {max_batch_size: 4}}
        cross_request_batching: false
        """,
    )
    s, given = settings_from_args(["--config", str(config), "--port", "9301"])
    assert s.port == 9301  # the flag beats the file
    assert s.max_batch_size == 64 and s.max_wait_ms == 9  # file > environment > default
    assert s.rewards == ["jpeg_incompressibility"] and s.cross_request_batching is False
    assert s.batching_for("jpeg_incompressibility")[0] == 4
    assert set(given) == {"port", "max_batch_size", "rewards", "batching", "cross_request_batching"}
    json_config = tmp_path / "server.json"
    json_config.write_text('{"max_queue_images": 2048}')
    assert settings_from_args(["--config", str(json_config)])[0].max_queue_images == 2048


def test_worker_config_file_yaml_splits_worker_and_scoring_settings(tmp_path):
    config = write_yaml(
        tmp_path / "worker.yaml",
        """
        redis_url: redis://redis.internal:6379/1
        concurrency: 8
        rewards: [jpeg_compressibility]
        max_batch_size: 16
        """,
    )
    worker, scoring = worker_settings_from_args(["--config", str(config), "--concurrency", "2"])
    assert worker.redis_url == "redis://redis.internal:6379/1" and worker.concurrency == 2
    assert scoring.rewards == ["jpeg_compressibility"] and scoring.max_batch_size == 16
    assert isinstance(scoring, ScoringSettings) and not isinstance(scoring, ServerSettings)
    bad = write_yaml(tmp_path / "bad.yaml", "host: 0.0.0.0\n")
    with pytest.raises(CommandLineError, match=r"unknown settings \['host'\]"):
        worker_settings_from_args(["--config", str(bad)])


@pytest.mark.parametrize(
    ("module", "args", "field"),
    [
        ("reward_server.cli", ["--max-batch-size", "lots"], "max_batch_size"),
        ("reward_server.cli", ["--vlm-backend", "nope"], "vlm_backend"),
        ("reward_server.worker", ["--concurrency", "0"], "concurrency"),
        ("reward_server.worker", ["--max-wait-ms", "soon"], "max_wait_ms"),
        ("reward_server.worker", ["--rewards", "no_such_reward"], "rewards"),
    ],
)
def test_bad_values_exit_2_naming_the_field(module, args, field):
    proc = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2, proc.stderr
    assert re.search(rf"^\s+{field}: ", proc.stderr, re.MULTILINE), proc.stderr


def test_bad_value_in_a_config_file_names_the_field(tmp_path):
    config = write_yaml(tmp_path / "s.yaml", "max_batch_size: 0\n")
    proc = run_cli("--config", str(config))
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "max_batch_size:" in out
    broken = write_yaml(tmp_path / "broken.yaml", "max_batch_size: [\n")
    proc = run_cli("--config", str(broken))
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "broken.yaml" in out
