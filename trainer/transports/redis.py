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
    JOB_FIELD,
    REQUEST_FIELD,
    RESULT_FIELD,
    connect,
    reply_stream_key,
    safe_url,
)
from shared.schemas import RedisJob, RedisResult
from trainer.reward_client import RewardResult
from trainer.transports.base import (
    BackgroundLoop,
    LoopRewardClient,
    backoff_delay,
    build_request,
    check_codec,
    to_result,
)
from trainer.transports.errors import RewardDeadlineError, RewardError, RewardRejectedError

log = logging.getLogger(__name__)

READ_BLOCK_S = 0.25  # the reply reader's XREAD block: how long close() may wait for it to return


class RedisRewardClient(LoopRewardClient):
    """Scores batches with ``reward`` through the workers reading ``stream``."""

    def __init__(
        self,
        reward: str,
        redis_url: str,
        *,
        password: str | None = None,
        stream: str = "ddpo:rewards:jobs",
        group: str = "reward-workers",
        prefix: str = "ddpo:rewards",
        deadline_s: float = 600.0,
        max_queued_jobs: int = 10000,
        codec: str = "binary",
    ):
        self.reward = reward
        self.codec = check_codec(codec)
        self.redis_url = redis_url
        self.stream, self.group, self.prefix = stream, group, prefix
        self.deadline_s = deadline_s
        self.max_queued_jobs = max_queued_jobs
        self.client_id = uuid.uuid4().hex[:16]
        self.reply_stream = reply_stream_key(prefix, self.client_id)
        self._pending: dict[str, asyncio.Future[RedisResult]] = {}
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
        self._reader = self._loop.submit(self._read_replies())
        self._closed = False

    # -- public ----------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop within about a second, never raising: the reader leaves its blocking XREAD by itself
        (cancelling a blocked redis-py read could hang), then the reply stream is deleted (bounded)."""
        if self._closed:
            return
        self._closed = True
        self._stopping = True
        try:
            self._reader.result(timeout=READ_BLOCK_S + 2.0)
        except Exception as err:  # the reader failed or is stuck: it is cancelled with the loop below
            log.warning("reply reader did not stop cleanly: %r", err)

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
            await self._enqueue(rid, fields, deadline)
            try:
                result = await asyncio.wait_for(waiter, timeout=max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise RewardDeadlineError(await self._diagnose(rid), rid) from None
        finally:
            self._pending.pop(rid, None)
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

    async def _enqueue(self, rid: str, fields: list[bytes], deadline: float) -> None:
        """XADD the job; wait while the stream is full or Redis is unreachable, up to the deadline."""
        attempt = 0
        while True:
            attempt += 1
            problem = ""
            try:
                async with self._enqueue_lock:  # this client's check and add never interleave
                    queued = await self._redis.xlen(self.stream)
                    if queued < self.max_queued_jobs:
                        entry = {JOB_FIELD: fields[0]}
                        if len(fields) > 1:
                            entry[REQUEST_FIELD] = fields[1]
                        await self._redis.xadd(self.stream, entry)  # type: ignore[arg-type]
                        return
                problem = f"job stream {self.stream} full ({queued} jobs queued)"
            except (RedisConnectionError, RedisTimeoutError) as err:
                problem = f"Redis at {safe_url(self.redis_url)} unreachable: {err}"
            delay = backoff_delay(attempt, 0.1, 2.0)
            if time.monotonic() + delay >= deadline:
                raise RewardDeadlineError(f"could not queue request {rid} ({self.reward}): {problem}", rid)
            log.info("queueing request %s: %s; retrying in %.1f s", rid, problem, delay)
            await asyncio.sleep(delay)

    async def _read_replies(self) -> None:
        """Resolve waiting futures from this client's reply stream (results for unknown ids are ignored)."""
        last_id: bytes | str = "0-0"
        while not self._stopping:
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
                    except (KeyError, ValidationError) as err:
                        log.warning("ignoring malformed reply %s: %s", message_id, err)
                        continue
                    waiter = self._pending.get(result.request_id)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(result)

    async def _diagnose(self, rid: str) -> str:
        """Why no result came: is anyone consuming the stream?"""
        text = f"no result for request {rid} ({self.reward}) within the deadline of {self.deadline_s:g} s"
        try:
            groups = await self._redis.xinfo_groups(self.stream)
            group = next((g for g in groups if _text(g.get("name")) == self.group), None)
            queued = await self._redis.xlen(self.stream)
        except RedisError as err:
            return f"{text} (Redis: {err})"
        if group is None:
            return (
                f"{text}: no consumer group {self.group!r} on stream {self.stream!r}: "
                "is ddpo-reward-worker running?"
            )
        consumers, pending = group.get("consumers", 0), group.get("pending", 0)
        hint = " (is ddpo-reward-worker running?)" if consumers == 0 or pending == 0 else ""
        return (
            f"{text}: stream {self.stream!r} holds {queued} job(s), group {self.group!r} has "
            f"{consumers} consumer(s) and {pending} job(s) being worked on{hint}"
        )


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
