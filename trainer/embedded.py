"""Run the reward server as its own process on a free loopback port, for one training run.

The laptop default shows the real architecture: trainer and reward server are two processes
talking HTTP on loopback. ``reward.embed_server: true`` (transport ``http``, no ``urls``) makes
the trainer start one with ``EmbeddedRewardServer``; it waits for ``/readyz`` and stops the server
when the client closes, at interpreter exit, or when the trainer process dies.

    with EmbeddedRewardServer(["jpeg_compressibility"]) as server:
        client = HttpRewardClient("jpeg_compressibility", [server.url])

The child is the server's own entry point, ``python -m reward_server.cli`` (``ddpo-reward-server``),
configured by its public command line: ``--parent-pid`` (it exits when the trainer is gone),
``--extra-rewards-module`` (plugins registering more rewards), and ``--config FILE`` holding
``reward.server_settings`` (a private JSON file, removed once the server is up). Secrets
(``*api_key``) go by environment instead: command lines are visible to other users in ``ps``.
Nothing here imports the reward server.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


SECRET_SETTINGS = ("api_key", "vlm_api_key")  # sent as DDPO_REWARD_<NAME>, never on the command line


def split_settings(settings: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """(the settings for the server's ``--config`` file, environment for the secret ones).

    A file, not flags, because it spells every value as it is: ``null`` (e.g. ``limit_concurrency``:
    no limit), empty lists, mappings. Secrets go by environment: the file is private (0600) but
    outlives nothing it need not, and the environment is what the server documents for them.
    """
    values: dict[str, Any] = {}
    env: dict[str, str] = {}
    for name, value in settings.items():
        if name in SECRET_SETTINGS:
            if value is not None:
                env[f"DDPO_REWARD_{name.upper()}"] = str(value)
        else:
            values[name] = value
    return values, env


class EmbeddedRewardServer:
    """A ``ddpo-reward-server`` child process on ``127.0.0.1:<port>`` serving ``rewards``."""

    def __init__(
        self,
        rewards: Sequence[str],
        *,
        port: int | None = None,
        extra_args: Sequence[str] = (),
        extra_rewards_modules: Sequence[str] = (),
        settings: Mapping[str, Any] | None = None,
        env: dict[str, str] | None = None,
        startup_timeout_s: float = 300.0,
        log_path: str | Path | None = None,
    ):
        self.rewards = list(rewards)
        self.port = port
        self.extra_args = list(extra_args)
        self.extra_rewards_modules = list(extra_rewards_modules)
        self.settings = dict(settings or {})
        self.env = env
        self.startup_timeout_s = startup_timeout_s
        self.log_path = Path(log_path) if log_path else None
        self.process: subprocess.Popen[bytes] | None = None
        self.config_path: Path | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("the embedded reward server is not started")
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        """The server's own CLI: ``settings`` in a ``--config`` file; the flags (``extra_args``
        last) win over it."""
        cmd = [sys.executable, "-m", "reward_server.cli", "--parent-pid", str(os.getpid())]
        for module in self.extra_rewards_modules:
            cmd += ["--extra-rewards-module", module]
        if self.config_path is not None:
            cmd += ["--config", str(self.config_path)]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port), "--rewards", *self.rewards]
        return cmd + self.extra_args

    def _write_config(self) -> dict[str, str]:
        """The settings file (private; removed once the server is up); returns the secrets' environment."""
        values, env = split_settings(self.settings)
        values = {k: v for k, v in values.items() if k not in ("host", "port", "rewards")}
        fd, name = tempfile.mkstemp(prefix="ddpo-reward-server-", suffix=".json")  # mode 0600
        with os.fdopen(fd, "w") as file:
            json.dump(values, file)
        self.config_path = Path(name)
        return env

    def start(self) -> EmbeddedRewardServer:
        if self.process is not None and self.process.poll() is None:
            return self
        if self.port is None:
            self.port = free_loopback_port()
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="ddpo-reward-server-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        env = dict(os.environ if self.env is None else self.env)
        env.update(self._write_config())
        # The child must import this checkout's packages even when run from elsewhere.
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in [root, env.get("PYTHONPATH", "")] if p)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        atexit.register(self.stop)
        self._wait_ready()
        self._remove_config()  # read at start-up only
        return self

    def _remove_config(self) -> None:
        if self.config_path is not None:
            self.config_path.unlink(missing_ok=True)
            self.config_path = None

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        assert self.process is not None
        while True:
            code = self.process.poll()
            if code is not None:
                raise RuntimeError(
                    f"the reward server exited with code {code} during start-up; its log "
                    f"({self.log_path}) ends with:\n{self.log_tail()}"
                )
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(
                    f"the reward server on {self.url} was not ready within {self.startup_timeout_s:g} s; "
                    f"log ({self.log_path}):\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def log_tail(self, lines: int = 30) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (uvicorn shuts down gracefully), SIGKILL if it does not exit within ``timeout``."""
        process, self.process = self.process, None
        self._remove_config()
        if process is None:
            return
        atexit.unregister(self.stop)
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def kill(self) -> None:
        """SIGKILL, no clean-up (tests of a crashing server)."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def __enter__(self) -> EmbeddedRewardServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
