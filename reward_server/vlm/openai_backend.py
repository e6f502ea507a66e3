"""VLM backend for any OpenAI-compatible ``/v1/chat/completions`` server (vLLM in production).

One chat completion per (image, question); the image travels as a base64 PNG data URL (lossless).
Calls share one pooled async httpx client, made once and used on one event loop (the server's), at
most ``concurrency`` in flight. Retries follow the project's one policy (shared/retry.py): connection
errors, timeouts and the retryable statuses of shared/errors.py, with backoff and Retry-After; any
other status is a deterministic failure reported at once (pitfalls: failures must not look like hangs).
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
from shared.errors import is_retryable_status, parse_retry_after
from shared.retry import RetriesExhausted, RetryPolicy, TransientError

logger = logging.getLogger(__name__)

MAX_BACKOFF_S = 30.0  # longest wait between two calls, a Retry-After included


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
    """Asks an OpenAI-compatible server through one pooled client, bound to the first loop that calls."""

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
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.retry = RetryPolicy(
            max_attempts=max_retries + 1,
            initial_s=backoff_s,
            max_s=MAX_BACKOFF_S,
            retry_after_cap_s=MAX_BACKOFF_S,
        )
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # Made once: its connections (and the semaphore) belong to the loop that first uses them.
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_s),
            headers=headers,
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        )
        self._semaphore = asyncio.Semaphore(concurrency)
        self._loop: asyncio.AbstractEventLoop | None = None

    def _check_loop(self) -> None:
        """One event loop for the client's lifetime: pooled connections cannot move between loops."""
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise RuntimeError(
                "OpenAIChatBackend is used from a second event loop; its HTTP pool belongs to the "
                "first (call it from one long-lived loop, not a new asyncio.run() per call)"
            )

    async def answer(self, images: Sequence[np.ndarray], questions: Sequence[str]) -> list[str]:
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images for {len(questions)} questions")
        if not images:
            return []
        self._check_loop()
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
        body = chat_request(self.model, question, image_b64, self.max_tokens, self.temperature)

        async def attempt(_number: int, _left: float | None) -> str:
            async with self._semaphore:  # held for the call only, not while waiting to retry
                try:
                    response = await self._client.post(self.url, json=body)
                except httpx.TransportError as err:  # connect errors, timeouts, dropped connections
                    what = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
                    raise TransientError(what) from None
            if response.status_code == 200:
                try:
                    return _answer_text(response.json())
                except ValueError:
                    raise VLMError("VLM answered 200 with a body that is not JSON") from None
            failure = f"HTTP {response.status_code}: {response.text[:300]}"
            if not is_retryable_status(response.status_code):
                raise VLMError(f"VLM request rejected ({self.url}): {failure}")
            raise TransientError(failure, parse_retry_after(response.headers.get("retry-after")))

        def on_retry(number: int, failure: TransientError, delay: float) -> None:
            logger.info(
                "VLM call failed (%s); retry %d/%d in %.2f s", failure, number, self.max_retries, delay
            )

        try:
            return await self.retry.run(attempt, on_retry)
        except RetriesExhausted as err:
            raise VLMError(
                f"VLM call failed after {err.attempts} attempts ({self.url}): {err.last}"
            ) from None

    async def aclose(self) -> None:
        await self._client.aclose()


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
