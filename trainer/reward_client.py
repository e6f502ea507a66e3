"""The trainer's only view of rewards: submit a batch, get a future of its rewards.

The trainer submits each batch as soon as it is decoded and keeps sampling; it waits on the
futures only when the epoch's update needs them. Transports (in-process, HTTP, Redis) are
registered by name in ``REWARD_TRANSPORTS``.
"""

from __future__ import annotations

import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class RewardResult:
    """Rewards of one submitted batch, request order, plus per-sample details for the run log."""

    rewards: np.ndarray  # float64, shape (batch,)
    details: list[dict[str, Any]] = field(default_factory=list)


class RewardClient(ABC):
    """Submit batches of uint8 RGB images for scoring; results arrive as futures."""

    @abstractmethod
    def submit(
        self,
        images: np.ndarray,
        prompts: Sequence[str],
        metadata: Sequence[dict[str, Any]] | None = None,
        request_id: str | None = None,
    ) -> Future[RewardResult]:
        """Start scoring ``images`` (B,H,W,3 uint8); returns at once."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release threads, connections, pools."""

    def __enter__(self) -> RewardClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def new_request_id() -> str:
    return uuid.uuid4().hex


def check_images(images: np.ndarray, prompts: Sequence[str]) -> None:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected (B,H,W,3) uint8 images, got shape {images.shape} dtype {images.dtype}")
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{len(prompts)} prompts for {images.shape[0]} images")


class LocalRewardClient(RewardClient):
    """Scores in this process, on a background thread (so sampling still overlaps with it)."""

    def __init__(self, reward: str, settings: Any = None):
        from reward_server.rewards import build_scorer

        self.reward = reward
        self.scorer = build_scorer(reward, settings)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward")

    def _score(self, images: np.ndarray, prompts: list[str], metadata: list[dict[str, Any]]) -> RewardResult:
        outputs = self.scorer.score(list(images), prompts, metadata)
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
        return self._pool.submit(self._score, images.copy(), list(prompts), meta)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def _http_client(cfg: Any) -> RewardClient:
    from trainer.transports.http import http_client_from_config

    if not cfg.embed_server or cfg.urls:
        return http_client_from_config(cfg)
    from trainer.embedded import EmbeddedRewardServer
    from trainer.transports.combined import OwningClient

    server = EmbeddedRewardServer([cfg.name], env=server_settings_env(cfg.server_settings)).start()
    try:
        return OwningClient(http_client_from_config(cfg, [server.url]), [server.stop])
    except BaseException:
        server.stop()
        raise


def _redis_client(cfg: Any) -> RewardClient:
    from trainer.transports.redis import redis_client_from_config

    return redis_client_from_config(cfg)


def server_settings_env(settings: dict[str, Any]) -> dict[str, str]:
    """This process's environment plus ``DDPO_REWARD_<FIELD>`` for each reward-server setting."""
    import json
    import os

    env = dict(os.environ)
    for key, value in settings.items():
        env[f"DDPO_REWARD_{key.upper()}"] = value if isinstance(value, str) else json.dumps(value)
    return env


# name -> factory(reward_config). Remote transports import httpx/redis only when chosen.
def _local_client(cfg: Any) -> RewardClient:
    """In process, configured like the reward server: ``reward.server_settings`` over DDPO_REWARD_* env."""
    from reward_server.settings import ServerSettings

    settings = {"rewards": [cfg.name], **cfg.server_settings}
    return LocalRewardClient(cfg.name, ServerSettings(**settings))


REWARD_TRANSPORTS: dict[str, Callable[[Any], RewardClient]] = {
    "local": lambda cfg: _local_client(cfg),
    "http": _http_client,
    "redis": _redis_client,
}


def _single_client(cfg: Any) -> RewardClient:
    try:
        factory = REWARD_TRANSPORTS[cfg.transport]
    except KeyError:
        valid = ", ".join(sorted(REWARD_TRANSPORTS))
        raise ValueError(f"reward.transport: unknown transport {cfg.transport!r}; valid: {valid}") from None
    return factory(cfg)


def make_reward_client(cfg: Any) -> RewardClient:
    """Build the reward client of a ``RewardConfig``: one transport, or a weighted sum of components."""
    if not getattr(cfg, "components", None):
        return _single_client(cfg)
    from trainer.transports.combined import CombinedRewardClient, Component

    parts: list[Component] = []
    try:
        for component in cfg.components:
            parts.append(Component(component.name, component.weight, _single_client(cfg.single(component))))
    except BaseException:
        for part in parts:
            part.client.close()
        raise
    return CombinedRewardClient(parts)
