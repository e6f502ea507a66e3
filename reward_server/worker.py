"""``ddpo-reward-worker``: score jobs from a Redis Stream with the reward server's own scoring service.

Each worker is one consumer of a consumer group on the job stream (docs/transport.md). For every
job it runs the same ``RewardService`` as ``POST /score`` (registry, batching across concurrent
jobs, limits, error mapping), stores the result once per ``request_id`` (SET NX) and notifies the
submitting trainer in the same atomic step, and only then acknowledges (XACK) and deletes the job.
A worker that dies leaves its jobs pending; live workers take them over (XAUTOCLAIM) once they
have been idle for ``claim_idle_s``. While a job is being scored its worker refreshes the job's
idle time, so slow jobs of a live worker are not stolen. Poison jobs (undecodable, unknown reward,
bad images, redelivered too often) go to the dead-letter stream and are answered with an error.

    ddpo-reward-worker --redis-url redis://127.0.0.1:6379/0 --rewards jpeg_compressibility
    ddpo-reward-worker --help     # worker settings (DDPO_WORKER_*), scoring settings (DDPO_REWARD_*)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, CliSettingsSource, SettingsConfigDict
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from reward_server.budget import BODY_BYTES_FACTOR
from reward_server.errors import ApiError
from reward_server.metrics import ServerMetrics
from reward_server.rewards import import_extra_rewards  # plugins: one loader, the registry's
from reward_server.service import THREAD_PARSE_BYTES, RewardService
from reward_server.settings import ScoringSettings
from shared.binary import BinaryScoreRequest
from shared.cli import (
    ArgumentParser,
    add_config_flag,
    add_settings_flags,
    config_then_flags,
)
from shared.errors import parse_retry_after
from shared.redis_streams import (
    DEFAULT_GROUP,
    DEFAULT_PREFIX,
    DEFAULT_REDIS_URL,
    DEFAULT_STREAM,
    JOB_FIELD,
    REDIS_PASSWORD_ENV,
    REDIS_URL_ENV,
    REQUEST_FIELD,
    STORE_RESULT_LUA,
    connect,
    dead_letter_key,
    reply_stream_key,
    result_key,
    safe_url,
)
from shared.retry import RetriesExhausted, RetryPolicy, TransientError
from shared.schemas import ErrorResponse, RedisJob, RedisResult, ScoreRequest, ScoreResponse
from shared.validation import format_validation_error

logger = logging.getLogger("ddpo-reward-worker")

# A job whose scoring fails transiently (shared/errors.py: overloaded, VLM failed, not ready, scorer
# crashed) is retried in this worker with this backoff, score_attempts times in all.
SCORE_RETRY_INITIAL_S = 0.5
SCORE_RETRY_MAX_S = 10.0
MAX_DEAD_LETTER_PAYLOAD = 1_000_000  # bytes of the original job kept in the dead-letter entry


class ReplyToError(ValueError):
    """A job's reply_to names a key that is not a reply stream: nothing is written there."""


