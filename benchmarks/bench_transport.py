"""How much does a slow reward service cost the training loop? (docs/transport.md has a recorded run.)

1. The tiny training loop (sample -> reward -> update), one epoch per setting, rewards from a real
   reward server process whose scorer sleeps L seconds per batch (``test_slow_jpeg``), for L below,
   equal to and above the measured sampling time S of one batch; epoch time (sampling + reward wait
   + update, without the eval grid) relative to the same loop with an instant in-process reward.
   Asynchronous: the trainer's normal path (submit, keep sampling). Synchronous baseline: the reward
   of each batch is fetched right after it is sampled (what the reference implementations do).
2. Reward throughput with N Redis workers (each scores one batch per L seconds): batches/s for
   N = 1, 2, 4, against the sampler's 1/S batches/s.

    python benchmarks/bench_transport.py [--batches 4] [--steps 4] [--ratios 0.5 1 2] [--workers 1 2 4]
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import tests.transport_rewards  # noqa: E402, F401  (registers test_slow_jpeg)
from tests.trainer.conftest import tiny_config  # noqa: E402
from trainer.embedded import EmbeddedRewardServer, free_loopback_port  # noqa: E402
from trainer.reward_client import RewardClient, RewardResult, make_reward_client  # noqa: E402
from trainer.train import Trainer  # noqa: E402
from trainer.transports.redis import RedisRewardClient  # noqa: E402

EXTRA = "tests.transport_rewards"


class SynchronousClient(RewardClient):
    """The baseline: every submit waits for its reward before sampling continues."""

    def __init__(self, inner: RewardClient):
        self.inner = inner

    def submit(
        self,
        images: np.ndarray,
        prompts: Sequence[str],
        metadata: Sequence[dict[str, Any]] | None = None,
        request_id: str | None = None,
    ) -> Future[RewardResult]:
        future = self.inner.submit(images, prompts, metadata, request_id)
        future.result()
        return future

    def close(self) -> None:
        self.inner.close()


def epoch_time(
    output: Path,
    batches: int,
    reward: dict[str, Any],
    wrap_sync: bool = False,
    steps: int = 4,
    repeats: int = 3,
) -> dict[str, float]:
    cfg = tiny_config(
        output,
        sample={"num_steps": steps, "batch_size": 2, "num_batches_per_epoch": batches, "resolution": 32},
        train={"batch_size": 2, "gradient_accumulation_steps": 1},
        advantage={"buffer_size": 4, "min_count": 2},
        run={
            "num_epochs": repeats + 1,
            "eval_num_images": 2,
            "eval_every": 1000,
            "save_every": 1000,
            "name": "bench",
        },
        reward=reward,
    )
    client = make_reward_client(cfg.reward)
    if wrap_sync:
        client = SynchronousClient(client)
    trainer = Trainer(cfg, reward_client=client)
    runs = []
    try:
        # Epoch 0 warms up; the median of the next ``repeats`` epochs damps other load on the machine.
        for epoch in range(repeats + 1):
            m = trainer.train_epoch(epoch)
            total = m["time_sampling_s"] + m["time_reward_wait_s"] + m["time_training_s"]
            runs.append({"total": total, "sampling": m["time_sampling_s"], "wait": m["time_reward_wait_s"]})
    finally:
        client.close()
    runs = sorted(runs[1:], key=lambda r: r["total"])
    return runs[len(runs) // 2]


def loop_table(output: Path, batches: int, ratios: Sequence[float], steps: int, repeats: int) -> None:
    base = epoch_time(
        output, batches, {"name": "jpeg_compressibility", "transport": "local"}, steps=steps, repeats=repeats
    )
    per_batch = base["sampling"] / batches
    print(
        f"instant in-process reward: epoch {base['total']:.2f} s (sampling {base['sampling']:.2f} s = "
        f"S {per_batch:.2f} s/batch x {batches}, reward wait {base['wait']:.2f} s)"
    )
    header = f"{'L/S':>5} {'L (s)':>7} | {'async epoch':>12} {'ratio':>6} {'wait':>6}"
    print(f"{header} | {'sync epoch':>11} {'ratio':>6}")
    for ratio in ratios:
        delay = ratio * per_batch
        env = dict(os.environ, DDPO_TEST_REWARD_DELAY_S=f"{delay:.3f}")
        with EmbeddedRewardServer(["test_slow_jpeg"], extra_rewards_modules=[EXTRA], env=env) as server:
            reward = {"name": "test_slow_jpeg", "transport": "http", "urls": [server.url]}
            async_t = epoch_time(output, batches, reward, steps=steps, repeats=repeats)
            sync_t = epoch_time(output, batches, reward, wrap_sync=True, steps=steps, repeats=repeats)
        a, s, b = async_t["total"], sync_t["total"], base["total"]
        print(
            f"{ratio:>5.2f} {delay:>7.2f} | {a:>10.2f} s {a / b:>6.2f} {async_t['wait']:>5.2f}s "
            f"| {s:>9.2f} s {s / b:>6.2f}"
        )


def worker_scaling(workers: Sequence[int], delay: float, jobs: int) -> None:
    binary = shutil.which("redis-server")
    if binary is None:
        print("no redis-server: skipping the worker scaling (scripts/ensure-test-services.sh)")
        return
    port = free_loopback_port()
    redis_proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""], stdout=subprocess.DEVNULL
    )
    url = f"redis://127.0.0.1:{port}/0"
    env = dict(os.environ, DDPO_TEST_REWARD_DELAY_S=str(delay), PYTHONPATH=str(ROOT))
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    print(f"\nRedis workers, each scoring one batch per L = {delay:.2f} s; {jobs} batches submitted at once:")
    try:
        time.sleep(0.3)
        for n in workers:
            procs = []
            logs = []
            for i in range(n):
                log = tempfile.NamedTemporaryFile(prefix=f"worker{i}-", suffix=".log", delete=False)
                logs.append(Path(log.name))
                procs.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "reward_server.worker",
                            "--redis-url",
                            url,
                            "--consumer",
                            f"n{n}-w{i}",
                            "--extra-rewards-module",
                            EXTRA,
                            "--rewards",
                            "test_slow_jpeg",
                            "--concurrency",
                            "1",
                        ],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env=env,
                    )
                )
            while not all("ready on stream" in p.read_text() for p in logs):
                time.sleep(0.05)
            with RedisRewardClient("test_slow_jpeg", url, deadline_s=600) as client:
                started = time.perf_counter()
                futures = [client.submit(images, ["a cat", "a dog"]) for _ in range(jobs)]
                for f in futures:
                    f.result()
                elapsed = time.perf_counter() - started
            print(f"  N = {n}: {jobs / elapsed:6.2f} batches/s ({elapsed:.2f} s; ideal {n / delay:.2f})")
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(30)
    finally:
        redis_proc.terminate()
        redis_proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", type=int, default=4, help="sampling batches per epoch")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps (sampling and update cost)")
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs per setting (median)")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 1.0, 2.0], help="L / S values")
    parser.add_argument(
        "--workers", type=int, nargs="+", default=[1, 2, 4], help="worker counts to scale over"
    )
    parser.add_argument("--worker-delay", type=float, default=0.5, help="L of the scaling run, seconds")
    parser.add_argument("--jobs", type=int, default=16, help="batches submitted in the scaling run")
    parser.add_argument("--skip-loop", action="store_true", help="only the worker scaling")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    os.environ.setdefault("DDPO_CACHE", str(Path(tempfile.gettempdir()) / "ddpo-bench-cache"))
    import torch

    torch.set_num_threads(min(2, torch.get_num_threads()))
    print(f"python {platform.python_version()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_loop:
            loop_table(Path(tmp), args.batches, args.ratios, args.steps, args.repeats)
    worker_scaling(args.workers, args.worker_delay, args.jobs)
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
