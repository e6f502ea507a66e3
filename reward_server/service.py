"""What ``POST /score`` does, apart from HTTP: limits, idempotency, decoding, batching, error mapping.

Built once per app; the lifespan calls ``load()`` (scorers are built in a worker thread so the
server answers /healthz and /readyz while big models load) and ``close()``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from pydantic import ValidationError

from reward_server.batching import Batcher, ShuttingDownError
from reward_server.errors import ApiError, QueueFullError
from reward_server.idempotency import IdempotencyCache, fingerprint
from reward_server.metrics import ServerMetrics
from reward_server.rewards import Scorer, ScoringError, build_scorer
from reward_server.settings import ServerSettings
from reward_server.vlm.base import VLMError
from shared.codec import ImageDecodeError, ImageTooLargeError, decode_png_b64
from shared.schemas import ScoreRequest, ScoreResponse

logger = logging.getLogger(__name__)

MAX_REASON_CHARS = 1000


def validation_reason(err: ValidationError) -> str:
    """A short, input-free summary of pydantic errors (never echo megabytes of base64 back)."""
    parts = []
    for e in err.errors(include_url=False, include_input=False):
        loc = ".".join(str(x) for x in e.get("loc", ())) or "body"
        parts.append(f"{loc}: {e.get('msg', 'invalid')}")
    return "; ".join(parts)[:MAX_REASON_CHARS]


def jsonable(value: Any) -> Any:
    """Details as plain JSON: numpy -> python, non-finite floats -> None (NaN never leaves the server)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)


def decode_images(images: Sequence[str], max_pixels: int) -> list[np.ndarray]:
    out = []
    for i, data in enumerate(images):
        try:
            out.append(decode_png_b64(data, max_pixels=max_pixels))
        except ImageTooLargeError as err:
            raise ApiError(413, "image_too_large", f"images[{i}]: {err}") from None
        except ImageDecodeError as err:
            raise ApiError(422, "invalid_image", f"images[{i}]: {err}") from None
    return out


