"""The binary codec through the trainer's transports: the default, and the same rewards as JSON."""

from __future__ import annotations

import numpy as np
import pytest

from reward_server.rewards.jpeg import JpegCompressibility
from trainer.config import build_config
from trainer.reward_client import make_reward_client
from trainer.transports.http import HttpRewardClient

PROMPTS = ["a cat", "a dog", "a horse", "a cow"]


def batch(seed: int, n: int, size: int) -> np.ndarray:
    """n images of size x (size + 8): not square, so a transposed decoding would show."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0 : size + 8]
    smooth = (x * rng.uniform(1, 4) + y * rng.uniform(1, 4))[None, ..., None]
    return np.clip(smooth + rng.normal(0, 12, (n, size, size + 8, 3)), 0, 255).astype(np.uint8)


def body_bytes(start_reward_server, codec: str) -> float:
    registry = start_reward_server.servers[0].app.state.metrics.registry
    return registry.get_sample_value("ddpo_reward_body_bytes_total", {"codec": codec}) or 0.0


def test_http_sends_binary_by_default_and_both_codecs_give_identical_rewards(start_reward_server):
    url = start_reward_server({"rewards": ["jpeg_compressibility", "jpeg_incompressibility"]})
    cfg = build_config("tiny", {"reward": {"transport": "http", "urls": [url]}})
    assert cfg.reward.codec == "binary"
    batches = [batch(i, n, size) for i, (n, size) in enumerate([(1, 16), (4, 32), (3, 64)])]
    results = {}
    for codec in ("binary", "json"):
        if codec == "binary":
            client = make_reward_client(cfg.reward)  # what ddpo-train builds
        else:
            client = HttpRewardClient("jpeg_compressibility", [url], codec="json")
        with client:
            results[codec] = [client.submit(b, PROMPTS[: len(b)]).result(timeout=30) for b in batches]
        if codec == "binary":  # the server read safetensors bodies, no JSON
            assert body_bytes(start_reward_server, "binary") >= sum(b.nbytes for b in batches)
            assert body_bytes(start_reward_server, "json") == 0
    assert body_bytes(start_reward_server, "json") > 0
    for b, by_binary, by_json in zip(batches, results["binary"], results["json"], strict=True):
        np.testing.assert_array_equal(by_binary.rewards, by_json.rewards)
        assert by_binary.details == by_json.details
        outputs = JpegCompressibility().score(list(b), PROMPTS[: len(b)], [{}] * len(b))
        np.testing.assert_array_equal(by_binary.rewards, [o.reward for o in outputs])


def test_unknown_codec_is_refused():
    with pytest.raises(ValueError, match="unknown codec 'png'; valid: binary, json"):
        HttpRewardClient("jpeg_compressibility", ["http://127.0.0.1:9"], codec="png")