class WorkerSettings(BaseSettings):
    """Worker knobs, env ``DDPO_WORKER_<FIELD>``. Scoring settings are the server's (``DDPO_REWARD_*``)."""

    model_config = SettingsConfigDict(env_prefix="DDPO_WORKER_", extra="forbid")

    # The Redis options have the trainer's names (reward.redis_*) and shared defaults.
    redis_url: str = Field(
        default_factory=lambda: os.environ.get(REDIS_URL_ENV, DEFAULT_REDIS_URL),
        description=f"Redis URL (redis://, rediss:// or unix://); default: ${REDIS_URL_ENV} or local Redis.",
    )

    redis_password: str | None = Field(
        default_factory=lambda: os.environ.get(REDIS_PASSWORD_ENV),
        repr=False,
        description=f"Redis AUTH password (default: ${REDIS_PASSWORD_ENV}); a password in the URL wins.",
    )
    redis_stream: str = Field(default=DEFAULT_STREAM, description="Job stream to consume.")
    redis_group: str = Field(default=DEFAULT_GROUP, description="Consumer group shared by the workers.")
    redis_prefix: str = Field(
        default=DEFAULT_PREFIX,
        description="Key prefix of result keys; a job's reply_to must be <prefix>:replies:<id>.",
    )
    consumer: str = Field(
        default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}",
        description="This worker's consumer name (unique per live worker).",
    )
    concurrency: int = Field(
        default=4, ge=1, description="Jobs scored at once (the scoring service batches them together)."
    )
    claim_idle_s: float = Field(
        default=60.0,
        gt=0,
        description="A job pending this long without its worker refreshing it is taken over (dead worker).",
    )
    max_deliveries: int = Field(
        default=5,
        ge=1,
        description="A job delivered more often than this (it keeps killing workers) is dead-lettered.",
    )
    score_attempts: int = Field(
        default=3,
        ge=1,
        description="Attempts of a job whose scoring fails transiently (429, 5xx) in this worker.",
    )
    result_ttl_s: int = Field(default=3600, ge=1, description="Seconds results and reply streams are kept.")
    reply_maxlen: int = Field(
        default=10000, ge=1, description="Approximate length bound of each reply stream."
    )
    dead_letter_maxlen: int = Field(
        default=10000, ge=1, description="Approximate length bound of the dead-letter stream."
    )
    shutdown_grace_s: float = Field(
        default=30.0,
        ge=0,
        description="On SIGTERM, how long running jobs may finish (the rest are reclaimed).",
    )

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, url: str) -> str:
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return url


