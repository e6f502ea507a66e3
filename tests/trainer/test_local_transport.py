"""The in-process ("local") transport is configured by the trainer's ``reward.server_settings`` alone."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from pydantic import ValidationError

import tests.settings_probe_reward  # noqa: F401  (registers test_settings_probe)
from trainer.config import build_config
from trainer.reward_client import make_reward_client

DEFAULT_VLM_MODEL = "llava-hf/llava-1.5-7b-hf"  # ServerSettings' default


def probe(server_settings: dict) -> dict:
    cfg = build_config(
        "tiny",
        {"reward": {"name": "test_settings_probe", "transport": "local", "server_settings": server_settings}},
    )
    with make_reward_client(cfg.reward) as client:
        result = client.submit(np.zeros((1, 8, 8, 3), np.uint8), ["a cat"]).result(60)
    return result.details[0]


def test_reward_server_environment_does_not_configure_the_local_scorer(monkeypatch):
    # Variables meant for a reward server on this machine; the old code let them override the
    # defaults of what the trainer's config leaves unset.
    monkeypatch.setenv("DDPO_REWARD_VLM_MODEL", "model-from-the-environment")
    monkeypatch.setenv("DDPO_REWARD_DEVICE", "meta")
    seen = probe({"vlm_question": "how many cats?"})
    assert seen == {"device": "cpu", "vlm_model": DEFAULT_VLM_MODEL, "vlm_question": "how many cats?"}


def test_a_bad_reward_server_variable_does_not_fail_a_local_run(monkeypatch):
    monkeypatch.setenv("DDPO_REWARD_API_KEY", "short")  # the server would refuse it (< 8 characters)
    assert probe({})["vlm_model"] == DEFAULT_VLM_MODEL


def test_local_server_settings_are_still_validated():
    with pytest.raises(ValidationError, match="no_such_setting"):
        probe({"no_such_setting": 1})
    with pytest.raises(ValidationError, match=r"must contain '\{prompt\}'"):
        probe({"bertscore_reference_template": "no placeholder"})


def test_close_releases_the_scorer():
    """close() ends the scoring loop after the scorer's own ``aclose`` ran on it (a VLM scorer's
    HTTP pool)."""
    from trainer.transports.local import LocalRewardClient

    client = LocalRewardClient("jpeg_compressibility")
    closed = []

    async def aclose() -> None:
        closed.append(asyncio.get_running_loop())

    client.scorer.aclose = aclose  # type: ignore[method-assign]
    loop = client._loop.loop
    client.close()
    assert closed == [loop] and loop.is_closed()
