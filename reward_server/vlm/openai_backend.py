"""VLM backend for any OpenAI-compatible ``/v1/chat/completions`` server (vLLM in production).

One chat completion per (image, question); the image travels as a base64 PNG data URL (lossless).
Calls share one pooled async httpx client, at most ``concurrency`` in flight. A call is retried,
with exponential backoff, only on connection errors/timeouts, 408, 429 and 5xx; any other 4xx is a
deterministic failure and is reported at once (see pitfalls: failures must not look like hangs).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import httpx
import numpy as np

from reward_server.vlm.base import VLMBackend, VLMError, register_vlm_backend
from shared.codec import encode_png_b64

logger = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({408, 429})
MAX_BACKOFF_S = 30.0


def is_retryable_status(status: int) -> bool:
    return status in RETRY_STATUSES or status >= 500


def chat_request(model: str, question: str, image_png_b64: str, max_tokens: int, temperature: float) -> dict:
    """The chat-completions body for one image + question (image first, as LLaVA prompts put it)."""
    return {
        "model": model,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image_png_b64}"}},
                    {"type": "text", "text": question},
                ],
            }
        ],
        "max_tokens": max_tokens,
        "temperature": temperature,
    }


def _answer_text(payload: Any) -> str:
    try:
        content = payload["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise VLMError("malformed chat-completions response: no choices[0].message.content") from None
    if not isinstance(content, str):
        raise VLMError(f"malformed chat-completions response: content is {type(content).__name__}")
    return content.strip()


class OpenAIChatBackend(VLMBackend):
    """Asks an OpenAI-compatible server; one pooled client per event loop."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        concurrency: int = 32,
        timeout_s: float = 60.0,
        max_retries: int = 3,
        backoff_s: float = 0.5,
        max_tokens: int = 256,
        temperature: float = 0.0,
    ):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key = api_key
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_tokens = max_tokens
        self.temperature = temperature
        # The client and semaphore belong to the loop that made them (the server's); a blocking
        # caller using asyncio.run() gets fresh ones for its own loop.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: httpx.AsyncClient | None = None
        self._semaphore: asyncio.Semaphore | None = None

    def _resources(self) -> tuple[httpx.AsyncClient, asyncio.Semaphore]:
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop or self._semaphore is None:
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(self.timeout_s),
                headers=headers,
                limits=httpx.Limits(
                    max_connections=self.concurrency, max_keepalive_connections=self.concurrency
                ),
            )
            self._semaphore = asyncio.Semaphore(self.concurrency)
            self._loop = loop
        return self._client, self._semaphore

    async def answer(self, images: Sequence[np.ndarray], questions: Sequence[str]) -> list[str]:
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images for {len(questions)} questions")
        if not images:
            return []
        encoded = await asyncio.to_thread(lambda: [encode_png_b64(np.ascontiguousarray(i)) for i in images])
        tasks = [asyncio.create_task(self._ask(q, img)) for q, img in zip(questions, encoded, strict=True)]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:  # one failure fails the batch: do not leave the others running
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def _ask(self, question: str, image_b64: str) -> str:
        client, semaphore = self._resources()
        body = chat_request(self.model, question, image_b64, self.max_tokens, self.temperature)
        attempts = self.max_retries + 1
        last = "no attempt made"
        for attempt in range(attempts):
            retry_after: float | None = None
            async with semaphore:
                try:
                    response = await client.post(self.url, json=body)
                except httpx.TransportError as err:  # connect errors, timeouts, dropped connections
                    last = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
                else:
                    if response.status_code == 200:
                        try:
                            return _answer_text(response.json())
                        except ValueError:
                            raise VLMError("VLM answered 200 with a body that is not JSON") from None
                    last = f"HTTP {response.status_code}: {response.text[:300]}"
                    if not is_retryable_status(response.status_code):
                        raise VLMError(f"VLM request rejected ({self.url}): {last}")
                    retry_after = _retry_after_s(response)
            if attempt + 1 < attempts:
                delay = min(MAX_BACKOFF_S, self.backoff_s * 2**attempt)
                if retry_after is not None:
                    delay = max(delay, min(retry_after, MAX_BACKOFF_S))
                logger.info(
                    "VLM call failed (%s); retry %d/%d in %.2f s", last, attempt + 1, self.max_retries, delay
                )
                await asyncio.sleep(delay)
        raise VLMError(f"VLM call failed after {attempts} attempts ({self.url}): {last}")

    async def aclose(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            try:
                await client.aclose()
            except RuntimeError:  # its loop is gone (made by an earlier asyncio.run)
                pass


def _retry_after_s(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff


@register_vlm_backend("openai")
def build_openai_backend(settings: Any) -> OpenAIChatBackend:
    return OpenAIChatBackend(
        base_url=settings.vlm_base_url,
        model=settings.vlm_model,
        api_key=settings.vlm_api_key,
        concurrency=settings.vlm_concurrency,
        timeout_s=settings.vlm_timeout_s,
        max_retries=settings.vlm_max_retries,
        backoff_s=settings.vlm_retry_backoff_s,
        max_tokens=settings.vlm_max_tokens,
        temperature=settings.vlm_temperature,
    )