class RewardWorker:
    def __init__(self, settings: WorkerSettings, server_settings: ScoringSettings):
        self.settings = settings
        self.server_settings = server_settings
        self.service = RewardService(server_settings, ServerMetrics())
        self.score_retry = RetryPolicy(settings.score_attempts, SCORE_RETRY_INITIAL_S, SCORE_RETRY_MAX_S)
        self.dead_letter = dead_letter_key(settings.redis_stream)
        self.running: dict[bytes, asyncio.Task[None]] = {}
        # Jobs taken over from dead workers, waiting for a slot (they go before new jobs).
        self.reclaimed: OrderedDict[bytes, tuple[dict[bytes, bytes], int]] = OrderedDict()
        self._reclaimed = asyncio.Event()
        self.scored = 0  # jobs whose result this worker stored

    # -- lifecycle ---------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        s = self.settings
        self.redis = await connect(s.redis_url, s.redis_password)
        self.store_result = self.redis.register_script(STORE_RESULT_LUA)
        try:
            await self.ensure_group()
            await self.service.load()
            if self.service.load_error is not None:
                raise RuntimeError(self.service.load_error)
            logger.info(
                "consumer %s ready on stream %s (group %s, Redis %s), rewards: %s",
                s.consumer,
                s.redis_stream,
                s.redis_group,
                safe_url(s.redis_url),
                ", ".join(self.service.reward_names),
            )
            await self.consume(stop)
        finally:
            await self.drain()
            await self.service.close()
            await self.redis.aclose()

    async def ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(
                self.settings.redis_stream, self.settings.redis_group, id="0", mkstream=True
            )
        except ResponseError as err:
            if "BUSYGROUP" not in str(err):
                raise

    async def drain(self) -> None:
        """Let running jobs finish for ``shutdown_grace_s``; cancel the rest (they stay pending)."""
        if not self.running:
            return
        _, still = await asyncio.wait(self.running.values(), timeout=self.settings.shutdown_grace_s)
        for task in still:
            task.cancel()
        await asyncio.gather(*still, return_exceptions=True)

    # -- the loop ----------------------------------------------------------------------------
    async def consume(self, stop: asyncio.Event) -> None:
        """Start reclaimed jobs first, then read new ones; reclaiming runs on its own timer."""
        s = self.settings
        claim_every = max(0.05, s.claim_idle_s / 4)
        reclaimer = asyncio.create_task(self.reclaim_loop(stop, claim_every), name="reclaim")
        try:
            while not stop.is_set():
                try:
                    self.start_reclaimed()
                    free = s.concurrency - len(self.running)
                    if free <= 0:
                        waiting = [*self.running.values(), asyncio.ensure_future(self._reclaimed.wait())]
                        await asyncio.wait(waiting, timeout=claim_every, return_when=asyncio.FIRST_COMPLETED)
                        waiting[-1].cancel()
                        continue
                    block_ms = int(min(0.5, claim_every) * 1000)
                    entries = await self.redis.xreadgroup(
                        s.redis_group, s.consumer, {s.redis_stream: ">"}, count=free, block=block_ms
                    )
                    for _stream, messages in entries or []:
                        for message_id, fields in messages:
                            self.start(message_id, fields, deliveries=1)
                except ResponseError as err:
                    if "NOGROUP" not in str(err):
                        raise
                    logger.warning(
                        "consumer group vanished (Redis restarted without persistence?); recreating"
                    )
                    await self.ensure_group()
                except (RedisConnectionError, RedisTimeoutError) as err:
                    logger.warning("Redis unreachable (%s); retrying in 0.5 s", err)
                    await asyncio.sleep(0.5)
        finally:
            reclaimer.cancel()
            await asyncio.gather(reclaimer, return_exceptions=True)

    async def reclaim_loop(self, stop: asyncio.Event, every: float) -> None:
        """Every ``claim_idle_s / 4``: refresh this worker's jobs, take over dead workers' idle ones."""
        while not stop.is_set():
            try:
                await self.refresh_running()
                await self.reclaim()
            except ResponseError as err:
                if "NOGROUP" not in str(err):
                    logger.warning("reclaiming failed: %s", err)
            except (RedisConnectionError, RedisTimeoutError) as err:
                logger.warning("reclaiming failed, Redis unreachable (%s)", err)
            await asyncio.sleep(every)

    def start(self, message_id: bytes, fields: dict[bytes, bytes] | None, deliveries: int) -> None:
        if message_id in self.running:
            return
        task = asyncio.create_task(self.handle_logged(message_id, fields or {}, deliveries))
        self.running[message_id] = task
        task.add_done_callback(lambda _t: self.running.pop(message_id, None))

    def start_reclaimed(self) -> None:
        """Reclaimed jobs go before new ones: they are the oldest and closest to their deadline."""
        while self.reclaimed and len(self.running) < self.settings.concurrency:
            message_id, (fields, deliveries) = self.reclaimed.popitem(last=False)
            self.start(message_id, fields, deliveries)
        if not self.reclaimed:
            self._reclaimed.clear()

    async def refresh_running(self) -> None:
        """Reset the idle time of the jobs this worker holds (running or reclaimed), so no one steals them."""
        ids = [*self.running, *self.reclaimed]
        if ids:
            s = self.settings
            await self.redis.xclaim(s.redis_stream, s.redis_group, s.consumer, 0, ids, justid=True)

    async def reclaim(self) -> None:
        """Take over jobs left pending by dead workers (idle longer than ``claim_idle_s``).

        Claims up to ``concurrency`` jobs beyond what this worker already holds, even when all its
        slots are busy: they are started before any new job is read.
        """
        s = self.settings
        start: bytes | str = "0-0"
        while (room := s.concurrency - len(self.reclaimed)) > 0:
            reply = await self.redis.xautoclaim(
                s.redis_stream,
                s.redis_group,
                s.consumer,
                min_idle_time=int(s.claim_idle_s * 1000),
                start_id=start,
                count=room,
            )
            start, messages = reply[0], reply[1]
            deleted = reply[2] if len(reply) > 2 else []
            if deleted:  # pending entries whose job was trimmed away: nothing left to do
                await self.redis.xack(s.redis_stream, s.redis_group, *deleted)
            for message_id, fields in messages:
                if fields is None:
                    await self.redis.xack(s.redis_stream, s.redis_group, message_id)
                    continue
                if message_id in self.running:
                    continue
                info = await self.redis.xpending_range(
                    s.redis_stream, s.redis_group, message_id, message_id, 1
                )
                deliveries = info[0]["times_delivered"] if info else 1
                logger.info("reclaimed job %s (delivery %d)", _text(message_id), deliveries)
                self.reclaimed[message_id] = (fields, deliveries)
                self._reclaimed.set()
            if start in (b"0-0", "0-0"):
                break

    # -- one job -----------------------------------------------------------------------------
    async def handle_logged(self, message_id: bytes, fields: dict[bytes, bytes], deliveries: int) -> None:
        try:
            await self.handle(message_id, fields, deliveries)
        except asyncio.CancelledError:
            raise
        except Exception:  # e.g. Redis gone mid-job: the job stays pending and is reclaimed later
            logger.exception("job %s failed; left pending for reclaim", _text(message_id))

    async def handle(self, message_id: bytes, fields: dict[bytes, bytes], deliveries: int) -> None:
        raw = fields.get(JOB_FIELD, b"")
        body = fields.get(REQUEST_FIELD)  # binary codec: the request, raw pixels (shared/binary.py)

        async def poison(rid: str | None, reply_to: str | None, error: str, reason: str) -> None:
            await self.poison(message_id, raw, rid, reply_to, error, reason, deliveries, body)

        settings = self.service.settings
        limit = min(settings.max_body_bytes, settings.max_json_body_bytes)
        if len(raw) > limit:  # the JSON codec's request: parsing it would hold this loop (see the server)
            rid, reply_to = await asyncio.to_thread(_salvage_ids, raw)
            reason = f"JSON job of {len(raw)} bytes is over the limit of {limit}; send large batches binary"
            await poison(rid, reply_to, "body_too_large", reason)
            return
        try:
            job = (
                await asyncio.to_thread(RedisJob.model_validate_json, raw)
                if len(raw) > THREAD_PARSE_BYTES
                else RedisJob.model_validate_json(raw)
            )
        except ValidationError as err:
            rid, reply_to = _salvage_ids(raw)
            reason = format_validation_error(err, root="job")
            await poison(rid, reply_to, "invalid_job", f"undecodable job: {reason}")
            return
        rid = job.rid
        problem = self.reply_to_problem(job.reply_to)
        if problem is not None:  # never write where the job says unless it is a trainer's reply stream
            await poison(rid, None, "invalid_reply_to", problem)
            return
        if deliveries > self.settings.max_deliveries:
            reason = (
                f"delivered {deliveries} times without an answer (it may crash workers); "
                f"max_deliveries is {self.settings.max_deliveries}"
            )
            await poison(rid, job.reply_to, "too_many_deliveries", reason)
            return
        if job.expires_at is not None and time.time() > job.expires_at:
            logger.info("job %s (request %s) expired before it was scored; dropped", _text(message_id), rid)
            await self.ack(message_id)
            return
        request: ScoreRequest | BinaryScoreRequest
        if job.request is not None:
            request = job.request
        elif body is None:
            await poison(rid, job.reply_to, "invalid_job", "binary job without its 'request' field")
            return
        else:
            try:  # the same checks as POST /score: 400 malformed, 422 invalid, 413 over a limit
                request = await asyncio.to_thread(self.service.parse_binary, body)
            except ApiError as err:
                await poison(rid, job.reply_to, err.error, f"binary 'request' field: {err.reason}")
                return
            if request.request_id != rid:
                reason = (
                    f"binary 'request' field is request {request.request_id[:200]!r}, the job says {rid!r}"
                )
                await poison(rid, job.reply_to, "invalid_job", reason)
                return
        response, error = await self.score(request, len(body) if job.request is None and body else 0)
        if response is not None:
            try:
                await self.publish(job.reply_to, RedisResult(request_id=rid, ok=True, response=response))
            except ReplyToError as err:
                await poison(rid, None, "invalid_reply_to", str(err))
                return
            await self.ack(message_id)
            return
        assert error is not None
        await poison(rid, job.reply_to, error.error, error.reason)

    async def score(
        self, request: ScoreRequest | BinaryScoreRequest, body_bytes: int = 0
    ) -> tuple[ScoreResponse | None, ErrorResponse | None]:
        """The service's answer, retrying transient failures a few times (bounded) in this worker.

        ``body_bytes``: a binary request's body, which its images are views of: reserved against the
        memory budget like an HTTP body (its pixels need no decoding).
        """

        async def attempt(_number: int, _left: float | None) -> ScoreResponse:
            try:
                with self.service.budget.reservation() as reservation:
                    reservation.grow(
                        BODY_BYTES_FACTOR * body_bytes, f"a binary request of {body_bytes} bytes"
                    )
                    response, _replayed = await self.service.score(request, None, reservation)
                return response
            except ApiError as err:
                if not err.retryable:
                    raise
                retry_after = parse_retry_after(err.headers.get("Retry-After"))
                raise TransientError(err.reason, retry_after, detail=err) from None

        def on_retry(_number: int, failure: TransientError, delay: float) -> None:
            logger.warning(
                "request %s: %s (%s); retry in %.1f s",
                request.request_id,
                failure.detail.error,
                failure.reason,
                delay,
            )

        try:
            return await self.score_retry.run(attempt, on_retry), None
        except RetriesExhausted as gave_up:
            err = gave_up.last.detail
        except ApiError as failed:
            err = failed
        return None, ErrorResponse(error=err.error, reason=err.reason, request_id=request.request_id)

    def reply_to_problem(self, reply_to: str) -> str | None:
        """Why ``reply_to`` is not a reply stream of this deployment (None if it is one)."""
        s = self.settings
        expected = reply_stream_key(s.redis_prefix, "")
        if not reply_to.startswith(expected) or len(reply_to) == len(expected):
            return f"reply_to {reply_to[:200]!r} is not a reply stream (it must start with {expected!r})"
        if reply_to in (s.redis_stream, self.dead_letter) or reply_to.startswith(
            result_key(s.redis_prefix, "")
        ):
            return f"reply_to {reply_to[:200]!r} is one of the transport's own keys"
        return None

    async def publish(self, reply_to: str, result: RedisResult) -> bool:
        """Store the result once (SET NX) and notify the trainer, atomically; False if it already existed."""
        s = self.settings
        result.worker = s.consumer
        stored = await self.store_result(
            keys=[result_key(s.redis_prefix, result.request_id), reply_to],
            args=[result.model_dump_json(), s.result_ttl_s, s.reply_maxlen],
        )
        if stored == -1:
            raise ReplyToError(f"reply_to {reply_to[:200]!r} exists and is not a stream; nothing written")
        if stored:
            self.scored += 1
        else:
            logger.info(
                "request %s already has a result (duplicate delivery); not sent again", result.request_id
            )
        return bool(stored)

    async def poison(
        self,
        message_id: bytes,
        raw: bytes,
        request_id: str | None,
        reply_to: str | None,
        error: str,
        reason: str,
        deliveries: int,
        body: bytes | None = None,
    ) -> None:
        """Dead-letter the job with its reason, answer the trainer with the error (if known), ack.

        ``body``: a binary job's ``request`` field; its first 1 MB goes into the dead letter too.
        """
        s = self.settings
        logger.warning(
            "job %s (request %s) dead-lettered: %s: %s", _text(message_id), request_id, error, reason
        )
        entry: dict[str, Any] = {
            "job_id": message_id,
            "request_id": request_id or "",
            "error": error,
            "reason": reason,
            "consumer": s.consumer,
            "deliveries": deliveries,
            "failed_at": time.time(),
            "job": raw[:MAX_DEAD_LETTER_PAYLOAD],
        }
        if body is not None:
            entry["request"] = body[:MAX_DEAD_LETTER_PAYLOAD]
        await self.redis.xadd(
            self.dead_letter,
            entry,
            maxlen=s.dead_letter_maxlen,
            approximate=True,
        )
        if request_id and reply_to and self.reply_to_problem(reply_to) is None:
            body = ErrorResponse(error=error, reason=reason, request_id=request_id)
            with contextlib.suppress(ReplyToError):
                await self.publish(reply_to, RedisResult(request_id=request_id, ok=False, error=body))
        await self.ack(message_id)

    async def ack(self, message_id: bytes) -> None:
        """Acknowledge and delete: the stream then holds only outstanding jobs (its length = the queue)."""
        s = self.settings
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(s.redis_stream, s.redis_group, message_id)
            pipe.xdel(s.redis_stream, message_id)
            await pipe.execute()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _salvage_ids(raw: bytes) -> tuple[str | None, str | None]:
    """request_id and reply_to of a job that does not validate, if they can be read at all."""
    try:
        data = json.loads(raw)
        reply_to = data["reply_to"]
        rid = data["request_id"] if data.get("request_id") else data["request"]["request_id"]
    except (ValueError, TypeError, KeyError, AttributeError):
        return None, None
    if isinstance(rid, str) and rid and isinstance(reply_to, str) and reply_to:
        return rid, reply_to
    return None, None


