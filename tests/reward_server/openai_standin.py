"""A small stand-in for an OpenAI-compatible chat-completions server (what vLLM serves).

It exists because a real VLM cannot run inside a unit test here (the slow integration test runs
a real vLLM). It checks the request exactly as the chat-completions protocol shapes it (model,
one user message with a base64 PNG ``image_url`` part and a ``text`` part, max_tokens,
temperature) and answers deterministically from the pixels: the colour the image is mostly made
of. Tests script failures (HTTP status codes) and a fixed per-call latency.
"""

from __future__ import annotations

import asyncio
import base64
import io
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from PIL import Image

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 200, 30),
    "blue": (30, 30, 220),
    "white": (245, 245, 245),
    "black": (10, 10, 10),
}


def dominant_colour(image: np.ndarray) -> str:
    mean = image.reshape(-1, 3).mean(axis=0)
    return min(COLOURS, key=lambda name: float(np.sum((mean - np.array(COLOURS[name])) ** 2)))


def describe(image: np.ndarray) -> str:
    """The stand-in's whole 'vision model' (tests compute the expected answer with this too)."""
    return f"The picture is mostly {dominant_colour(image)}, a plain {dominant_colour(image)} square."


@dataclass
class StandinState:
    model: str = "standin-llava"
    api_key: str | None = None
    latency_s: float = 0.0
    fail_with: list[int] = field(default_factory=list)  # statuses to answer with, one per call, in order
    retry_after: str = "0"  # the Retry-After of a scripted 429
    calls: int = 0
    questions: list[str] = field(default_factory=list)
    bodies: list[dict[str, Any]] = field(default_factory=list)  # request bodies minus the image data


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": "invalid_request_error", "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


def _parse_chat(body: Any, state: StandinState) -> tuple[np.ndarray, str] | str:
    """(image, question) or an error message, following the chat-completions request schema."""
    if not isinstance(body, dict):
        return "body must be a JSON object"
    if body.get("model") != state.model:
        return f"model {body.get('model')!r} does not exist"
    for key in ("max_tokens", "temperature"):
        if key in body and not isinstance(body[key], (int, float)):
            return f"{key} must be a number"
    messages = body.get("messages")
    if not isinstance(messages, list) or len(messages) != 1 or messages[0].get("role") != "user":
        return "expected exactly one user message"
    content = messages[0].get("content")
    if not isinstance(content, list):
        return "content must be a list of parts"
    texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
    urls = [
        (p.get("image_url") or {}).get("url")
        for p in content
        if isinstance(p, dict) and p.get("type") == "image_url"
    ]
    if len(texts) != 1 or len(urls) != 1 or len(content) != 2:
        return "expected one text part and one image_url part"
    prefix = "data:image/png;base64,"
    if not isinstance(urls[0], str) or not urls[0].startswith(prefix):
        return "image_url must be a data:image/png;base64 URL"
    try:
        with Image.open(io.BytesIO(base64.b64decode(urls[0][len(prefix) :], validate=True))) as img:
            if img.format != "PNG" or img.mode != "RGB":
                return f"expected an RGB PNG, got {img.format} {img.mode}"
            image = np.asarray(img)
    except Exception as err:
        return f"cannot decode image: {err}"
    return image, texts[0]


def create_standin_app(state: StandinState) -> FastAPI:
    app = FastAPI()

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": state.model, "object": "model", "owned_by": "standin"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> JSONResponse:
        state.calls += 1
        if state.api_key is not None and request.headers.get("authorization") != f"Bearer {state.api_key}":
            return _error(401, "invalid api key")
        if state.latency_s:
            await asyncio.sleep(state.latency_s)  # fixed per call, whatever else is in flight
        if state.fail_with:
            status = state.fail_with.pop(0)
            headers = {"Retry-After": state.retry_after} if status == 429 else None
            return _error(status, f"scripted failure {status}", headers)
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "body is not JSON")
        parsed = _parse_chat(body, state)
        if isinstance(parsed, str):
            return _error(400, parsed)
        image, question = parsed
        state.questions.append(question)
        state.bodies.append({k: v for k, v in body.items() if k != "messages"})
        text = describe(image)
        return JSONResponse(
            {
                "id": f"chatcmpl-{state.calls}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": state.model,
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                ],
                "usage": {"prompt_tokens": 1, "completion_tokens": len(text.split()), "total_tokens": 0},
            }
        )

    return app
