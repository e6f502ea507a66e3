"""The one retry policy (shared/retry.py): bounded attempts, backoff with jitter, Retry-After, deadline."""

from __future__ import annotations

import asyncio
import time

import pytest

from shared.retry import RetriesExhausted, RetryPolicy, TransientError


def run(policy: RetryPolicy, outcomes: list, **kw):
    """Run ``policy`` over scripted attempts (an exception to raise or a value to return); returns
    (result or the exception raised, the attempts made, the waits asked for)."""
    calls, waits = [], []

    async def attempt(number: int, left: float | None):
        calls.append((number, left))
        outcome = outcomes[min(number, len(outcomes)) - 1]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    async def main():
        try:
            return await policy.run(attempt, sleep=sleep, **kw)
        except Exception as err:
            return err

    return asyncio.run(main()), calls, waits


def test_succeeds_after_transient_failures_with_growing_jittered_waits():
    policy = RetryPolicy(max_attempts=5, initial_s=1.0, max_s=3.0)
    result, calls, waits = run(policy, [TransientError("a"), TransientError("b"), TransientError("c"), "ok"])
    assert result == "ok" and len(calls) == 4
    # About initial * 2**(n-1), capped at max_s, drawn from [d/2, d].
    for wait, nominal in zip(waits, [1.0, 2.0, 3.0], strict=True):
        assert nominal / 2 <= wait <= nominal


def test_bounded_attempts_then_the_last_failure():
    result, calls, waits = run(RetryPolicy(3, 0.01, 0.1), [TransientError("down")])
    assert isinstance(result, RetriesExhausted)
    assert (result.attempts, result.by_deadline, result.last.reason) == (3, False, "down")
    assert len(calls) == 3 and len(waits) == 2


def test_other_errors_are_not_retried():
    result, calls, _ = run(RetryPolicy(5, 0.01, 0.1), [ValueError("deterministic")])
    assert isinstance(result, ValueError) and len(calls) == 1


def test_retry_after_is_honoured_when_longer_and_capped_when_asked():
    _, _, waits = run(RetryPolicy(2, 0.01, 0.1), [TransientError("429", retry_after=7.0), "ok"])
    assert waits == [7.0]
    _, _, waits = run(RetryPolicy(2, 2.0, 4.0), [TransientError("429", retry_after=0.0), "ok"])
    assert 1.0 <= waits[0] <= 2.0  # a shorter Retry-After does not shorten our own backoff
    _, _, waits = run(RetryPolicy(2, 0.01, 0.1, retry_after_cap_s=3.0), [TransientError("", 60.0), "ok"])
    assert waits == [3.0]


def test_no_retry_starts_past_the_deadline():
    # The wait Retry-After asks for would end past the deadline: give up now, not after sleeping.
    policy = RetryPolicy(10, 0.01, 0.1, deadline_s=5.0)
    result, calls, waits = run(policy, [TransientError("busy", retry_after=30.0)])
    assert isinstance(result, RetriesExhausted) and result.by_deadline
    assert len(calls) == 1 and waits == []
    assert 4.9 < calls[0][1] <= 5.0  # the attempt is told how long it has


def test_deadline_alone_bounds_real_time():
    policy = RetryPolicy(None, 0.05, 0.05, deadline_s=0.5)

    async def attempt(number: int, left: float | None):
        raise TransientError(f"attempt {number}")

    started = time.monotonic()
    with pytest.raises(RetriesExhausted) as info:
        asyncio.run(policy.run(attempt))
    assert time.monotonic() - started < 0.6
    assert info.value.by_deadline and info.value.attempts > 3


def test_unbounded_policies_are_refused():
    with pytest.raises(ValueError, match="bounded"):
        RetryPolicy(None, 0.1, 1.0)
