# ruff: noqa: F811  (pytest fixtures imported from tests.transport_support)
"""The compose topology minus containers: the processes docker-compose.yml starts, started here as
plain processes on loopback — redis, the reward server, one reward worker, and a 2-rank gloo
trainer under torchrun — and a short run of the tiny preset completes through both transports."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from tests.transport_support import (  # noqa: F401  (fixtures)
    RedisServer,
    Workers,
    redis_server,
    reward_workers,
    subprocess_env,
)
from trainer.embedded import EmbeddedRewardServer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_compose_topology_as_plain_processes(tmp_path, redis_server: RedisServer, reward_workers: Workers):
    reward_workers.start("worker-1")  # the compose `reward-worker` service
    server = EmbeddedRewardServer(["jpeg_compressibility"], log_path=tmp_path / "server.log").start()
    try:
        # One reward over HTTP (the `reward-server` service), one over Redis (the workers), summed.
        components = [
            {"name": "jpeg_compressibility", "weight": 1.0, "transport": "http", "urls": [server.url]},
            {"name": "jpeg_incompressibility", "weight": 0.5, "transport": "redis"},
        ]
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
            "--master-port", str(_free_port()), "-m", "trainer", "--preset", "tiny",
            "--reward.components", json.dumps(components), "--reward.redis_url", redis_server.url,
            "--run.output_dir", str(tmp_path), "--run.name", "compose", "--run.num_epochs", "2",
            "--run.progress", "false", "--run.eval_num_images", "2",
            "--sample.num_steps", "3", "--sample.resolution", "32", "--sample.batch_size", "4",
            "--sample.num_batches_per_epoch", "2", "--train.batch_size", "4",
        ]  # fmt: skip
        proc = subprocess.run(
            cmd, env=subprocess_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=900
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
    finally:
        server.stop()

    run_dir = tmp_path / "compose"
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # Epoch -1: the base model's eval, before training.
    assert [m["epoch"] for m in metrics] == [-1, 0, 1] and all(m["world_size"] == 2 for m in metrics)
    rows = [json.loads(line) for line in (run_dir / "samples/epoch_0001.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 2 * 4  # ranks x batches x batch size
    for row in rows:  # each sample's reward is the weighted sum of what both services returned
        kb_http = row["details"]["jpeg_compressibility"]["jpeg_kb"]
        kb_redis = row["details"]["jpeg_incompressibility"]["jpeg_kb"]
        assert kb_http == kb_redis
        assert row["reward"] == pytest.approx(-kb_http + 0.5 * kb_redis)
    assert (run_dir / "checkpoints/epoch_0002/lora/pytorch_lora_weights.safetensors").exists()
