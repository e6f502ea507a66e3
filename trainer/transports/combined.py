"""A weighted sum of several rewards, each from its own client (server, stream or in-process)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np

from trainer.reward_api import RewardClient, RewardResult, check_images, new_request_id


@dataclass
class Component:
    name: str
    weight: float
    client: RewardClient


class CombinedRewardClient(RewardClient):
    """``sum_i weight_i * reward_i``; each sample's details hold every component's details under its name.

    The batch fails if any component fails (with that component's error): a partial sum is never used.
    """

    def __init__(self, components: Sequence[Component], on_close: Sequence[Callable[[], None]] = ()):
        if not components:
            raise ValueError("a combined reward needs at least one component")
        self.components = list(components)
        self._on_close = list(on_close)

    def submit(
        self,
        images: np.ndarray,
        prompts: Sequence[str],
        metadata: Sequence[dict[str, Any]] | None = None,
        request_id: str | None = None,
    ) -> Future[RewardResult]:
        check_images(images, prompts)
        rid = request_id or new_request_id()
        # One request id per component: the same id with another reward would be a conflict (409).
        parts = [(c, c.client.submit(images, prompts, metadata, f"{rid}.{c.name}")) for c in self.components]
        combined: Future[RewardResult] = Future()
        lock = threading.Lock()
        remaining = [len(parts)]

        def done(part: Future[RewardResult]) -> None:
            with lock:
                if combined.done():
                    return
                error = part.exception() if not part.cancelled() else RuntimeError("reward request cancelled")
                if error is not None:
                    combined.set_exception(error)
                    return
                remaining[0] -= 1
                if remaining[0] == 0:
                    combined.set_result(_combine([(c, f.result()) for c, f in parts]))

        for _, future in parts:
            future.add_done_callback(done)
        return combined

    def close(self) -> None:
        for component in self.components:
            component.client.close()
        for hook in self._on_close:
            hook()


def _combine(results: list[tuple[Component, RewardResult]]) -> RewardResult:
    total = np.zeros_like(results[0][1].rewards)
    details: list[dict[str, Any]] = [{} for _ in total]
    for component, result in results:
        total = total + component.weight * result.rewards
        for i, (reward, detail) in enumerate(zip(result.rewards, result.details, strict=True)):
            details[i][component.name] = {"reward": float(reward), **detail}
    return RewardResult(rewards=total, details=details)


class OwningClient(RewardClient):
    """A client plus things to stop when it closes (e.g. an embedded reward server)."""

    def __init__(self, client: RewardClient, on_close: Sequence[Callable[[], None]]):
        self.client = client
        self._on_close = list(on_close)

    def submit(
        self,
        images: np.ndarray,
        prompts: Sequence[str],
        metadata: Sequence[dict[str, Any]] | None = None,
        request_id: str | None = None,
    ) -> Future[RewardResult]:
        return self.client.submit(images, prompts, metadata, request_id)

    def close(self) -> None:
        try:
            self.client.close()
        finally:
            for hook in self._on_close:
                hook()
