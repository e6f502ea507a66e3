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
from reward_server.budget import DECODED_BYTES_PER_PIXEL, MemoryBudget, Reservation, limit_malloc_arenas
from reward_server.errors import ApiError, QueueFullError
from reward_server.idempotency import IdempotencyCache, fingerprint
from reward_server.metrics import ServerMetrics
from reward_server.png import PngHeader, decode_rgb_png_b64, png_header_b64
from reward_server.rewards import InputLimitError, Scorer, ScoringError, build_scorer
from reward_server.settings import ScoringSettings
from reward_server.vlm.base import VLMError
from shared import binary
from shared.binary import BinaryRequestError, BinaryScoreRequest
from shared.codec import ImageDecodeError, ImageTooLargeError
from shared.schemas import ScoreFields, ScoreRequest, ScoreResponse
from shared.validation import MAX_REASON_CHARS, format_validation_error

logger = logging.getLogger(__name__)


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


# Bodies larger than this are parsed (and fingerprinted) in a worker thread, off the event loop.
THREAD_PARSE_BYTES = 256 * 1024


def decode_images(images: Sequence[str] | np.ndarray, max_pixels: int, first: int = 0) -> list[np.ndarray]:
    """Decode base64 PNGs; errors name the position in the request (``first`` = index of images[0]).

    Images of a binary request are already arrays (views of its body, checked when it was parsed).
    """
    if isinstance(images, np.ndarray):
        return list(images)
    out = []
    for i, data in enumerate(images, start=first):
        try:
            out.append(decode_rgb_png_b64(data, max_pixels))
        except ImageTooLargeError as err:
            raise ApiError(413, "image_too_large", f"images[{i}]: {err}") from None
        except ImageDecodeError as err:
            raise ApiError(422, "invalid_image", f"images[{i}]: {err}") from None
    return out


def image_headers(images: Sequence[str], max_pixels: int) -> list[PngHeader]:
    """Every image's size from its PNG header, before any decoding: 422 if not a PNG, 413 if too big."""
    headers = []
    for i, data in enumerate(images):
        try:
            header = png_header_b64(data)
        except ImageDecodeError as err:
            raise ApiError(422, "invalid_image", f"images[{i}]: {err}") from None
        if header.pixels > max_pixels:
            raise ApiError(
                413,
                "image_too_large",
                f"images[{i}]: image is {header.width}x{header.height} = {header.pixels} pixels, "
                f"over the limit of {max_pixels}",
            )
        headers.append(header)
    return headers


async def _done(value: str) -> str:
    return value


def api_error(err: BinaryRequestError) -> ApiError:
    return ApiError(err.status, err.error, str(err)[:MAX_REASON_CHARS])


