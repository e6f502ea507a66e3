"""``http`` transport: ``POST /score`` on one or more reward servers, from a background event loop.

Per batch: encode the PNGs off the sampling thread, then up to ``max_attempts`` attempts within
``deadline_s`` (the project's one retry policy, shared/retry.py). Connection errors, timeouts and
the retryable statuses of shared/errors.py are retried with exponential backoff and jitter
(``Retry-After`` honoured when longer); any other status fails at once with the server's reason.
Every attempt carries the same ``request_id``, so the server's idempotency cache never scores a
retried batch twice.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx
import numpy as np
from pydantic import ValidationError

from shared import binary
from shared.errors import is_retryable_status, parse_retry_after
from shared.retry import RetriesExhausted, RetryPolicy, TransientError
from shared.schemas import ErrorResponse, ScoreResponse
from shared.validation import format_validation_error
from trainer.reward_api import RewardResult
from trainer.transports.base import (
    BackgroundLoop,
    LoopRewardClient,
    build_request,
    check_codec,
    to_result,
)
from trainer.transports.errors import (
    RewardDeadlineError,
    RewardError,
    RewardRejectedError,
    RewardUnavailableError,
)

log = logging.getLogger(__name__)


class _Retryable(TransientError):
    """One failed attempt that may succeed if repeated; ``refused``: nothing listens at the URL."""

    def __init__(self, reason: str, retry_after: float | None = None, refused: bool = False):
        super().__init__(reason, retry_after)
        self.refused = refused


class HttpRewardClient(LoopRewardClient):
    """Scores batches with ``reward`` on the reward servers at ``urls``."""

    def __init__(
        self,
        reward: str,
        urls: Sequence[str],
        *,
        api_key: str | None = None,
        deadline_s: float = 600.0,
        attempt_timeout_s: float = 120.0,
        max_attempts: int = 6,
        backoff_initial_s: float = 0.25,
        backoff_max_s: float = 10.0,
        max_connections: int = 16,
        load_balancing: str = "least_loaded",
        codec: str = "binary",
    ):
        if not urls:
            raise ValueError("HttpRewardClient needs at least one server URL")
        if load_balancing not in ("least_loaded", "round_robin"):
            raise ValueError(f"unknown load_balancing {load_balancing!r}")
        self.reward = reward
        self.codec = check_codec(codec)
        self.urls = [u.rstrip("/") for u in urls]
        self.attempt_timeout_s = attempt_timeout_s
        self.retry = RetryPolicy(max_attempts, backoff_initial_s, backoff_max_s, deadline_s=deadline_s)
        self.load_balancing = load_balancing
        self._inflight = dict.fromkeys(self.urls, 0)
        self._turn = itertools.count()
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self._loop = BackgroundLoop(f"reward-http-{reward}")
        self._client: httpx.AsyncClient = self._loop.run(self._make_client(headers, limits))
        self._closed = False

    @staticmethod
    async def _make_client(headers: dict[str, str], limits: httpx.Limits) -> httpx.AsyncClient:
        # Created inside the loop that will use it.
        return httpx.AsyncClient(headers=headers, limits=limits, timeout=None)

    # -- public ----------------------------------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._loop.stop(self._client.aclose())

    # -- internals -------------------------------------------------------------------------------
    def _pick_url(self, avoid: str | None) -> str:
        """Least-loaded (fewest of this client's requests in flight; ties in turn) or round-robin.

        A retry avoids the server that just failed when there is another one.
        """
        candidates = [u for u in self.urls if u != avoid] or self.urls
        start = next(self._turn)
        rotated = [candidates[(start + i) % len(candidates)] for i in range(len(candidates))]
        if self.load_balancing == "round_robin":
            return rotated[0]
        return min(rotated, key=lambda u: self._inflight[u])

    async def _score(
        self,
        rid: str,
        payload: np.ndarray | bytes,
        prompts: list[str],
        metadata: Sequence[dict[str, Any]] | None,
    ) -> RewardResult:
        if isinstance(payload, bytes):
            body = payload
        else:  # PNG encoding is the expensive part: a thread
            body = await asyncio.to_thread(self._encode_json, rid, payload, prompts, metadata)
        failed_url: str | None = None

        async def attempt(_number: int, left: float | None) -> RewardResult:
            nonlocal failed_url
            url = self._pick_url(failed_url)  # a retry avoids the server that just failed
            timeout = self.attempt_timeout_s if left is None else min(self.attempt_timeout_s, left)
            try:
                response = await self._attempt(url, body, timeout)
            except _Retryable:
                failed_url = url
                raise
            return to_result(response, rid, self.reward, len(prompts))

        def on_retry(number: int, failure: TransientError, delay: float) -> None:
            log.info(
                "reward request %s attempt %d/%d: %s", rid, number, self.retry.max_attempts, failure.reason
            )

        try:
            return await self.retry.run(attempt, on_retry)
        except RetriesExhausted as err:
            spent = err
        last = spent.last
        if spent.by_deadline:
            when = (
                "exceeded"
                if spent.elapsed_s >= self.retry.deadline_s
                else f"would pass before attempt {spent.attempts + 1}"
            )
            raise RewardDeadlineError(
                f"deadline of {self.retry.deadline_s:g} s {when} for request {rid} ({self.reward}); "
                f"last error: {last.reason}",
                rid,
            )
        hint = " (is the reward server running?)" if getattr(last, "refused", False) else ""
        raise RewardUnavailableError(
            f"{last.reason} after {spent.attempts} attempts in {spent.elapsed_s:.1f} s, request {rid} "
            f"({self.reward}){hint}",
            rid,
        )

    def _encode_json(
        self, rid: str, images: np.ndarray, prompts: list[str], metadata: Sequence[dict[str, Any]] | None
    ) -> bytes:
        return build_request(rid, self.reward, images, prompts, metadata).model_dump_json().encode()

    async def _attempt(self, url: str, body: bytes, timeout: float) -> ScoreResponse:
        endpoint = f"{url}/score"
        media_type = binary.MEDIA_TYPE if self.codec == "binary" else "application/json"
        self._inflight[url] += 1
        try:
            headers = {"Content-Type": media_type, "Content-Length": str(len(body))}
            response = await self._client.post(
                endpoint, content=_pieces(body), headers=headers, timeout=timeout
            )
        except httpx.ConnectError as err:
            refused = _caused_by(err, ConnectionRefusedError)
            what = "connection refused" if refused else f"cannot connect ({err})"
            raise _Retryable(f"{what} to {endpoint}", refused=refused) from None
        except httpx.TimeoutException:
            raise _Retryable(f"no answer from {endpoint} within {timeout:.1f} s") from None
        except httpx.TransportError as err:  # reset, closed mid-response (server restarting), ...
            raise _Retryable(f"{type(err).__name__} talking to {endpoint}: {err}") from None
        finally:
            self._inflight[url] -= 1
        if response.status_code == 200:
            try:
                return ScoreResponse.model_validate_json(response.content)
            except ValidationError as err:
                raise RewardError(
                    f"malformed answer from {endpoint}: {format_validation_error(err, root='response')}"
                ) from None
        reason = _error_reason(response)
        if is_retryable_status(response.status_code):
            raise _Retryable(
                f"HTTP {response.status_code} from {endpoint}: {reason}",
                retry_after=parse_retry_after(response.headers.get("retry-after")),
            )
        error = _error_code(response)
        raise RewardRejectedError(
            f"HTTP {response.status_code} from {endpoint} ({error or 'error'}): {reason}",
            status=response.status_code,
            code=error,
        )


SEND_PIECE_BYTES = 256 * 1024


async def _pieces(body: bytes) -> AsyncIterator[bytes]:
    """The body in 256 kB pieces, with its Content-Length set (not chunked encoding): asyncio's
    transport (Python < 3.12) copies whatever the socket does not take at once into its own buffer;
    handed a 25 MB body in one piece it copies nearly all of it, in pieces the socket takes them."""
    view = memoryview(body)
    for start in range(0, len(view), SEND_PIECE_BYTES):
        yield view[start : start + SEND_PIECE_BYTES]  # type: ignore[misc]


def _caused_by(err: BaseException, kind: type[BaseException]) -> bool:
    """True if ``kind`` is anywhere in the exception chain (httpx wraps the OS error twice)."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, kind):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def _error_body(response: httpx.Response) -> ErrorResponse | None:
    try:
        return ErrorResponse.model_validate_json(response.content)
    except ValidationError:
        return None


def _error_reason(response: httpx.Response) -> str:
    body = _error_body(response)
    return body.reason if body is not None else response.text[:500] or response.reason_phrase


def _error_code(response: httpx.Response) -> str:
    body = _error_body(response)
    return body.error if body is not None else ""


def http_client_from_config(cfg: Any, urls: Sequence[str] | None = None) -> HttpRewardClient:
    """``RewardConfig`` -> client. The bearer token comes from the env variable ``cfg.api_key_env``."""
    return HttpRewardClient(
        cfg.name,
        urls if urls is not None else cfg.urls,
        api_key=os.environ.get(cfg.api_key_env) or None,
        deadline_s=cfg.deadline_s,
        attempt_timeout_s=cfg.attempt_timeout_s,
        max_attempts=cfg.max_attempts,
        backoff_initial_s=cfg.backoff_initial_s,
        backoff_max_s=cfg.backoff_max_s,
        max_connections=cfg.max_connections,
        load_balancing=cfg.load_balancing,
        codec=getattr(cfg, "codec", "binary"),
    )
