"""Shared fixtures. Tiny models are built once per session into a temporary cache."""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings

import pytest
import torch

warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.fixture(scope="session", autouse=True)
def _tiny_model_cache():
    """Build the tiny SD once per test session, in a private cache (never the user's ~/.cache).

    Not under pytest's basetemp: pytest prunes old basetemps, which would delete the cache under a
    still-running session when several sessions run side by side.
    """
    own = "DDPO_CACHE" not in os.environ
    if own:
        os.environ["DDPO_CACHE"] = tempfile.mkdtemp(prefix="ddpo-test-cache-")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    yield
    if own:
        shutil.rmtree(os.environ.pop("DDPO_CACHE"), ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA (no GPU on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


# The real-uvicorn reward-server fixture, for every test folder (defined in tests/reward_server).
from tests.reward_server.server_utils import start_reward_server  # noqa: E402, F401  (fixture)
