"""How much does a slow reward service cost the training loop? (docs/transport.md has a recorded run.)

1. The tiny training loop (sample -> reward -> update), one epoch per setting, rewards from a real
   reward server process (HTTP) or a real Redis worker whose scorer sleeps L seconds per batch
   (``test_slow_jpeg``), for L below, equal to and above the measured sampling time S of one
   batch; epoch time (sampling + reward wait + update, without the eval grid) relative to the same
   loop with an instant in-process reward. Columns: synchronous (the reward of each batch fetched
   right after it is sampled: what the reference implementations do); on-policy (the trainer's
   default: submit, keep sampling, wait before the update); staleness 1 (``train.max_staleness 1``:
   the next epoch samples while this epoch's rewards are outstanding).
2. Reward throughput with N Redis workers (each scores one batch per L seconds): batches/s for
   N = 1, 2, 4, against the sampler's 1/S batches/s.

    python benchmarks/bench_transport.py [--batches 4] [--steps 4] [--ratios 0.5 1 2] [--workers 1 2 4]
        [--window-size 0] [--capacity 1] [--no-redis]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import platform
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import tests.transport_rewards  # noqa: E402, F401  (registers test_slow_jpeg)
from tests.trainer.conftest import tiny_config  # noqa: E402
from tests.transport_support import Workers, start_redis  # noqa: E402
from trainer.embedded import EmbeddedRewardServer  # noqa: E402
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
    max_staleness: int = 0,
    window_size: int = 0,
) -> dict[str, float]:
    cfg = tiny_config(
        output,
        sample={
            "num_steps": steps,
            "batch_size": 2,
            "num_batches_per_epoch": batches,
            "resolution": 32,
            "window_size": window_size,
        },
        train={"batch_size": 2, "gradient_accumulation_steps": 1, "max_staleness": max_staleness},
        advantage={"buffer_size": 4, "min_count": 2},
        run={
            # One epoch more than timed: with max_staleness 1 the last epoch has no next one to
            # sample during its reward wait, so it is not a steady-state epoch.
            "num_epochs": repeats + 2,
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
            wait = m["time_reward_wait_s"]
            runs.append({"total": m["time_epoch_s"], "sampling": m["time_sampling_s"], "wait": wait})
    finally:
        client.close()
    runs = sorted(runs[1:], key=lambda r: r["total"])
    return runs[len(runs) // 2]


def loop_table(
    output: Path,
    batches: int,
    ratios: Sequence[float],
    steps: int,
    repeats: int,
    redis: bool,
    window_size: int = 0,
    capacity: int = 1,
) -> None:
    timing = functools.partial(
        epoch_time, output, batches, steps=steps, repeats=repeats, window_size=window_size
    )
    base = timing({"name": "jpeg_compressibility", "transport": "local"})
    per_batch = base["sampling"] / batches
    print(
        f"instant in-process reward: epoch {base['total']:.2f} s (sampling {base['sampling']:.2f} s = "
        f"S {per_batch:.2f} s/batch x {batches}, reward wait {base['wait']:.2f} s)"
    )
    print(
        f"epoch time / instant-reward epoch (reward wait in the epoch, s); the slow service scores "
        f"{capacity} batch(es) at once:"
    )
    print(
        f"{'L/S':>5} {'L (s)':>6} | {'sync HTTP':>13} | {'on-policy HTTP':>14} | {'staleness 1 HTTP':>16}"
        + (f" | {'on-policy Redis':>15} | {'staleness 1 Redis':>17}" if redis else "")
    )

    def cell(t: dict[str, float], width: int) -> str:
        return f"{t['total'] / base['total']:.2f} ({t['wait']:.2f})".rjust(width)

    for ratio in ratios:
        delay = ratio * per_batch
        env = dict(os.environ, DDPO_TEST_REWARD_DELAY_S=f"{delay:.3f}")
        with EmbeddedRewardServer(
            ["test_slow_jpeg"],
            extra_rewards_modules=[EXTRA],
            env=env,
            settings={"max_concurrent_batches": capacity},
        ) as server:
            reward = {"name": "test_slow_jpeg", "transport": "http", "urls": [server.url]}
            sync_t = timing(reward, wrap_sync=True)
            async_t = timing(reward)
            stale_t = timing(reward, max_staleness=1)
        row = f"{ratio:>5.2f} {delay:>6.2f} | {cell(sync_t, 13)} | {cell(async_t, 14)} | {cell(stale_t, 16)}"
        if redis:
            with redis_with_workers(capacity, delay, "loop") as url:  # as many as the server's scorers
                reward = {"name": "test_slow_jpeg", "transport": "redis", "redis_url": url}
                redis_t = timing(reward)
                redis_stale_t = timing(reward, max_staleness=1)
            row += f" | {cell(redis_t, 15)} | {cell(redis_stale_t, 17)}"
        print(row, flush=True)


@contextlib.contextmanager
def redis_with_workers(n: int, delay: float, name: str) -> Iterator[str]:
    """A throw-away Redis and ``n`` real reward workers (tests/transport_support.py's), each scoring
    one ``test_slow_jpeg`` batch per ``delay`` s; yields the Redis URL once every worker reads."""
    redis = start_redis()
    with tempfile.TemporaryDirectory(prefix="bench-workers-") as logs:
        workers = Workers(redis, Path(logs))
        try:
            for i in range(n):
                workers.start(f"{name}-w{i}", "--concurrency", "1", delay_s=delay)
            yield redis.url
        finally:
            workers.stop_all()
            redis.process.terminate()
            redis.process.wait(10)


def worker_scaling(workers: Sequence[int], delay: float, jobs: int) -> None:
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    print(f"\nRedis workers, each scoring one batch per L = {delay:.2f} s; {jobs} batches submitted at once:")
    for n in workers:
        with redis_with_workers(n, delay, f"n{n}") as url:
            with RedisRewardClient("test_slow_jpeg", url, deadline_s=600) as client:
                started = time.perf_counter()
                futures = [client.submit(images, ["a cat", "a dog"]) for _ in range(jobs)]
                for f in futures:
                    f.result()
                elapsed = time.perf_counter() - started
        print(f"  N = {n}: {jobs / elapsed:6.2f} batches/s ({elapsed:.2f} s; ideal {n / delay:.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", type=int, default=4, help="sampling batches per epoch")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps (sampling and update cost)")
    parser.add_argument(
        "--window-size",
        type=int,
        default=0,
        help="train this many consecutive steps of each trajectory (sample.window_size; 0: every step)",
    )
    parser.add_argument(
        "--capacity",
        type=int,
        default=1,
        help="batches the slow reward service scores at once (the HTTP server's max_concurrent_batches, "
        "the number of Redis workers): a VLM service sized for the trainer has capacity >= L / S. "
        "One Redis worker is throughput-bound at L > S; the HTTP server less so, as it merges queued "
        "requests into one scorer batch (which the test reward scores in L, whatever its size)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs per setting (median)")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 1.0, 2.0], help="L / S values")
    parser.add_argument(
        "--workers", type=int, nargs="+", default=[1, 2, 4], help="worker counts to scale over"
    )
    parser.add_argument("--worker-delay", type=float, default=0.5, help="L of the scaling run, seconds")
    parser.add_argument("--jobs", type=int, default=16, help="batches submitted in the scaling run")
    parser.add_argument("--skip-loop", action="store_true", help="only the worker scaling")
    parser.add_argument("--no-redis", action="store_true", help="the loop table over HTTP only")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    os.environ.setdefault("DDPO_CACHE", str(Path(tempfile.gettempdir()) / "ddpo-bench-cache"))
    import torch

    torch.set_num_threads(min(2, torch.get_num_threads()))
    print(f"python {platform.python_version()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_loop:
            loop_table(
                Path(tmp),
                args.batches,
                args.ratios,
                args.steps,
                args.repeats,
                redis=not args.no_redis,
                window_size=args.window_size,
                capacity=args.capacity,
            )
    worker_scaling(args.workers, args.worker_delay, args.jobs)
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
