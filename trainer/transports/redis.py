"""``redis`` transport: jobs onto a Redis Stream, results back on this trainer's own reply stream.

Layout and guarantees are written down in docs/transport.md. In short: the trainer XADDs a
``RedisJob`` (a ``ScoreRequest`` + ``reply_to``) to the job stream; any ``ddpo-reward-worker`` of
the consumer group scores it and stores one ``RedisResult`` per ``request_id`` (SET NX), sending
it to ``reply_to`` in the same atomic step; this client reads its reply stream and resolves the
batch's future. A batch without a result by its deadline fails with a diagnosis.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np
from pydantic import ValidationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared.redis_streams import (
    DEFAULT_GROUP,
    DEFAULT_MAX_QUEUED_JOBS,
    DEFAULT_PREFIX,
    DEFAULT_STREAM,
    JOB_FIELD,
    REQUEST_FIELD,
    RESULT_FIELD,
    connect,
    reply_stream_key,
    result_key,
    safe_url,
)
from shared.retry import RetriesExhausted, RetryPolicy, TransientError
from shared.schemas import RedisJob, RedisResult
from shared.validation import format_validation_error
from trainer.reward_api import RewardResult
from trainer.transports.base import (
    BackgroundLoop,
    LoopRewardClient,
    build_request,
    check_codec,
    to_result,
)
from trainer.transports.errors import RewardDeadlineError, RewardError, RewardLostError, RewardRejectedError

log = logging.getLogger(__name__)

READ_BLOCK_S = 0.25  # the reply reader's XREAD block: how long close() may wait for it to return
CHECK_INTERVAL_S = 15.0  # how often queued jobs are checked for being lost (workers' claim_idle_s: 60)
ACTIVE_CONSUMER_S = 30.0  # a consumer seen within this is counted as running in diagnoses
ENQUEUE_BACKOFF_INITIAL_S = 0.1  # waiting for room in the job stream or for Redis to come back
ENQUEUE_BACKOFF_MAX_S = 2.0


class RedisRewardClient(LoopRewardClient):
    """Scores batches with ``reward`` through the workers reading ``stream``."""

    def __init__(
        self,
        reward: str,
        redis_url: str,
        *,
        password: str | None = None,
        stream: str = DEFAULT_STREAM,
        group: str = DEFAULT_GROUP,
        prefix: str = DEFAULT_PREFIX,
        deadline_s: float = 600.0,
        max_queued_jobs: int = DEFAULT_MAX_QUEUED_JOBS,
        codec: str = "binary",
        check_interval_s: float = CHECK_INTERVAL_S,
    ):
        self.reward = reward
        self.codec = check_codec(codec)
        self.redis_url = redis_url
        self.stream, self.group, self.prefix = stream, group, prefix
        self.deadline_s = deadline_s
        self.max_queued_jobs = max_queued_jobs
        self.client_id = uuid.uuid4().hex[:16]
        self.reply_stream = reply_stream_key(prefix, self.client_id)
        self.check_interval_s = check_interval_s
        self._pending: dict[str, asyncio.Future[RedisResult]] = {}
        self._entries: dict[str, bytes] = {}  # request_id -> its job's stream entry id, once queued
        self._restarted: str = ""  # set when Redis's run_id changed: names the restart in errors
        self._reset_reader = False
        self._loop = BackgroundLoop(f"reward-redis-{reward}")
        try:
            self._redis = self._loop.run(connect(redis_url, password), timeout=30)
        except BaseException:
            self._loop.stop()
            raise
        # Check the backlog, then XADD: one at a time per client. Not a Lua script: Redis copies a
        # script's arguments (a 25 MB job cost 110 ms of Redis time through EVALSHA, 27 ms by XADD).
        self._enqueue_lock = asyncio.Lock()
        self._stopping = False
        self._run_id = self._loop.run(self._server_run_id(), timeout=30)
        self._reader = self._loop.submit(self._read_replies())
        self._watcher = self._loop.submit(self._watch_jobs())
        self._closed = False

    # -- public ----------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop within about a second, never raising: the reader leaves its blocking XREAD by itself
        (cancelling a blocked redis-py read could hang), then the reply stream is deleted (bounded)."""
        if self._closed:
            return
        self._closed = True
        self._stopping = True
        for task, what in ((self._reader, "reply reader"), (self._watcher, "job watcher")):
            try:
                task.result(timeout=READ_BLOCK_S + 2.0)
            except Exception as err:  # failed or stuck: it is cancelled with the loop below
                log.warning("%s did not stop cleanly: %r", what, err)

        async def cleanup() -> None:
            try:
                await asyncio.wait_for(self._redis.delete(self.reply_stream), 2.0)
            except (RedisError, TimeoutError, OSError):
                pass  # it expires anyway
            try:
                await asyncio.wait_for(self._redis.aclose(), 2.0)
            except (RedisError, TimeoutError, OSError):
                pass

        try:
            self._loop.stop(cleanup(), timeout=6.0)
        except Exception as err:  # closing must not fail a training run that is ending anyway
            log.warning("closing the Redis reward client: %r", err)

    # -- internals -------------------------------------------------------------------------------
    async def _score(
        self,
        rid: str,
        payload: np.ndarray | bytes,
        prompts: list[str],
        metadata: Sequence[dict[str, Any]] | None,
    ) -> RewardResult:
        deadline = time.monotonic() + self.deadline_s
        if isinstance(payload, bytes):
            fields = self._binary_fields(rid, payload)
        else:  # PNG encoding is the expensive part: a thread
            fields = await asyncio.to_thread(self._json_fields, rid, payload, prompts, metadata)
        waiter: asyncio.Future[RedisResult] = asyncio.get_running_loop().create_future()
        self._pending[rid] = waiter  # before XADD: a fast worker may answer at once
        try:
            self._entries[rid] = await self._enqueue(rid, fields, deadline)
            try:
                result = await asyncio.wait_for(waiter, timeout=max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise RewardDeadlineError(await self._diagnose(rid), rid) from None
        finally:
            self._pending.pop(rid, None)
            self._entries.pop(rid, None)
        if result.ok:
            assert result.response is not None
            return to_result(result.response, rid, self.reward, len(prompts))
        assert result.error is not None
        raise RewardRejectedError(
            f"reward worker {result.worker or '?'} could not score request {rid} ({self.reward}): "
            f"{result.error.error}: {result.error.reason}",
            rid,
            code=result.error.error,
        )

    def _binary_fields(self, rid: str, body: bytes) -> list[bytes]:
        """The entry's fields: the job JSON and the binary request, a field of its own (no base64)."""
        now = time.time()
        job = RedisJob(
            request_id=rid, reply_to=self.reply_stream, submitted_at=now, expires_at=now + self.deadline_s
        )
        return [job.model_dump_json(exclude_none=True).encode(), body]

    def _json_fields(
        self, rid: str, images: np.ndarray, prompts: list[str], metadata: Sequence[dict[str, Any]] | None
    ) -> list[bytes]:
        now = time.time()
        request = build_request(rid, self.reward, images, prompts, metadata)
        job = RedisJob(
            request=request, reply_to=self.reply_stream, submitted_at=now, expires_at=now + self.deadline_s
        )
        return [job.model_dump_json(exclude_none=True).encode()]

    async def _enqueue(self, rid: str, fields: list[bytes], deadline: float) -> bytes:
        """XADD the job (returns its entry id); wait while the stream is full or Redis is unreachable,
        up to the deadline (the one retry policy, bounded by the deadline alone)."""
        policy = RetryPolicy(
            None, ENQUEUE_BACKOFF_INITIAL_S, ENQUEUE_BACKOFF_MAX_S, deadline_s=deadline - time.monotonic()
        )

        async def attempt(_number: int, _left: float | None) -> bytes:
            try:
                async with self._enqueue_lock:  # this client's check and add never interleave
                    queued = await self._redis.xlen(self.stream)
                    if queued < self.max_queued_jobs:
                        entry = {JOB_FIELD: fields[0]}
                        if len(fields) > 1:
                            entry[REQUEST_FIELD] = fields[1]
                        return await self._redis.xadd(self.stream, entry)  # type: ignore[arg-type]
            except (RedisConnectionError, RedisTimeoutError) as err:
                raise TransientError(f"Redis at {safe_url(self.redis_url)} unreachable: {err}") from None
            raise TransientError(f"job stream {self.stream} full ({queued} jobs queued)")

        def on_retry(_number: int, failure: TransientError, delay: float) -> None:
            log.info("queueing request %s: %s; retrying in %.1f s", rid, failure.reason, delay)

        try:
            return await policy.run(attempt, on_retry)
        except RetriesExhausted as err:
            raise RewardDeadlineError(
                f"could not queue request {rid} ({self.reward}): {err.last.reason}", rid
            ) from None

    async def _read_replies(self) -> None:
        """Resolve waiting futures from this client's reply stream (results for unknown ids are ignored)."""
        last_id: bytes | str = "0-0"
        while not self._stopping:
            if self._reset_reader:  # Redis restarted: a new reply stream, its ids start anew
                self._reset_reader, last_id = False, "0-0"
            try:
                entries = await self._redis.xread(
                    {self.reply_stream: last_id}, count=100, block=int(READ_BLOCK_S * 1000)
                )
            except (RedisConnectionError, RedisTimeoutError) as err:
                log.warning("reading replies from Redis failed (%s); retrying", err)
                await asyncio.sleep(0.5)
                continue
            for _stream, messages in entries or []:
                for message_id, fields in messages:
                    last_id = message_id
                    try:
                        result = RedisResult.model_validate_json(fields[RESULT_FIELD])
                    except KeyError:
                        log.warning("ignoring reply %s without a %r field", message_id, RESULT_FIELD)
                        continue
                    except ValidationError as err:
                        reason = format_validation_error(err, root="result")
                        log.warning("ignoring malformed reply %s: %s", message_id, reason)
                        continue
                    waiter = self._pending.get(result.request_id)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(result)

    async def _server_run_id(self) -> str:
        return _text((await self._redis.info("server")).get("run_id", ""))

    async def _watch_jobs(self) -> None:
        """Every ``check_interval_s``: fail the queued jobs Redis lost, fetch results whose reply was lost.

        A worker stores a job's result before it deletes the job (atomically with the reply), so a
        job whose stream entry is gone without a result will never be answered: Redis restarted
        without persistence, or the stream was trimmed or deleted. It fails at once with
        ``RewardLostError`` instead of at its deadline. A result stored but not received (its reply
        entry lost) is read from its key.
        """
        stale: dict[str, int] = {}  # request_id -> checks that found a result but no reply yet
        while not self._stopping:
            slept = 0.0
            while slept < self.check_interval_s and not self._stopping:
                await asyncio.sleep(min(READ_BLOCK_S, self.check_interval_s))
                slept += READ_BLOCK_S
            if self._stopping:
                return
            try:
                await self._check_jobs(stale)
            except (RedisConnectionError, RedisTimeoutError) as err:
                log.warning("checking queued jobs failed, Redis unreachable (%s)", err)
            except RedisError as err:
                log.warning("checking queued jobs failed: %s", err)

    async def _check_jobs(self, stale: dict[str, int]) -> None:
        run_id = await self._server_run_id()
        if run_id != self._run_id:
            self._run_id = run_id
            self._restarted = f"Redis at {safe_url(self.redis_url)} restarted at {time.strftime('%H:%M:%S')}"
            self._reset_reader = True
            log.warning("%s (run_id changed): checking %d queued job(s)", self._restarted, len(self._entries))
        jobs = [
            (rid, entry)
            for rid, entry in list(self._entries.items())
            if (waiter := self._pending.get(rid)) is not None and not waiter.done()
        ]
        if not jobs:
            return
        async with self._redis.pipeline(transaction=True) as pipe:  # one snapshot of every job
            for rid, entry in jobs:
                pipe.xrange(self.stream, entry, entry, count=1)
                pipe.get(result_key(self.prefix, rid))
            answers = await pipe.execute()
        for n, (rid, entry) in enumerate(jobs):
            queued, stored = answers[2 * n], answers[2 * n + 1]
            waiter = self._pending.get(rid)
            if waiter is None or waiter.done():
                continue
            if stored is not None:  # answered; its reply should be here by the next check
                stale[rid] = stale.get(rid, 0) + 1
                if stale[rid] >= 2:
                    try:
                        waiter.set_result(RedisResult.model_validate_json(stored))
                        log.warning("request %s: its reply never came, read its stored result", rid)
                    except ValidationError as err:
                        reason = format_validation_error(err, root="result")
                        log.warning("request %s: malformed stored result: %s", rid, reason)
                continue
            if not queued:
                why = (
                    self._restarted + " without persistence?"
                    if self._restarted
                    else ("the stream was trimmed or deleted?")
                )
                waiter.set_exception(
                    RewardLostError(
                        f"request {rid} ({self.reward}) was lost: its job {_text(entry)} is no longer in "
                        f"stream {self.stream!r} and it has no result ({why}); nothing will answer it",
                        rid,
                    )
                )
        for rid in [r for r in stale if r not in self._entries]:
            del stale[rid]

    async def _diagnose(self, rid: str) -> str:
        """Why no result came: is anyone consuming the stream? (XINFO CONSUMERS: who, and how recently.)"""
        text = f"no result for request {rid} ({self.reward}) within the deadline of {self.deadline_s:g} s"
        try:
            groups = await self._redis.xinfo_groups(self.stream)
            group = next((g for g in groups if _text(g.get("name")) == self.group), None)
            queued = await self._redis.xlen(self.stream)
            consumers = await self._redis.xinfo_consumers(self.stream, self.group) if group else []
        except RedisError as err:
            return f"{text} (Redis: {err})"
        if group is None:
            return (
                f"{text}: no consumer group {self.group!r} on stream {self.stream!r}: "
                "is ddpo-reward-worker running?"
            )
        # idle: ms since the consumer last read or claimed (a waiting worker reads every 0.5 s).
        active = [c for c in consumers if c.get("idle", 0) <= ACTIVE_CONSUMER_S * 1000]
        names = ", ".join(
            f"{_text(c.get('name'))} ({c.get('pending', 0)} pending, seen {c.get('idle', 0) / 1e3:.1f} s ago)"
            for c in active[:5]
        )
        pending = group.get("pending", 0)
        where = (
            f"stream {self.stream!r} holds {queued} job(s); group {self.group!r}: "
            f"{len(active)} consumer(s) active in the last {ACTIVE_CONSUMER_S:g} s"
            + (f" ({names})" if names else "")
            + f", {len(consumers) - len(active)} gone quiet, {pending} job(s) delivered and not done"
        )
        if not active:
            return f"{text}: {where}: is ddpo-reward-worker running?"
        return f"{text}: {where}: the workers are busy or slow (more workers, or a longer deadline?)"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def redis_client_from_config(cfg: Any) -> RedisRewardClient:
    """``RewardConfig`` -> client. The password comes from the env variable ``cfg.redis_password_env``."""
    if not cfg.redis_url:
        raise RewardError("reward.redis_url is required for the redis transport")
    return RedisRewardClient(
        cfg.name,
        cfg.redis_url,
        password=os.environ.get(cfg.redis_password_env) or None,
        stream=cfg.redis_stream,
        group=cfg.redis_group,
        prefix=cfg.redis_prefix,
        deadline_s=cfg.deadline_s,
        max_queued_jobs=cfg.redis_max_queued_jobs,
        codec=getattr(cfg, "codec", "binary"),
    )
