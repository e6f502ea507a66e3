"""The embedded reward server: the server's own CLI in a child process, configured by its command line.

``reward.server_settings`` go in a ``--config`` file (secrets: environment), plugins load
through ``--extra-rewards-module``, and ``--parent-pid`` stops the server when the trainer dies.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from reward_server.cli import settings_from_args
from reward_server.settings import ServerSettings
from trainer.embedded import EmbeddedRewardServer
from trainer.transports.errors import RewardRejectedError
from trainer.transports.http import HttpRewardClient

ROOT = Path(__file__).resolve().parent.parent.parent
PROBE = "tests.settings_probe_reward"
API_KEY = "0123456789abcdef"


def test_settings_reach_the_server_as_they_are(monkeypatch, tmp_path):
    """The child's command line and environment parse back to exactly the given settings, null
    (limit_concurrency: no limit, not the default 512) and empty lists included; secrets never in
    the command line or the (private) settings file."""
    for name in list(os.environ):
        if name.startswith("DDPO_REWARD_"):
            monkeypatch.delenv(name)
    settings = {
        "vlm_backend": "openai",
        "vlm_question": "what is --this?",
        "max_wait_ms": 2.5,
        "max_batch_size": 3,
        "cross_request_batching": False,
        "llava_strict_whole_word": True,
        "allowed_hosts": [],
        "limit_concurrency": None,
        "batching": {"jpeg_compressibility": {"max_batch_size": 2}},
        "aesthetic_mlp_path": None,
        "api_key": API_KEY,
        "vlm_api_key": "vlm-secret",
    }
    server = EmbeddedRewardServer(
        ["jpeg_compressibility", "jpeg_incompressibility"], port=1234, settings=settings
    )
    env = server._write_config()
    try:
        assert server.config_path is not None and server.config_path.stat().st_mode & 0o777 == 0o600
        stored = server.config_path.read_text()
        command = server.command()
    finally:
        server.stop()
    assert server.config_path is None
    for secret in (API_KEY, "vlm-secret"):
        assert secret not in " ".join(command) and secret not in stored  # not visible in ps
    assert env == {"DDPO_REWARD_API_KEY": API_KEY, "DDPO_REWARD_VLM_API_KEY": "vlm-secret"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    config = tmp_path / "config.json"
    config.write_text(stored)
    args = command[command.index("--config") :]
    args[1] = str(config)
    parsed, _ = settings_from_args(args)
    expected = ServerSettings(
        **settings, host="127.0.0.1", port=1234, rewards=["jpeg_compressibility", "jpeg_incompressibility"]
    )
    assert parsed.limit_concurrency is None and parsed.allowed_hosts == []
    assert parsed.model_dump() == expected.model_dump()


def test_embedded_server_gets_settings_plugins_and_secrets(tmp_path):
    server = EmbeddedRewardServer(
        ["test_settings_probe"],
        extra_rewards_modules=[PROBE],
        settings={"vlm_question": "how many cats?", "api_key": API_KEY},
        log_path=tmp_path / "server.log",
    )
    with server:
        assert API_KEY not in " ".join(server.command())
        with HttpRewardClient("test_settings_probe", [server.url], api_key=API_KEY) as client:
            result = client.submit(np.zeros((1, 8, 8, 3), np.uint8), ["a cat"]).result(60)
        assert result.details[0]["vlm_question"] == "how many cats?"
        with HttpRewardClient("test_settings_probe", [server.url], max_attempts=1) as client:
            with pytest.raises(RewardRejectedError, match="401"):
                client.submit(np.zeros((1, 8, 8, 3), np.uint8), ["a cat"]).result(60)


def test_embedded_server_exits_when_the_trainer_is_killed(tmp_path):
    # A stand-in trainer starts the server, reports it, and is then SIGKILLed (no clean-up runs).
    script = textwrap.dedent(
        f"""
        import time
        from trainer.embedded import EmbeddedRewardServer
        server = EmbeddedRewardServer(["jpeg_compressibility"], log_path={str(tmp_path / "server.log")!r})
        server.start()
        print(server.process.pid, server.url, flush=True)
        time.sleep(600)
        """
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in [str(ROOT), os.environ.get("PYTHONPATH")] if p),
    }
    trainer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    server_pid = None
    try:
        assert trainer.stdout is not None
        pid_text, url = trainer.stdout.readline().split()
        server_pid = int(pid_text)
        assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200
        trainer.send_signal(signal.SIGKILL)
        trainer.wait(10)
        deadline = time.monotonic() + 30
        while alive(server_pid):
            assert time.monotonic() < deadline, "the reward server outlived the trainer by 30 s"
            time.sleep(0.2)
    finally:
        trainer.kill()
        trainer.wait()
        if server_pid is not None and alive(server_pid):  # the test failed: leave no orphan behind
            os.kill(server_pid, signal.SIGKILL)


def alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper counts as gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status
