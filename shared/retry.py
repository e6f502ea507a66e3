"""The one retry policy (built on tenacity): bounded attempts, backoff with jitter, Retry-After, deadline.

Every retry loop of the project goes through ``RetryPolicy.run``: the trainer's HTTP client, the
Redis client's enqueue, the Redis worker's scoring and the VLM client. An attempt that may succeed
if repeated raises ``TransientError`` (which statuses qualify: ``shared.errors.RETRYABLE_STATUSES``);
anything else propagates at once. When the budget is spent ``run`` raises ``RetriesExhausted`` with
the last failure and whether the deadline (rather than the attempt count) ended it.
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import tenacity
from tenacity import AsyncRetrying, RetryCallState, RetryError

T = TypeVar("T")


class TransientError(Exception):
    """One failed attempt that may succeed if repeated.

    ``retry_after``: seconds the other side asked us to wait (Retry-After); the next attempt waits
    at least that long. ``detail``: anything the caller wants back if retries run out.
    """

    def __init__(self, reason: str, retry_after: float | None = None, detail: Any = None):
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        self.detail = detail


class RetriesExhausted(Exception):
    """The retry budget is spent; ``last`` is the final attempt's failure."""

    def __init__(self, last: TransientError, attempts: int, elapsed_s: float, by_deadline: bool):
        super().__init__(last.reason)
        self.last = last
        self.attempts = attempts
        self.elapsed_s = elapsed_s
        self.by_deadline = by_deadline  # True: the deadline ended it, not the attempt count


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter, about ``initial_s * 2**(n-1)`` before retry n, capped at ``max_s``.

    Jitter draws from [d/2, d] so many clients do not retry in lock-step after a restart. A
    Retry-After is honoured when longer (up to ``retry_after_cap_s`` when set). No retry starts if its
    wait would end past ``deadline_s`` (counted from the first attempt). ``max_attempts`` None:
    bounded by the deadline alone.
    """

    max_attempts: int | None
    initial_s: float
    max_s: float
    deadline_s: float | None = None
    retry_after_cap_s: float | None = None

    def __post_init__(self) -> None:
        if self.max_attempts is None and self.deadline_s is None:
            raise ValueError("a retry policy needs max_attempts or deadline_s (retries must be bounded)")
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (from 1)."""
        delay = min(self.max_s, self.initial_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
        if retry_after is not None:
            if self.retry_after_cap_s is not None:
                retry_after = min(retry_after, self.retry_after_cap_s)
            delay = max(delay, retry_after)
        return delay

    def _wait(self, state: RetryCallState) -> float:
        failure = state.outcome.exception() if state.outcome is not None else None
        retry_after = failure.retry_after if isinstance(failure, TransientError) else None
        return self.delay(state.attempt_number, retry_after)

    def retrying(
        self,
        sleep: Callable[[float], Awaitable[None]] | None = None,
        before_sleep: Callable[[RetryCallState], None] | None = None,
    ) -> AsyncRetrying:
        """The tenacity controller of this policy (``run`` is the usual way to use it)."""
        stop: tenacity.stop.stop_base = tenacity.stop_never
        if self.max_attempts is not None:
            stop = tenacity.stop_after_attempt(self.max_attempts)
        if self.deadline_s is not None:
            stop = stop | tenacity.stop_before_delay(self.deadline_s)
        kwargs: dict[str, Any] = {"sleep": sleep} if sleep is not None else {}
        if before_sleep is not None:
            kwargs["before_sleep"] = before_sleep
        return AsyncRetrying(
            stop=stop,
            wait=self._wait,
            retry=tenacity.retry_if_exception_type(TransientError),
            **kwargs,
        )

    async def run(
        self,
        attempt: Callable[[int, float | None], Awaitable[T]],
        on_retry: Callable[[int, TransientError, float], None] | None = None,
        sleep: Callable[[float], Awaitable[None]] | None = None,
    ) -> T:
        """Call ``attempt(number, seconds_left)`` until it returns, raises a non-transient error, or the
        budget is spent (``RetriesExhausted``). ``seconds_left``: until the deadline (None without one),
        for the attempt's own timeout. ``on_retry(number, failure, delay)`` runs before each wait."""
        started = time.monotonic()

        def before_sleep(state: RetryCallState) -> None:
            failure = state.outcome.exception() if state.outcome is not None else None
            if on_retry is not None and isinstance(failure, TransientError):
                on_retry(state.attempt_number, failure, state.upcoming_sleep)

        retrying = self.retrying(sleep, before_sleep)
        number = 0
        try:
            async for try_ in retrying:
                with try_:
                    number = try_.retry_state.attempt_number
                    left = None if self.deadline_s is None else self.deadline_s - (time.monotonic() - started)
                    return await attempt(number, left)
        except RetryError as err:
            last = err.last_attempt.exception()
            assert isinstance(last, TransientError)
            by_deadline = self.max_attempts is None or number < self.max_attempts
            raise RetriesExhausted(last, number, time.monotonic() - started, by_deadline) from None
        raise AssertionError("unreachable: tenacity ends in a result or an error")
