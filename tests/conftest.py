"""Shared fixtures. Tiny models are built once per session into a temporary cache."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.fixture(scope="session", autouse=True)
def _tiny_model_cache(tmp_path_factory):
    """Build the tiny SD once per test session, in a private cache (never the user's ~/.cache)."""
    if "DDPO_CACHE" not in os.environ:
        os.environ["DDPO_CACHE"] = str(tmp_path_factory.mktemp("ddpo-cache"))
    torch.set_num_threads(min(2, torch.get_num_threads()))
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA (no GPU on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


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