class RewardService:
    def __init__(self, settings: ServerSettings, metrics: ServerMetrics):
        self.settings = settings
        self.metrics = metrics
        self.scorers: dict[str, Scorer] = {}
        self.batchers: dict[str, Batcher] = {}
        self.ready = False
        self.load_error: str | None = None
        self.idempotency = IdempotencyCache(settings.idempotency_cache_size, settings.idempotency_ttl_s)
        self._inflight_requests = 0
        self._inflight_images = 0

    @property
    def reward_names(self) -> list[str]:
        return list(self.settings.rewards)

    # --- lifecycle --------------------------------------------------------------------------

    async def load(self) -> None:
        """Build every enabled scorer (in a thread: model loading blocks), then start its batcher."""
        try:
            for name in self.settings.rewards:
                started = time.perf_counter()
                self.scorers[name] = await asyncio.to_thread(build_scorer, name, self.settings)
                logger.info("loaded reward %s in %.1f s", name, time.perf_counter() - started)
        except Exception as err:
            self.load_error = f"loading reward {name!r} failed: {type(err).__name__}: {err}"[
                :MAX_REASON_CHARS
            ]
            logger.exception("reward server not ready: %s", self.load_error)
            return
        for name, scorer in self.scorers.items():
            size, wait_ms, concurrent = self.settings.batching_for(name)
            batcher = Batcher(
                name,
                scorer,
                max_batch_size=size,
                max_wait_ms=wait_ms,
                max_queue_images=self.settings.max_queue_images,
                max_concurrent_batches=concurrent,
                cross_request=self.settings.cross_request_batching,
                metrics=self.metrics,
            )
            batcher.start()
            self.batchers[name] = batcher
        self.ready = True
        self.metrics.ready.set(1)

    async def close(self) -> None:
        self.ready = False
        self.metrics.ready.set(0)
        for batcher in self.batchers.values():
            await batcher.stop()
        for scorer in self.scorers.values():
            try:
                await scorer.aclose()
            except Exception:  # shutting down: log, keep closing the others
                logger.exception("closing reward %s failed", scorer.name)

    def not_ready_error(self) -> ApiError:
        retry = {"Retry-After": str(self.settings.retry_after_s)}
        if self.load_error is not None:
            return ApiError(503, "load_failed", self.load_error, retry)
        return ApiError(503, "not_ready", "the reward server is still loading its models", retry)

    # --- scoring ----------------------------------------------------------------------------

    def parse(self, body: bytes) -> ScoreRequest:
        try:
            return ScoreRequest.model_validate_json(body)
        except ValidationError as err:
            raise ApiError(422, "invalid_request", validation_reason(err)) from None

    async def score(self, request: ScoreRequest) -> tuple[ScoreResponse, bool]:
        """Score one request; returns (response, replayed_from_idempotency_cache)."""
        if not self.ready:
            raise self.not_ready_error()
        if request.reward not in self.batchers:
            raise ApiError(
                400,
                "unknown_reward",
                f"unknown reward {request.reward!r}; this server offers: {', '.join(self.reward_names)}",
                request_id=request.request_id,
            )
        if len(request.images) > self.settings.max_images_per_request:
            raise ApiError(
                413,
                "too_many_images",
                f"{len(request.images)} images in one request; limit {self.settings.max_images_per_request}",
                request_id=request.request_id,
            )

        fp = fingerprint(request)
        entry = self.idempotency.get(request.request_id)
        if entry is not None:
            if entry.fingerprint != fp:
                raise ApiError(
                    409,
                    "request_id_conflict",
                    f"request_id {request.request_id!r} was already used for a different request",
                    request_id=request.request_id,
                )
            await entry.done.wait()  # the first attempt may still be running: share its result
            if entry.response is not None:
                return entry.response, True
            if isinstance(entry.error, ApiError):
                raise entry.error
            raise ApiError(
                500, "internal_error", "the original attempt failed", request_id=request.request_id
            )

        entry = self.idempotency.begin(request.request_id, fp)
        try:
            response = await self._score_new(request)
        except BaseException as err:
            if entry is not None:
                self.idempotency.fail(request.request_id, entry, err)
            raise
        if entry is not None:
            self.idempotency.finish(request.request_id, entry, response)
        return response, False

    async def _score_new(self, request: ScoreRequest) -> ScoreResponse:
        n = len(request.images)
        s = self.settings
        if (
            self._inflight_requests + 1 > s.max_inflight_requests
            or self._inflight_images + n > s.max_inflight_images
        ):
            raise ApiError(
                429,
                "overloaded",
                f"busy: {self._inflight_requests} requests, {self._inflight_images} images in flight; "
                "retry later",
                {"Retry-After": str(s.retry_after_s)},
                request_id=request.request_id,
            )
        self._inflight_requests += 1
        self._inflight_images += n
        self.metrics.inflight_requests.set(self._inflight_requests)
        self.metrics.inflight_images.set(self._inflight_images)
        try:
            return await self._decode_and_score(request)
        except ApiError as err:
            err.request_id = request.request_id
            raise
        finally:
            self._inflight_requests -= 1
            self._inflight_images -= n
            self.metrics.inflight_requests.set(self._inflight_requests)
            self.metrics.inflight_images.set(self._inflight_images)

    async def _decode_and_score(self, request: ScoreRequest) -> ScoreResponse:
        reward = request.reward
        metadata = request.metadata if request.metadata is not None else [{} for _ in request.images]
        try:
            self.scorers[reward].check_inputs(request.prompts, metadata)
        except ValueError as err:
            raise ApiError(422, "invalid_metadata", str(err)[:MAX_REASON_CHARS]) from None
        images = await asyncio.to_thread(decode_images, request.images, self.settings.max_image_pixels)
        try:
            outputs = await self.batchers[reward].submit(images, request.prompts, metadata)
        except QueueFullError as err:
            raise ApiError(
                429, "queue_full", str(err), {"Retry-After": str(self.settings.retry_after_s)}
            ) from None
        except ShuttingDownError as err:
            raise ApiError(503, "shutting_down", str(err)) from None
        except VLMError as err:
            raise ApiError(502, "vlm_error", f"reward {reward!r}: {err}"[:MAX_REASON_CHARS]) from None
        except ScoringError as err:
            raise ApiError(500, "scoring_failed", f"reward {reward!r}: {err}"[:MAX_REASON_CHARS]) from None
        except Exception as err:
            logger.exception("reward %s failed", reward)
            raise ApiError(
                500, "scoring_failed", f"reward {reward!r}: {type(err).__name__}: {err}"[:MAX_REASON_CHARS]
            ) from None
        self.metrics.images.labels(reward).inc(len(outputs))
        return ScoreResponse(
            request_id=request.request_id,
            reward=reward,
            rewards=[o.reward for o in outputs],
            details=[jsonable(o.details) for o in outputs],
        )
