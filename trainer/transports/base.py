"""Pieces shared by the remote transports: a private event loop thread, request building.

Retries are not here: every transport uses the one policy of shared/retry.py.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

import numpy as np

from shared import binary
from shared.codec import encode_png_b64
from shared.schemas import ScoreRequest, ScoreResponse
from trainer.reward_api import RewardClient, RewardResult, check_images, new_request_id
from trainer.transports.errors import RewardError

T = TypeVar("T")


class BackgroundLoop:
    """An asyncio loop running in a daemon thread owned by one client.

    The trainer is synchronous; coroutines scheduled here come back as ``concurrent.futures``.
    """

    def __init__(self, name: str):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return self.submit(coro).result(timeout)

    def stop(self, cleanup: Coroutine[Any, Any, Any] | None = None, timeout: float = 10.0) -> None:
        """Cancel what still runs (its futures end cancelled), run ``cleanup``, stop the thread."""
        if not self._thread.is_alive():
            return

        async def shutdown() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if cleanup is not None:
                await cleanup

        try:
            self.submit(shutdown()).result(timeout)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout)
            if not self._thread.is_alive():
                self.loop.close()


class LoopRewardClient(RewardClient):
    """A remote transport: ``submit`` schedules ``_score`` on the client's own event loop thread.

    Subclasses set ``self._loop`` (a BackgroundLoop) and ``self._closed`` and implement ``_score``.
    """

    _loop: BackgroundLoop
    _closed: bool
    codec: str = "json"
    reward: str

    def submit(
        self,
        images: np.ndarray,
        prompts: Sequence[str],
        metadata: Sequence[dict[str, Any]] | None = None,
        request_id: str | None = None,
    ) -> Future[RewardResult]:
        if self._closed:
            raise RuntimeError("the reward client is closed")
        check_images(images, prompts)
        rid = request_id or new_request_id()
        # A snapshot, so the caller may reuse its array at once. Binary: the body itself (one copy
        # of the pixels behind a small header, as cheap as the copy); JSON: PNG-encoded later, off
        # this thread.
        payload: np.ndarray | bytes
        if self.codec == "binary":
            payload = build_binary_request(rid, self.reward, images, prompts, metadata)
        else:
            payload = images.copy()
        return self._loop.submit(self._score(rid, payload, list(prompts), metadata))

    async def _score(
        self,
        request_id: str,
        payload: np.ndarray | bytes,
        prompts: list[str],
        metadata: Sequence[dict[str, Any]] | None,
    ) -> RewardResult:
        """``payload``: the binary body (codec 'binary') or a copy of the images (codec 'json')."""
        raise NotImplementedError


def build_request(
    request_id: str,
    reward: str,
    images: np.ndarray,
    prompts: Sequence[str],
    metadata: Sequence[dict[str, Any]] | None,
) -> ScoreRequest:
    """The wire request; PNG encoding is the expensive part (run it off the sampling thread)."""
    return ScoreRequest(
        request_id=request_id,
        reward=reward,
        images=[encode_png_b64(image) for image in images],
        prompts=list(prompts),
        metadata=list(metadata) if metadata is not None else None,
    )


CODECS = ("binary", "json")


def check_codec(codec: str) -> str:
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; valid: {', '.join(CODECS)}")
    return codec


def build_binary_request(
    request_id: str,
    reward: str,
    images: np.ndarray,
    prompts: Sequence[str],
    metadata: Sequence[dict[str, Any]] | None,
) -> bytes:
    """The binary body (shared/binary.py): the raw pixels behind a small safetensors header, one copy."""
    return binary.encode(request_id, reward, images, prompts, metadata)


def to_result(response: ScoreResponse, request_id: str, reward: str, batch: int) -> RewardResult:
    """Check the answer belongs to this request and has one reward per image; make the trainer's result."""
    if response.request_id != request_id or response.reward != reward:
        raise RewardError(
            f"answer for request {response.request_id!r}/{response.reward!r}, "
            f"expected {request_id!r}/{reward!r}",
            request_id,
        )
    if len(response.rewards) != batch:
        raise RewardError(f"{len(response.rewards)} rewards for {batch} images", request_id)
    return RewardResult(rewards=np.asarray(response.rewards, dtype=np.float64), details=response.details)
