"""One interface for every VLM backend, and the registry that picks one by name.

- ``openai``: any OpenAI-compatible chat-completions server (vLLM in production).
- ``transformers``: an in-process ``LlavaForConditionalGeneration`` for a single box.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


class VLMError(RuntimeError):
    """The VLM could not answer (after the retry budget). Never scored as 0."""


class VLMBackend(ABC):
    """Answers one question per image; same order, one string each."""

    @abstractmethod
    async def answer(self, images: Sequence[np.ndarray], questions: Sequence[str]) -> list[str]:
        """images: HxWx3 uint8 RGB arrays; questions: the text to ask about each image."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release the HTTP client / model."""


def check_vlm_inputs(images: Sequence[np.ndarray], questions: Sequence[str]) -> None:
    """One HxWx3 uint8 RGB image per question, or ValueError saying which is wrong."""
    if len(images) != len(questions):
        raise ValueError(f"{len(images)} images for {len(questions)} questions")
    for i, image in enumerate(images):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image {i}: expected HxWx3 uint8 RGB, got {image.shape} {image.dtype}")


VLM_BACKENDS: dict[str, Callable[[Any], VLMBackend]] = {}


def register_vlm_backend(name: str) -> Callable[[Callable[[Any], VLMBackend]], Callable[[Any], VLMBackend]]:
    """Register a factory ``settings -> VLMBackend`` under ``name``."""

    def decorate(factory: Callable[[Any], VLMBackend]) -> Callable[[Any], VLMBackend]:
        VLM_BACKENDS[name] = factory
        return factory

    return decorate


def build_vlm_backend(name: str, settings: Any) -> VLMBackend:
    if name not in VLM_BACKENDS:
        # Backends live in reward_server/vlm/<name>_backend.py and register on import; importing
        # lazily keeps heavy ones (torch, transformers) out of processes that never use them.
        try:
            importlib.import_module(f"reward_server.vlm.{name}_backend")
        except ModuleNotFoundError as err:
            if err.name != f"reward_server.vlm.{name}_backend":
                raise
    try:
        factory = VLM_BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown VLM backend {name!r}; valid: {', '.join(sorted(VLM_BACKENDS))}") from None
    return factory(settings)
