"""The Redis key layout and connection helper both sides of the ``redis`` transport use.

Keys (``redis_prefix`` and ``redis_stream`` are configurable; docs/transport.md has the full description):
  <stream>                      job stream, entries {job: RedisJob JSON[, request: binary request]};
                                consumer group of the workers
  <stream>:dead                 dead-letter stream, entries {job_id, request_id, error, reason, ...}
  <prefix>:result:<request_id>  the one stored RedisResult of a request (SET NX, expires)
  <prefix>:replies:<client_id>  one trainer's reply stream, entries {result: RedisResult JSON}
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import EqualJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

# Defaults both sides use; the trainer's options (reward.redis_*) and the worker's (DDPO_WORKER_REDIS_*)
# have the same names. The URL and password also come from these environment variables.
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
REDIS_URL_ENV = "DDPO_REDIS_URL"
REDIS_PASSWORD_ENV = "DDPO_REDIS_PASSWORD"
DEFAULT_STREAM = "ddpo:rewards:jobs"
DEFAULT_GROUP = "reward-workers"
DEFAULT_PREFIX = "ddpo:rewards"
DEFAULT_MAX_QUEUED_JOBS = 10000  # the trainer waits to submit while the job stream holds this many

JOB_FIELD = b"job"
REQUEST_FIELD = b"request"  # binary codec: the request as a safetensors body (shared/binary.py)
RESULT_FIELD = b"result"

# Store a result once and notify the trainer in the same atomic step: a second worker that scored
# the same job (redelivery after a crash or an idle-timeout reclaim) finds the key and sends nothing.
# KEYS: result key, reply stream. ARGV: result JSON, ttl seconds, reply stream max length.
# Returns 1 (stored and sent), 0 (already stored), -1 (the reply key exists and is not a stream).
STORE_RESULT_LUA = """
local kind = redis.call('TYPE', KEYS[2])['ok']
if kind ~= 'stream' and kind ~= 'none' then
  return -1
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'result', ARGV[1])
  redis.call('EXPIRE', KEYS[2], ARGV[2])
  return 1
end
return 0
"""


def result_key(prefix: str, request_id: str) -> str:
    return f"{prefix}:result:{request_id}"


def reply_stream_key(prefix: str, client_id: str) -> str:
    return f"{prefix}:replies:{client_id}"


def dead_letter_key(stream: str) -> str:
    return f"{stream}:dead"


def safe_url(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


async def connect(url: str, password: str | None = None) -> aioredis.Redis:
    """A pooled asyncio Redis client, checked with PING so a wrong URL or password fails here, clearly.

    A password in the URL wins over ``password`` (which usually comes from the environment).
    """
    # Stale pooled connections (Redis restarted, a proxy dropped them) fail their next command:
    # reconnect and retry it, quickly and a bounded number of times (about 6 s in all), the same on
    # every redis-py version (5.x did not retry by default; a failed result publish then waited for
    # claim_idle_s and a rescoring).
    kwargs: dict[str, Any] = {
        "health_check_interval": 30,
        "retry": Retry(EqualJitterBackoff(cap=1.0, base=0.05), retries=10),
        "retry_on_error": [RedisConnectionError, RedisTimeoutError],
    }
    if password and urlsplit(url).password is None:
        kwargs["password"] = password
    client = aioredis.Redis.from_url(url, **kwargs)
    try:
        await client.ping()
    except RedisError as err:
        await client.aclose()
        raise ConnectionError(f"cannot use Redis at {safe_url(url)}: {type(err).__name__}: {err}") from None
    return client
