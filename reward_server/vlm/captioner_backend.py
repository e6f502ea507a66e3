"""VLM backend ``captioner``: the digits captioner (reward_server/vlm/captioner.py) as the judge.

It plays LLaVA in the digits world so the alignment reward travels its real path (trainer -> HTTP
-> reward server -> VLM backend -> BERTScore) on a laptop. It is a captioner, not a VLM: it
IGNORES the question and answers every question with one sentence naming what it sees,
"The image shows a red seven on a blue background."

Settings: ``captioner_path`` is a built captioner folder, or ``builtin`` for the cached one
(built on first use, about a minute). Inference is batched and runs in a worker thread, one batch
at a time, so the event loop keeps serving.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reward_server.vlm.base import VLMBackend, VLMError, check_vlm_inputs, register_vlm_backend
from reward_server.vlm.captioner import Prediction, decode, ensure_captioner, images_to_tensor, load
from shared.digits import DigitSpec

BUILTIN = "builtin"


def caption(prediction: Prediction) -> str:
    """The answer sentence: "The image shows a red seven on a blue background."."""
    spec = DigitSpec(prediction.digit, prediction.stroke, prediction.background)
    return f"The image shows {spec.prompt}."


class CaptionerBackend(VLMBackend):
    """Answers any question about a digits picture with a caption of it (the question is unused)."""

    def __init__(self, folder: str | Path, device: str = "cpu", batch_size: int = 256):
        self.net, self.meta = load(folder)
        self.net.to(device)
        self.device = device
        self.batch_size = batch_size
        self._lock = threading.Lock()  # one batch at a time: concurrent ones would fight for the cores

    def caption_blocking(self, images: Sequence[np.ndarray]) -> list[str]:
        """The synchronous work behind ``answer``: one caption per image."""
        answers: list[str] = []
        with self._lock, torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                x = images_to_tensor(images[start : start + self.batch_size]).to(self.device)
                answers += [caption(p) for p in decode(tuple(t.cpu() for t in self.net(x)))]
        return answers

    async def answer(self, images: Sequence[np.ndarray], questions: Sequence[str]) -> list[str]:
        check_vlm_inputs(images, questions)  # caller errors stay ValueError
        if not images:
            return []
        try:
            return await asyncio.to_thread(self.caption_blocking, list(images))
        except Exception as err:  # a failure of the judge, never a silent 0
            raise VLMError(f"captioner failed: {type(err).__name__}: {err}") from err

    async def aclose(self) -> None:
        self.net = None  # type: ignore[assignment]


def resolve_captioner_path(path: str | None) -> Path:
    """``captioner_path`` -> a folder: ``builtin`` builds or reuses the cached captioner."""
    if path is None:
        raise ValueError("captioner_path must be set for vlm_backend 'captioner' (a folder, or 'builtin')")
    return ensure_captioner() if path == BUILTIN else Path(path)


@register_vlm_backend("captioner")
def build_captioner_backend(settings: Any) -> CaptionerBackend:
    return CaptionerBackend(
        resolve_captioner_path(settings.captioner_path),
        device=getattr(settings, "vlm_device", None) or settings.device,
    )
