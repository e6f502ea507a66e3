"""Cross-request batching: concurrent requests for one reward share scorer batches.

Each request is queued as a job. A loop per reward waits for a free batch slot, then for the
oldest job to have waited ``max_wait_ms`` or for ``max_batch_size`` images to be queued, takes up
to ``max_batch_size`` images (splitting a large job across batches if needed), runs the scorer
once, and hands each job its slice of the results, in order. A failing batch fails only the
jobs that had images in it. With a ``decode`` function, jobs carry encoded images that are decoded
(in a thread) only when their batch runs, so a request's decoded pixels live for one batch, not
for the whole request; an image that fails to decode fails only its own job. The queue is bounded
in images: beyond it ``submit`` raises ``QueueFullError`` (the API answers 429) instead of growing
memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from reward_server.errors import QueueFullError
from reward_server.metrics import ServerMetrics
from reward_server.rewards.base import RewardOutput, Scorer, ScoringError

logger = logging.getLogger(__name__)


class ShuttingDownError(RuntimeError):
    """The batcher stopped before the job was scored."""


@dataclass
class _Job:
    images: Sequence[Any]  # arrays, or encoded images when the batcher has a decode function
    prompts: Sequence[str]
    metadata: Sequence[dict[str, Any]]
    future: asyncio.Future[list[RewardOutput]]
    enqueued_at: float
    results: list[RewardOutput | None] = field(init=False)
    taken: int = 0  # images already handed to a batch
    done: int = 0  # images with a result

    def __post_init__(self) -> None:
        self.results = [None] * len(self.images)

    @property
    def size(self) -> int:
        return len(self.images)


@dataclass
class _Segment:
    job: _Job
    start: int
    stop: int


class Batcher:
    """Batches one reward's work across requests. Create inside a running event loop, ``start()`` it."""

    def __init__(
        self,
        reward: str,
        scorer: Scorer,
        max_batch_size: int = 32,
        max_wait_ms: float = 5.0,
        max_queue_images: int = 1024,
        max_concurrent_batches: int = 1,
        cross_request: bool = True,
        decode: Callable[[Sequence[Any], int], list[np.ndarray]] | None = None,
        metrics: ServerMetrics | None = None,
    ):
        if max_batch_size < 1 or max_queue_images < 1 or max_concurrent_batches < 1 or max_wait_ms < 0:
            raise ValueError("batch size, queue size and concurrency must be >= 1, max_wait_ms >= 0")
        self.reward = reward
        self.scorer = scorer
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue_images = max_queue_images
        self.cross_request = cross_request
        self.decode = decode  # (images, index of the first in its request) -> arrays
        self.metrics = metrics
        self._pending: deque[_Job] = deque()
        self._queued_images = 0
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(max_concurrent_batches)
        self._running: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def queued_images(self) -> int:
        return self._queued_images

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._loop(), name=f"batcher-{self.reward}")

    async def stop(self) -> None:
        """Stop taking work; fail what is still queued; wait for running batches."""
        self._closed = True
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        while self._pending:
            job = self._pending.popleft()
            if not job.future.done():
                job.future.set_exception(ShuttingDownError("the reward server is shutting down"))
        self._set_queue_depth(0)
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)

    async def submit(
        self, images: Sequence[Any], prompts: Sequence[str], metadata: Sequence[dict[str, Any]]
    ) -> list[RewardOutput]:
        """Queue one request's images and wait for their results (same order)."""
        if self._closed:
            raise ShuttingDownError("the reward server is shutting down")
        if not (len(images) == len(prompts) == len(metadata)):
            raise ValueError("images, prompts and metadata must have the same length")
        if self._queued_images + len(images) > self.max_queue_images:
            raise QueueFullError(
                f"reward {self.reward!r} has {self._queued_images} images queued; "
                f"{len(images)} more would exceed the limit of {self.max_queue_images}"
            )
        loop = asyncio.get_running_loop()
        job = _Job(images, prompts, metadata, loop.create_future(), enqueued_at=loop.time())
        self._pending.append(job)
        self._queued_images += job.size
        self._set_queue_depth(self._queued_images)
        self._wakeup.set()
        return await job.future

    # --- the loop ---------------------------------------------------------------------------

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._slots.acquire()
            try:
                await self._wait_for_work()
                if self.cross_request:
                    await self._wait_to_fill(loop)
                segments = self._take()
            except BaseException:
                self._slots.release()
                raise
            if not segments:
                self._slots.release()
                continue
            task = asyncio.create_task(self._run(segments))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _wait_for_work(self) -> None:
        while not self._pending:
            self._wakeup.clear()
            await self._wakeup.wait()

    async def _wait_to_fill(self, loop: asyncio.AbstractEventLoop) -> None:
        """Wait until a full batch is queued or the oldest job has waited max_wait."""
        deadline = self._pending[0].enqueued_at + self.max_wait_s
        while self._queued_images < self.max_batch_size:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except asyncio.TimeoutError:
                return

    def _take(self) -> list[_Segment]:
        """Up to max_batch_size images from the front of the queue (one job only without cross-request)."""
        segments: list[_Segment] = []
        room = self.max_batch_size
        while self._pending and room > 0:
            job = self._pending[0]
            if job.future.done():  # failed in an earlier batch, or its request was cancelled
                self._pending.popleft()
                self._queued_images -= job.size - job.taken
                continue
            n = min(room, job.size - job.taken)
            segments.append(_Segment(job, job.taken, job.taken + n))
            job.taken += n
            room -= n
            self._queued_images -= n
            if job.taken == job.size:
                self._pending.popleft()
            if not self.cross_request:
                break
        self._set_queue_depth(self._queued_images)
        return segments

    def _decode_segments(self, segments: list[_Segment]) -> list[list[np.ndarray] | BaseException]:
        """Each segment's decoded images, or the error that fails (only) its job."""
        assert self.decode is not None
        out: list[list[np.ndarray] | BaseException] = []
        for s in segments:
            try:
                out.append(self.decode(s.job.images[s.start : s.stop], s.start))
            except Exception as err:
                out.append(err)
        return out

    async def _run(self, segments: list[_Segment]) -> None:
        try:
            if self.decode is None:
                images = [img for s in segments for img in s.job.images[s.start : s.stop]]
            else:
                decoded = await asyncio.to_thread(self._decode_segments, segments)
                kept, images = [], []
                for s, result in zip(segments, decoded, strict=True):
                    if isinstance(result, BaseException):
                        if not s.job.future.done():
                            s.job.future.set_exception(result)
                        continue
                    kept.append(s)
                    images.extend(result)
                segments = kept
                del decoded
                if not segments:
                    return
            prompts = [p for s in segments for p in s.job.prompts[s.start : s.stop]]
            metadata = [m for s in segments for m in s.job.metadata[s.start : s.stop]]
            started = time.perf_counter()
            try:
                outputs = await self.scorer.ascore(images, prompts, metadata)
                _check_outputs(self.reward, outputs, len(images))
            except Exception as err:
                logger.warning("reward %s: batch of %d images failed: %r", self.reward, len(images), err)
                for s in segments:
                    if not s.job.future.done():
                        s.job.future.set_exception(err)
                return
            if self.metrics is not None:
                self.metrics.batch_size.labels(self.reward).observe(len(images))
                self.metrics.batch_requests.labels(self.reward).observe(len({id(s.job) for s in segments}))
                self.metrics.batch_latency.labels(self.reward).observe(time.perf_counter() - started)
            offset = 0
            for s in segments:
                n = s.stop - s.start
                job = s.job
                job.results[s.start : s.stop] = outputs[offset : offset + n]
                offset += n
                job.done += n
                if job.done == job.size and not job.future.done():
                    job.future.set_result(list(job.results))  # type: ignore[arg-type]
        finally:
            self._slots.release()

    def _set_queue_depth(self, value: int) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.labels(self.reward).set(value)


def _check_outputs(reward: str, outputs: Sequence[RewardOutput], expected: int) -> None:
    """A scorer bug must fail the batch loudly, never reach a trainer as NaN or a misaligned list."""
    if len(outputs) != expected:
        raise ScoringError(f"scorer {reward!r} returned {len(outputs)} results for {expected} images")
    for i, out in enumerate(outputs):
        if not isinstance(out, RewardOutput):
            raise ScoringError(f"scorer {reward!r} returned {type(out).__name__} instead of RewardOutput")
        try:
            value = float(out.reward)
        except (TypeError, ValueError):
            value = math.nan
        if not math.isfinite(value):
            raise ScoringError(
                f"scorer {reward!r} returned a non-finite reward ({out.reward!r}) at position {i}"
            )
        out.reward = value  # plain float on the wire (numpy scalars are not JSON)
