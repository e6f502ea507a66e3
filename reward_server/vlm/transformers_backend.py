"""VLM backend that runs a LLaVA model in-process with transformers (a single box without vLLM).

``LlavaForConditionalGeneration`` + its ``AutoProcessor`` from a hub id or a local folder, greedy
decoding, the model's own chat template, one left-padded batch per call. ``generate`` blocks, so it
runs in a worker thread, one call at a time (a second call waits instead of competing for the cores).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from reward_server.vlm.base import VLMBackend, VLMError, check_vlm_inputs, register_vlm_backend

DTYPES = ("auto", "float32", "float16", "bfloat16")


def resolve_dtype(dtype: str, device: str):
    """``auto``: float16 on CUDA, float32 elsewhere (CPU half precision is slow and inexact)."""
    import torch

    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    if dtype == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    return getattr(torch, dtype)


class TransformersLlavaBackend(VLMBackend):
    """Answers with a LLaVA model loaded by transformers; greedy, so answers are deterministic."""

    def __init__(self, model: str, device: str = "cpu", dtype: str = "auto", max_new_tokens: int = 256):
        import torch
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        self.device = device
        self.max_new_tokens = max_new_tokens
        self.processor = AutoProcessor.from_pretrained(model)
        self.processor.tokenizer.padding_side = "left"  # generation appends on the right
        self.model = LlavaForConditionalGeneration.from_pretrained(
            model, dtype=resolve_dtype(dtype, device)
        ).to(device)
        self.model.eval()
        self._torch = torch
        self._lock = threading.Lock()
        tokenizer = self.processor.tokenizer
        self._pad_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )

    def prompt(self, question: str) -> str:
        """The chat-templated prompt for one image + question (what vLLM builds from the same message)."""
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return self.processor.apply_chat_template(conversation, add_generation_prompt=True)

    def answer_blocking(self, images: Sequence[np.ndarray], questions: Sequence[str]) -> list[str]:
        """The synchronous work behind ``answer``."""
        check_vlm_inputs(images, questions)
        if not images:
            return []
        prompts = [self.prompt(q) for q in questions]
        # Like transformers' own apply_chat_template(tokenize=True): let the tokenizer add BOS only
        # when the template did not write it.
        bos = self.processor.tokenizer.bos_token
        add_special = not (bos is not None and prompts[0].startswith(bos))
        # PIL images: unambiguous channel layout whatever the size (a 3x3x3 array is not).
        pil_images = [Image.fromarray(np.ascontiguousarray(img)) for img in images]
        inputs = self.processor(
            images=pil_images,
            text=prompts,
            padding=True,
            add_special_tokens=add_special,
            return_tensors="pt",
        ).to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        with self._lock, self._torch.inference_mode():
            output = self.model.generate(
                **inputs,
                do_sample=False,
                max_new_tokens=self.max_new_tokens,
                pad_token_id=self._pad_id,
            )
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        answers = self.processor.batch_decode(new_tokens, skip_special_tokens=True)
        return [a.strip() for a in answers]  # the openai backend strips too

    async def answer(self, images: Sequence[np.ndarray], questions: Sequence[str]) -> list[str]:
        check_vlm_inputs(images, questions)  # caller errors stay ValueError
        try:
            return await asyncio.to_thread(self.answer_blocking, list(images), list(questions))
        except Exception as err:  # out of memory, a bad image, ...: a VLM failure, never a silent 0
            raise VLMError(f"transformers VLM failed: {type(err).__name__}: {err}") from err

    async def aclose(self) -> None:
        self.model = None  # type: ignore[assignment]


@register_vlm_backend("transformers")
def build_transformers_backend(settings: Any) -> TransformersLlavaBackend:
    # vlm_dtype may not exist in the settings yet: "auto" then.
    return TransformersLlavaBackend(
        model=settings.vlm_model,
        device=getattr(settings, "vlm_device", None) or settings.device,
        dtype=getattr(settings, "vlm_dtype", "auto"),
        max_new_tokens=settings.vlm_max_tokens,
    )
