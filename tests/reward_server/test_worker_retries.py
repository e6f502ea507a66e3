"""The Redis worker's own scoring retries follow the one policy and the one retryable set
(shared/errors.py, shared/retry.py), Retry-After included; in process, no Redis needed."""

from __future__ import annotations

import asyncio
import time

import pytest

from reward_server import worker as worker_module
from reward_server.errors import ApiError
from reward_server.settings import ServerSettings
from reward_server.worker import RewardWorker, WorkerSettings
from shared.errors import ERROR_CODES, is_retryable_status
from shared.schemas import ScoreRequest, ScoreResponse

REQUEST = ScoreRequest.model_construct(
    request_id="r1", reward="jpeg_compressibility", images=["x"], prompts=["p"]
)  # never parsed: the service is scripted
OK = ScoreResponse(request_id="r1", reward="jpeg_compressibility", rewards=[0.5], details=[{}])
# One code per status the server answers with (the first declared for it).
CODES = {}
for _code in ERROR_CODES.values():
    for _status in _code.statuses:
        CODES.setdefault(_status, _code.name)


def scripted_worker(failures: list[ApiError], attempts: int = 3) -> tuple[RewardWorker, list[float]]:
    worker = RewardWorker(WorkerSettings(score_attempts=attempts), ServerSettings())
    calls: list[float] = []

    async def score(request, fp, reservation):
        calls.append(time.monotonic())
        if len(calls) <= len(failures):
            raise failures[len(calls) - 1]
        return OK, False

    worker.service.score = score  # type: ignore[method-assign]
    return worker, calls


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch):
    monkeypatch.setattr(worker_module, "SCORE_RETRY_INITIAL_S", 0.01)


@pytest.mark.parametrize("status", sorted(CODES))
def test_retries_exactly_the_retryable_statuses(status):
    error = ApiError(status, CODES[status], f"scripted {status}")
    worker, calls = scripted_worker([error] * 5, attempts=3)
    response, failure = asyncio.run(worker.score(REQUEST))
    assert response is None and failure is not None
    assert (failure.error, failure.reason, failure.request_id) == (CODES[status], f"scripted {status}", "r1")
    assert len(calls) == (3 if is_retryable_status(status) else 1)


def test_transient_then_scored():
    worker, calls = scripted_worker([ApiError(503, "not_ready", "loading")])
    assert asyncio.run(worker.score(REQUEST)) == (OK, None)
    assert len(calls) == 2


def test_retry_after_is_honoured():
    busy = ApiError(429, "overloaded", "busy", {"Retry-After": "1"})
    worker, calls = scripted_worker([busy])
    assert asyncio.run(worker.score(REQUEST)) == (OK, None)
    assert calls[1] - calls[0] >= 1.0  # not the 0.01 s backoff
