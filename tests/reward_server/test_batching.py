"""The cross-request batcher with a recording scorer: merging, splitting, order, failures, limits."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest

from reward_server.batching import Batcher
from reward_server.errors import QueueFullError
from reward_server.rewards.base import RewardOutput, Scorer, ScoringError


class Recorder(Scorer):
    """reward = the image's first pixel value; remembers each batch's prompts."""

    def __init__(self, delay: float = 0.0, poison: str | None = None, value: float | None = None):
        self.batches: list[list[str]] = []
        self.delay = delay
        self.poison = poison
        self.value = value
        self.running = 0
        self.max_running = 0

    def score(self, images, prompts, metadata):
        raise AssertionError("the batcher must use ascore")

    async def ascore(self, images, prompts, metadata):
        self.batches.append(list(prompts))
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            await asyncio.sleep(self.delay)
            if self.poison is not None and self.poison in prompts:
                raise ScoringError(f"cannot score {self.poison}")
            return [
                RewardOutput(float(img[0, 0, 0]) if self.value is None else self.value, {"prompt": p})
                for img, p in zip(images, prompts, strict=True)
            ]
        finally:
            self.running -= 1


def request(tag: str, n: int, start: int = 0):
    images = [np.full((2, 2, 3), start + i, np.uint8) for i in range(n)]
    prompts = [f"{tag}{i}" for i in range(n)]
    return images, prompts, [{} for _ in range(n)]


async def with_batcher(scorer: Scorer, body, **kw):
    batcher = Batcher("test", scorer, **kw)
    batcher.start()
    try:
        return await body(batcher)
    finally:
        await batcher.stop()


def test_concurrent_requests_share_one_batch_in_order():
    scorer = Recorder()

    async def body(b: Batcher):
        return await asyncio.gather(
            b.submit(*request("a", 3, 0)), b.submit(*request("b", 2, 10)), b.submit(*request("c", 4, 20))
        )

    a, b, c = asyncio.run(with_batcher(scorer, body, max_batch_size=32, max_wait_ms=200))
    assert scorer.batches == [["a0", "a1", "a2", "b0", "b1", "c0", "c1", "c2", "c3"]]
    assert [o.reward for o in a] == [0, 1, 2]
    assert [o.reward for o in b] == [10, 11]
    assert [o.reward for o in c] == [20, 21, 22, 23]
    assert [o.details["prompt"] for o in c] == ["c0", "c1", "c2", "c3"]


def test_full_batch_runs_without_waiting_for_max_wait():
    scorer = Recorder()

    async def body(b: Batcher):
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.gather(b.submit(*request("a", 2)), b.submit(*request("b", 2)))
        return loop.time() - started

    elapsed = asyncio.run(with_batcher(scorer, body, max_batch_size=4, max_wait_ms=5000))
    assert elapsed < 2.0
    assert scorer.batches == [["a0", "a1", "b0", "b1"]]


def test_lone_request_runs_after_max_wait():
    scorer = Recorder()

    async def body(b: Batcher):
        loop = asyncio.get_running_loop()
        started = loop.time()
        out = await b.submit(*request("a", 1, 7))
        return out, loop.time() - started

    out, elapsed = asyncio.run(with_batcher(scorer, body, max_batch_size=32, max_wait_ms=100))
    assert [o.reward for o in out] == [7]
    assert 0.09 <= elapsed < 2.0


def test_large_request_is_split_and_reassembled_in_order():
    scorer = Recorder()

    async def body(b: Batcher):
        return await asyncio.gather(b.submit(*request("a", 5, 0)), b.submit(*request("b", 3, 50)))

    a, b = asyncio.run(with_batcher(scorer, body, max_batch_size=3, max_wait_ms=50))
    assert scorer.batches == [["a0", "a1", "a2"], ["a3", "a4", "b0"], ["b1", "b2"]]
    assert [o.reward for o in a] == [0, 1, 2, 3, 4]
    assert [o.reward for o in b] == [50, 51, 52]


def test_failing_batch_fails_only_its_requests():
    scorer = Recorder(poison="b1")

    async def body(b: Batcher):
        return await asyncio.gather(
            b.submit(*request("a", 2)),
            b.submit(*request("b", 2)),
            b.submit(*request("c", 2, 30)),
            return_exceptions=True,
        )

    a, b, c = asyncio.run(with_batcher(scorer, body, max_batch_size=4, max_wait_ms=100))
    assert scorer.batches == [["a0", "a1", "b0", "b1"], ["c0", "c1"]]
    assert isinstance(a, ScoringError) and isinstance(b, ScoringError) and "cannot score b1" in str(b)
    assert [o.reward for o in c] == [30, 31]


def test_without_cross_request_batching_each_request_is_its_own_batch():
    scorer = Recorder()

    async def body(b: Batcher):
        return await asyncio.gather(b.submit(*request("a", 2)), b.submit(*request("b", 1)))

    asyncio.run(with_batcher(scorer, body, max_batch_size=32, max_wait_ms=100, cross_request=False))
    assert scorer.batches == [["a0", "a1"], ["b0"]]


def test_queue_is_bounded():
    scorer = Recorder(delay=0.3)

    async def body(b: Batcher):
        first = asyncio.create_task(b.submit(*request("a", 4)))
        await asyncio.sleep(0.05)  # "a" is being scored; the queue is empty again
        queued = asyncio.create_task(b.submit(*request("b", 4)))
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFullError, match="limit of 6"):
            await b.submit(*request("c", 3))
        return await asyncio.gather(first, queued)

    a, b = asyncio.run(
        with_batcher(
            scorer, body, max_batch_size=4, max_wait_ms=0, max_queue_images=6, max_concurrent_batches=1
        )
    )
    assert len(a) == 4 and len(b) == 4


def test_concurrent_batches_limit():
    scorer = Recorder(delay=0.1)

    async def body(b: Batcher):
        await asyncio.gather(*(b.submit(*request(t, 1)) for t in "abcdef"))

    asyncio.run(with_batcher(scorer, body, max_batch_size=1, max_wait_ms=0, max_concurrent_batches=2))
    assert scorer.max_running == 2
    assert len(scorer.batches) == 6


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_rewards_fail_the_batch(value):
    async def body(b: Batcher):
        return await b.submit(*request("a", 2))

    with pytest.raises(ScoringError, match="non-finite"):
        asyncio.run(with_batcher(Recorder(value=value), body, max_wait_ms=0))


def test_wrong_result_count_fails_the_batch():
    class Short(Recorder):
        async def ascore(self, images, prompts, metadata):
            return (await super().ascore(images, prompts, metadata))[:-1]

    async def body(b: Batcher):
        return await b.submit(*request("a", 2))

    with pytest.raises(ScoringError, match="returned 1 results for 2 images"):
        asyncio.run(with_batcher(Short(), body, max_wait_ms=0))


def test_cancelled_request_is_skipped():
    scorer = Recorder(delay=0.2)

    async def body(b: Batcher):
        first = asyncio.create_task(b.submit(*request("a", 1)))
        await asyncio.sleep(0.05)
        cancelled = asyncio.create_task(b.submit(*request("b", 1)))
        await asyncio.sleep(0.01)
        cancelled.cancel()
        kept = await b.submit(*request("c", 1))
        await first
        return kept, b.queued_images

    kept, queued = asyncio.run(with_batcher(scorer, body, max_batch_size=4, max_wait_ms=0))
    assert [o.details["prompt"] for o in kept] == ["c0"]
    assert ["b0"] not in scorer.batches and queued == 0