# -- command line ------------------------------------------------------------------------------


def _command_line() -> tuple[argparse.ArgumentParser, list[CliSettingsSource[Any]]]:
    """The worker's flags only: its own settings, the scoring settings and two process flags."""
    from reward_server.cli import CONFIG_HELP, add_extra_rewards_flag

    parser = ArgumentParser(
        prog="ddpo-reward-worker",
        usage="ddpo-reward-worker [--config FILE] [--SETTING VALUE ...]   (--help lists every setting)",
        description="Score DDPO reward jobs from a Redis Stream (docs/transport.md). Every setting is a\n"
        "flag and a variable: worker settings DDPO_WORKER_*, scoring settings DDPO_REWARD_* (the reward\n"
        "server's). Flags override --config FILE (YAML or JSON, field names as keys), which overrides\n"
        "the environment, which overrides the defaults.",
    )
    process = parser.add_argument_group("process (not settings)")
    add_config_flag(process, CONFIG_HELP)
    add_extra_rewards_flag(process)
    sources = [
        add_settings_flags(parser, WorkerSettings, group="worker"),
        add_settings_flags(parser, ScoringSettings, group="scoring"),
    ]
    return parser, sources


def build_parser() -> argparse.ArgumentParser:
    return _command_line()[0]


def settings_from_args(argv: Sequence[str] | None) -> tuple[WorkerSettings, ScoringSettings]:
    """Flags > ``--config FILE`` > environment > defaults, validated (``ValidationError`` names the field)."""
    parser, sources = _command_line()
    namespace = parser.parse_args(argv)
    # Extra rewards must be registered before ScoringSettings checks the reward names.
    env_modules = [m for m in os.environ.get("DDPO_WORKER_EXTRA_REWARDS_MODULES", "").split(",") if m]
    import_extra_rewards(env_modules + namespace.extra_rewards_module)
    worker, scoring = config_then_flags(namespace, sources)
    return WorkerSettings(**worker), ScoringSettings(**scoring)


def main(argv: Sequence[str] | None = None) -> None:
    from reward_server.cli import exit_2_on_bad_settings

    with exit_2_on_bad_settings("ddpo-reward-worker"):
        worker_settings, server_settings = settings_from_args(argv)
    logging.basicConfig(
        level=server_settings.log_level.upper(),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    worker = RewardWorker(worker_settings, server_settings)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await worker.run(stop)

    try:
        asyncio.run(run())
    except (ConnectionError, RuntimeError, RedisError) as err:
        print(f"ddpo-reward-worker: {err}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
