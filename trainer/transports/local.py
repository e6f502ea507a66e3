"""``local`` transport: score in this process, on a background event loop (sampling still overlaps).

The scorer comes from the reward registry (``reward_server.rewards``, the interface trainer and
server share), imported only when this transport is built. It is configured from the trainer's
``reward.server_settings`` alone: the registry validates that mapping like the server's settings
but reads no ``DDPO_REWARD_*`` environment variable (those configure reward *servers*).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from typing import Any

import numpy as np

from trainer.reward_api import RewardClient, RewardResult, check_images
from trainer.transports.base import BackgroundLoop


class LocalRewardClient(RewardClient):
    """Scores in this process with the scorer's ``ascore``, on one event loop in a background
    thread (so sampling still overlaps with it), one batch at a time.

    ``settings``: None, a mapping of reward-server setting names (``reward.server_settings``), or a
    settings object with those attributes.
    """

    def __init__(self, reward: str, settings: Mapping[str, Any] | Any = None):
        # Lazy: only this transport needs the registry (and its model libraries).
        from reward_server.rewards import build_scorer

        self.reward = reward
        self.scorer = build_scorer(reward, settings)
        self._loop = BackgroundLoop(f"reward-local-{reward}")
        self._one_at_a_time = self._loop.run(_make_lock())

    async def _score(
        self, images: np.ndarray, prompts: list[str], metadata: list[dict[str, Any]]
    ) -> RewardResult:
        async with self._one_at_a_time:
            outputs = await self.scorer.ascore(list(images), prompts, metadata)
        if len(outputs) != len(prompts):
            raise RuntimeError(f"scorer {self.reward!r} returned {len(outputs)} results for {len(prompts)}")
        rewards = np.array([o.reward for o in outputs], dtype=np.float64)
        if not np.all(np.isfinite(rewards)):
            raise RuntimeError(f"scorer {self.reward!r} returned non-finite rewards: {rewards}")
        return RewardResult(rewards=rewards, details=[o.details for o in outputs])

    def submit(
        self,
        images: np.ndarray,
        prompts: Sequence[str],
        metadata: Sequence[dict[str, Any]] | None = None,
        request_id: str | None = None,
    ) -> Future[RewardResult]:
        check_images(images, prompts)
        meta = list(metadata) if metadata is not None else [{} for _ in prompts]
        return self._loop.submit(self._score(images.copy(), list(prompts), meta))

    def close(self) -> None:
        """Finish, then release the scorer's resources (a VLM scorer's HTTP pool) on its loop."""
        self._loop.stop(cleanup=self.scorer.aclose())


async def _make_lock() -> asyncio.Lock:
    return asyncio.Lock()  # made on the loop that uses it


def local_client_from_config(cfg: Any) -> LocalRewardClient:
    """The ``local`` transport of a ``RewardConfig``: its reward, its ``server_settings``."""
    return LocalRewardClient(cfg.name, dict(cfg.server_settings))
