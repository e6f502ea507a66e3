"""The one base class every reward implements, and the one registry of rewards."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import numpy as np


@dataclass
class RewardOutput:
    """The reward of one image, and what a person needs to see why (e.g. the VLM's answer)."""

    reward: float
    details: dict[str, Any] = field(default_factory=dict)


class ScoringError(RuntimeError):
    """A scorer could not produce a reward. Never turned into a silent 0 (see pitfalls)."""


class InputLimitError(ValueError):
    """Per-sample inputs over a limit (e.g. too many VQA questions): the server answers 413."""

    def __init__(self, error: str, reason: str):
        super().__init__(reason)
        self.error = error


class UnknownRewardError(KeyError):
    """A reward name that is not registered; the message lists the valid names."""

    def __init__(self, name: str, valid: Sequence[str]):
        self.name = name
        self.valid = sorted(valid)
        super().__init__(f"unknown reward {name!r}; valid rewards: {', '.join(self.valid)}")

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class Scorer(ABC):
    """Turns a batch of RGB uint8 images (+ prompts, + metadata) into one RewardOutput each.

    Subclasses implement ``score`` (blocking) or override ``ascore`` (natively async, e.g. a
    VLM behind HTTP). ``from_settings`` builds one from the reward server's settings object.
    """

    name: ClassVar[str] = ""

    @classmethod
    def from_settings(cls, settings: Any = None) -> Scorer:
        return cls()

    @abstractmethod
    def score(
        self,
        images: Sequence[np.ndarray],
        prompts: Sequence[str],
        metadata: Sequence[dict[str, Any]],
    ) -> list[RewardOutput]:
        """Score a batch; same length and order as ``images``."""

    def check_inputs(self, prompts: Sequence[str], metadata: Sequence[dict[str, Any]]) -> None:  # noqa: B027
        """Reject malformed per-sample inputs (e.g. missing VQA questions) before any work is queued.

        Raise ValueError with a reason; the server answers 422 (``InputLimitError``: 413). The
        default accepts everything. Runs on the server's event loop: keep it O(size of the lists).
        """

    def work_units(self, metadata: Sequence[dict[str, Any]]) -> int:
        """How much work a request is, counted against ``max_inflight_images``: one per image by
        default; a VQA reward counts its VLM calls (one per question). Called after check_inputs."""
        return len(metadata)

    async def ascore(
        self,
        images: Sequence[np.ndarray],
        prompts: Sequence[str],
        metadata: Sequence[dict[str, Any]],
    ) -> list[RewardOutput]:
        """Async entry point for the server; CPU-bound scorers run in a worker thread."""
        return await asyncio.to_thread(self.score, images, prompts, metadata)

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release clients/models; called at server shutdown."""


REWARD_REGISTRY: dict[str, type[Scorer]] = {}

S = TypeVar("S", bound=type[Scorer])


def register_reward(name: str) -> Callable[[S], S]:
    """Class decorator: make a Scorer available under ``name``."""

    def decorate(cls: S) -> S:
        if name in REWARD_REGISTRY and REWARD_REGISTRY[name] is not cls:
            raise ValueError(f"reward {name!r} is already registered by {REWARD_REGISTRY[name].__name__}")
        cls.name = name
        REWARD_REGISTRY[name] = cls
        return cls

    return decorate


def reward_names() -> list[str]:
    return sorted(REWARD_REGISTRY)


def get_reward_class(name: str) -> type[Scorer]:
    try:
        return REWARD_REGISTRY[name]
    except KeyError:
        raise UnknownRewardError(name, REWARD_REGISTRY) from None


def build_scorer(name: str, settings: Any = None) -> Scorer:
    """Build the scorer registered under ``name`` (clear error listing valid names otherwise)."""
    return get_reward_class(name).from_settings(settings)
