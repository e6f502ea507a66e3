"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

# --- reward server ----------------------------------------------------------------------------


@pytest.fixture
def start_reward_server() -> Iterator[Callable[..., str]]:
    """Factory: ``start_reward_server(settings_overrides, wait_ready=True) -> base_url``.

    A real uvicorn server on a free loopback port (thread in this process), stopped at teardown.
    The app object is reachable as ``start_reward_server.servers[-1].app`` for white-box checks.
    """
    from tests.reward_server.server_utils import RunningServer, start_reward_server_thread

    servers: list[RunningServer] = []

    def start(settings_overrides: dict[str, Any] | None = None, wait_ready: bool = True) -> str:
        running = start_reward_server_thread(settings_overrides, wait_ready=wait_ready)
        servers.append(running)
        return running.base_url

    start.servers = servers  # type: ignore[attr-defined]
    yield start
    for running in servers:
        running.stop()
