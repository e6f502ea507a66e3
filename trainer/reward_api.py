"""The trainer's interface to rewards: submit a batch, get a future of its rewards.

Every transport (``trainer/transports/*``) implements ``RewardClient`` from here, and the factory
(``trainer.reward_client.make_reward_client``) builds one by name. This module imports no
transport and nothing of the reward server, so dependencies point one way:
``reward_client -> transports -> reward_api``.
"""

from __future__ import annotations

import uuid
from abc import ABC, abstractmethod
from collections.abc import Sequence
from concurrent.futures import Future
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
    """A fresh request id; retries of one batch reuse it so it is never counted twice."""
    return uuid.uuid4().hex


def check_images(images: np.ndarray, prompts: Sequence[str]) -> None:
    """Reject what no transport can score: not (B,H,W,3) uint8, or not one prompt per image."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected (B,H,W,3) uint8 images, got shape {images.shape} dtype {images.dtype}")
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{len(prompts)} prompts for {images.shape[0]} images")