class RewardService:
    def __init__(self, settings: ScoringSettings, metrics: ServerMetrics):
        self.settings = settings
        self.metrics = metrics
        self.scorers: dict[str, Scorer] = {}
        self.batchers: dict[str, Batcher] = {}
        self.ready = False
        self.load_error: str | None = None
        self.idempotency = IdempotencyCache(settings.idempotency_cache_size, settings.idempotency_ttl_s)
        self.budget = MemoryBudget(
            settings.max_inflight_bytes, settings.retry_after_s, metrics.inflight_bytes
        )
        limit_malloc_arenas()  # so that the process's RSS follows the budget
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
                decode=self._decode_batch,
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

    def not_ready_error(self, detailed: bool = True) -> ApiError:
        """503; ``detailed=False`` (unauthenticated probes) leaves out the error text (it may hold paths)."""
        retry = {"Retry-After": str(self.settings.retry_after_s)}
        if self.load_error is not None:
            reason = (
                self.load_error
                if detailed
                else "loading the rewards failed (details: server log, or with the API key)"
            )
            return ApiError(503, "load_failed", reason, retry)
        return ApiError(503, "not_ready", "the reward server is still loading its models", retry)

    # --- scoring ----------------------------------------------------------------------------

    def _decode_batch(self, images: Sequence[str], first: int) -> list[np.ndarray]:
        return decode_images(images, self.settings.max_image_pixels, first)

    @property
    def binary_limits(self) -> binary.Limits:
        s = self.settings
        return binary.Limits(s.max_images_per_request, s.max_image_pixels, s.max_body_bytes)

    def parse_binary(
        self,
        body: bytes | bytearray | memoryview | np.ndarray,
        header: binary.Header | None = None,
        fields: ScoreFields | None = None,
    ) -> BinaryScoreRequest:
        """A binary (safetensors) body -> request; 400 malformed, 422 invalid, 413 over a limit."""
        try:
            return binary.decode(body, self.binary_limits, header, fields)
        except BinaryRequestError as err:
            raise api_error(err) from None

    def parse(self, body: bytes | bytearray) -> ScoreRequest:
        try:
            return ScoreRequest.model_validate_json(body)
        except ValidationError as err:
            # Input-free: never echo megabytes of base64 back.
            raise ApiError(422, "invalid_request", format_validation_error(err, root="body")) from None

    async def aparse(self, body: bytes | bytearray) -> ScoreRequest:
        """Parse a body; a large one in a thread so the event loop keeps answering."""
        if len(body) > THREAD_PARSE_BYTES:
            return await asyncio.to_thread(self.parse, body)
        return self.parse(body)

    async def score(
        self,
        request: ScoreRequest | BinaryScoreRequest,
        fp: str | None = None,
        reservation: Reservation | None = None,
    ) -> tuple[ScoreResponse, bool]:
        """Score one request; returns (response, replayed_from_idempotency_cache).

        ``fp``: its fingerprint if already computed; ``reservation``: the memory it already holds
        (its body), grown here by its decoded images; without one the request gets its own.
        """
        if reservation is None:
            with self.budget.reservation() as own:
                return await self.score(request, fp, own)
        if not self.ready:
            raise self.not_ready_error()
        if request.reward not in self.batchers:
            raise ApiError(
                400,
                "unknown_reward",
                f"unknown reward {request.reward[:64]!r}; this server offers: {', '.join(self.reward_names)}",
                request_id=request.request_id,
            )
        if len(request.images) > self.settings.max_images_per_request:
            raise ApiError(
                413,
                "too_many_images",
                f"{len(request.images)} images in one request; limit {self.settings.max_images_per_request}",
                request_id=request.request_id,
            )

        entry = self.idempotency.get(request.request_id)
        if entry is not None:
            if fp is None:
                fp = await asyncio.to_thread(fingerprint, request)  # hashes every byte: off the event loop
            if await entry.fingerprint_value() != fp:
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

        # A new request_id: its fingerprint is hashed in a thread while the request is scored (the
        # hash of a 25 MB body costs about as much as scoring it with a cheap reward); a retry that
        # arrives meanwhile waits for it. The request ends only once the hash is done, so its body
        # never outlives its memory reservation.
        hashing: asyncio.Future[str] | None = None
        if self.idempotency.enabled:
            hashing = asyncio.ensure_future(
                asyncio.to_thread(fingerprint, request) if fp is None else _done(fp)
            )
        entry = self.idempotency.begin(request.request_id, hashing)
        try:
            response = await self._score_new(request, reservation)
        except BaseException as err:
            if entry is not None:
                self.idempotency.fail(request.request_id, entry, err)
            raise
        finally:
            if hashing is not None:
                await asyncio.wait({hashing})
        if entry is not None:
            self.idempotency.finish(request.request_id, entry, response)
        return response, False

    async def _score_new(
        self, request: ScoreRequest | BinaryScoreRequest, reservation: Reservation
    ) -> ScoreResponse:
        s = self.settings
        scorer = self.scorers[request.reward]
        metadata = request.metadata if request.metadata is not None else [{} for _ in request.images]
        try:
            scorer.check_inputs(request.prompts, metadata)
        except InputLimitError as err:
            raise ApiError(413, err.error, str(err)[:MAX_REASON_CHARS]) from None
        except ValueError as err:
            raise ApiError(422, "invalid_metadata", str(err)[:MAX_REASON_CHARS]) from None
        # The in-flight limit counts work: images, or VLM calls for a VQA reward (one per question).
        n = scorer.work_units(metadata)
        if n > s.max_inflight_images:
            raise ApiError(
                413,
                "too_much_work",
                f"this request is {n} units of work ({len(request.images)} images); the server takes "
                f"{s.max_inflight_images} at a time (max_inflight_images)",
            )
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
            return await self._decode_and_score(request, reservation)
        except ApiError as err:
            err.request_id = request.request_id
            raise
        finally:
            self._inflight_requests -= 1
            self._inflight_images -= n
            self.metrics.inflight_requests.set(self._inflight_requests)
            self.metrics.inflight_images.set(self._inflight_images)

    async def _decode_and_score(
        self, request: ScoreRequest | BinaryScoreRequest, reservation: Reservation
    ) -> ScoreResponse:
        reward = request.reward
        metadata = request.metadata if request.metadata is not None else [{} for _ in request.images]
        if isinstance(request, ScoreRequest):
            headers = image_headers(request.images, self.settings.max_image_pixels)
            pixels = sum(h.pixels for h in headers)
            reservation.grow(
                DECODED_BYTES_PER_PIXEL * pixels, f"decoding {len(headers)} images of {pixels} pixels"
            )
        # A binary request's images are views of its body, already reserved (nothing to decode).
        try:
            # Decoded one scorer batch at a time, in the batcher (errors name the image's position).
            outputs = await self.batchers[reward].submit(request.images, request.prompts, metadata)
        except QueueFullError as err:
            raise ApiError(
                429, "queue_full", str(err), {"Retry-After": str(self.settings.retry_after_s)}
            ) from None
        except ShuttingDownError as err:
            raise ApiError(503, "shutting_down", str(err)) from None
        except ApiError:
            raise
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
