"""Run a real reward server (uvicorn, loopback, free port) inside the test process.

Reusable by any test that needs one (HTTP/Redis transport tests included): the
``start_reward_server`` fixture below is exported by tests/reward_server/conftest.py; elsewhere,
``from tests.reward_server.server_utils import start_reward_server  # noqa: F401`` in a conftest.

    def test_x(start_reward_server):
        base_url = start_reward_server({"rewards": ["jpeg_compressibility"]})

The server runs in a thread with its own event loop; the fixture stops it at teardown.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI


@dataclass
class RunningServer:
    base_url: str
    app: FastAPI
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)


def free_loopback_socket() -> socket.socket:
    """A bound, not yet listening loopback socket; handing it to uvicorn avoids a port race."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def serve_app_in_thread(
    app: FastAPI, wait_path: str | None = "/healthz", timeout: float = 30.0
) -> RunningServer:
    """Serve any ASGI app on a free loopback port in a daemon thread; wait until ``wait_path`` answers 200."""
    sock = free_loopback_socket()
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)

    def run() -> None:
        asyncio.run(server.serve(sockets=[sock]))

    thread = threading.Thread(target=run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    base_url = f"http://127.0.0.1:{port}"
    running = RunningServer(base_url, app, server, thread)
    deadline = time.monotonic() + timeout
    while True:
        if not thread.is_alive():
            raise RuntimeError("the server thread died during start-up")
        if server.started:
            if wait_path is None:
                break
            try:
                if httpx.get(base_url + wait_path, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
        if time.monotonic() > deadline:
            running.stop()
            raise TimeoutError(f"server on {base_url} not answering {wait_path} within {timeout} s")
        time.sleep(0.02)
    return running


def start_reward_server_thread(
    settings_overrides: dict[str, Any] | None = None, wait_ready: bool = True, timeout: float = 60.0
) -> RunningServer:
    """Start ``create_app(ServerSettings(**overrides))``; wait for /readyz (or only until it listens)."""
    from reward_server.app import create_app
    from reward_server.settings import ServerSettings

    settings = ServerSettings(**(settings_overrides or {}))
    app = create_app(settings)
    return serve_app_in_thread(app, "/readyz" if wait_ready else None, timeout)


@pytest.fixture
def start_reward_server() -> Iterator[Callable[..., str]]:
    """Factory fixture: ``start_reward_server(settings_overrides, wait_ready=True) -> base_url``.

    A real uvicorn server on a free loopback port (thread in this process), stopped at teardown.
    ``start_reward_server.servers[-1].app`` gives the app for white-box checks. To use it outside
    tests/reward_server, import it into that directory's conftest.py.
    """
    servers: list[RunningServer] = []

    def start(settings_overrides: dict[str, Any] | None = None, wait_ready: bool = True) -> str:
        running = start_reward_server_thread(settings_overrides, wait_ready=wait_ready)
        servers.append(running)
        return running.base_url

    start.servers = servers  # type: ignore[attr-defined]
    yield start
    for running in servers:
        running.stop()


def wait_ready(base: str, proc: subprocess.Popen | None = None, timeout: float = 60) -> None:
    """Poll ``base``/readyz until 200; fail early with its output if the server process ``proc`` exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"server exited: {proc.stdout.read() if proc.stdout else ''}")
        try:
            if httpx.get(base + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise AssertionError("server never became ready")
