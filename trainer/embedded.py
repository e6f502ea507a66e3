"""Run the reward server as its own process on a free loopback port, for one training run.

The laptop default shows the real architecture: trainer and reward server are two processes
talking HTTP on loopback. ``reward.embed_server: true`` (transport ``http``, no ``urls``) makes
the trainer start one with ``EmbeddedRewardServer``; it waits for ``/readyz`` and stops the server
when the client closes, at interpreter exit, or when the trainer process dies.

    with EmbeddedRewardServer(["jpeg_compressibility"]) as server:
        client = HttpRewardClient("jpeg_compressibility", [server.url])

``python -m trainer.embedded [--extra-rewards-module M ...] -- <ddpo-reward-server flags>`` is
the server command it runs (the extra modules may register more rewards first).
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import httpx


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _exit_with_parent(parent_pid: int) -> None:
    """In the server process: SIGTERM ourselves once the trainer is gone (killed without clean-up).

    (Not prctl(PR_SET_PDEATHSIG): it fires when the *thread* that started the server exits.)
    """

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


class EmbeddedRewardServer:
    """A ``ddpo-reward-server`` child process on ``127.0.0.1:<port>`` serving ``rewards``."""

    def __init__(
        self,
        rewards: Sequence[str],
        *,
        port: int | None = None,
        extra_args: Sequence[str] = (),
        extra_rewards_modules: Sequence[str] = (),
        env: dict[str, str] | None = None,
        startup_timeout_s: float = 300.0,
        log_path: str | Path | None = None,
    ):
        self.rewards = list(rewards)
        self.port = port
        self.extra_args = list(extra_args)
        self.extra_rewards_modules = list(extra_rewards_modules)
        self.env = env
        self.startup_timeout_s = startup_timeout_s
        self.log_path = Path(log_path) if log_path else None
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("the embedded reward server is not started")
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "trainer.embedded", "--parent-pid", str(os.getpid())]
        for module in self.extra_rewards_modules:
            cmd += ["--extra-rewards-module", module]
        cmd += ["--", "--host", "127.0.0.1", "--port", str(self.port), "--rewards", *self.rewards]
        return cmd + self.extra_args

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
        return self

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


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m trainer.embedded [--parent-pid P] [--extra-rewards-module M ...] -- <server flags>``."""
    args = list(sys.argv[1:] if argv is None else argv)
    split = args.index("--") if "--" in args else len(args)
    own, server_args = args[:split], args[split + 1 :]
    modules = [own[i + 1] for i, a in enumerate(own[:-1]) if a == "--extra-rewards-module"]
    parents = [int(own[i + 1]) for i, a in enumerate(own[:-1]) if a == "--parent-pid"]
    if parents:
        _exit_with_parent(parents[0])
    from reward_server.cli import main as server_main
    from reward_server.worker import import_extra_rewards

    import_extra_rewards(modules)
    server_main(server_args)


if __name__ == "__main__":
    main()
