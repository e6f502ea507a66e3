"""The one base class every reward implements, and the one registry of rewards.

This is the interface the trainer shares with the server: its in-process ("local") transport
builds scorers with ``build_scorer(name, mapping)`` and plugins register more rewards through
``register_reward`` (loaded with ``import_extra_rewards``).
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import importlib.util
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
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


class Scorer:
    """Turns a batch of RGB uint8 images (+ prompts, + metadata) into one RewardOutput each.

    Every caller goes through ``ascore`` on an event loop it keeps (the server's, the worker's,
    the trainer's in-process transport's), so a scorer is async-only: CPU-bound ones implement the
    blocking ``score`` (``ascore`` runs it in a worker thread); natively async ones (a VLM behind
    HTTP) override ``ascore`` and ``aclose`` instead. ``from_settings`` builds one from the reward
    server's settings object.
    """

    name: ClassVar[str] = ""

    @classmethod
    def from_settings(cls, settings: Any = None) -> Scorer:
        return cls()

    def score(
        self,
        images: Sequence[np.ndarray],
        prompts: Sequence[str],
        metadata: Sequence[dict[str, Any]],
    ) -> list[RewardOutput]:
        """Score a batch, blocking (CPU-bound scorers); same length and order as ``images``."""
        raise NotImplementedError(f"{type(self).__name__} implements neither score nor ascore")

    def check_inputs(self, prompts: Sequence[str], metadata: Sequence[dict[str, Any]]) -> None:
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

    async def aclose(self) -> None:
        """Release clients/models, on the loop that scored; called when the caller shuts down."""


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


def build_scorer(name: str, settings: Mapping[str, Any] | Any = None) -> Scorer:
    """Build the scorer registered under ``name`` (clear error listing valid names otherwise).

    ``settings``: None, a settings object (the server's), or a plain mapping of setting names
    (e.g. a trainer's ``reward.server_settings``), turned into one by ``scorer_settings``.
    """
    cls = get_reward_class(name)  # unknown names fail before any settings are validated
    if isinstance(settings, Mapping):
        settings = scorer_settings(settings, reward=name)
    return cls.from_settings(settings)


def scorer_settings(values: Mapping[str, Any], reward: str | None = None) -> Any:
    """Scorer settings from plain values only: validated like the reward server's scoring settings
    (``ScoringSettings``: same names, defaults and checks; the HTTP server's own fields such as
    ``host`` or ``api_key`` mean nothing in process and are refused), but no ``DDPO_REWARD_*``
    environment variable or ``.env`` file is read, so a caller's own config (a trainer's) is the
    whole configuration.

    ``reward``: the one reward these settings are for (``rewards`` defaults to it).
    """
    values = dict(values)
    if reward is not None:
        values.setdefault("rewards", [reward])
    return _values_only_settings()(**values)


@functools.cache
def _values_only_settings() -> type:
    """The scoring settings class (what the server and the worker score with, without the HTTP
    server's bind address and auth) with the init values as its only source."""
    # Lazy: settings.py imports this registry to validate reward names.
    from pydantic_settings import SettingsConfigDict

    from reward_server.settings import ScoringSettings

    class ScorerSettings(ScoringSettings):
        model_config = SettingsConfigDict(cli_parse_args=False)  # never this process's argv either

        @classmethod
        def settings_customise_sources(
            cls, settings_cls: Any, init_settings: Any, **other: Any
        ) -> tuple[Any, ...]:
            return (init_settings,)  # no environment, .env or secrets-dir source

    return ScorerSettings


def import_extra_rewards(modules: Sequence[str]) -> None:
    """Import plugin modules (dotted names or .py paths) that register extra rewards.

    Call it before reward names are checked (server settings, ``build_scorer``).
    """
    for name in modules:
        if name.endswith(".py"):
            path = Path(name).resolve()
            spec = importlib.util.spec_from_file_location(path.stem, path)
            if spec is None or spec.loader is None:
                raise ImportError(f"cannot import {name}")
            module = importlib.util.module_from_spec(spec)
            sys.modules[path.stem] = module
            spec.loader.exec_module(module)
        else:
            importlib.import_module(name)
