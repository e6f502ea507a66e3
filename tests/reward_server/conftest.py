"""Fixtures for the reward-server tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def captioner_folder() -> Path:
    """The digits captioner, built once per session (about a minute) into the session's private cache.

    tests/conftest.py points DDPO_CACHE at a temporary folder (autouse, set up before this), so the
    server's ``captioner_path=builtin`` finds this same build.
    """
    from reward_server.vlm.captioner import ensure_captioner

    assert "DDPO_CACHE" in os.environ
    return ensure_captioner(progress=False)
