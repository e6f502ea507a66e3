"""The one table of error codes: what each means on the wire and which failures are worth retrying.

The reward server answers every error as a JSON ``ErrorResponse`` (shared/schemas.py) with one of
the codes below and its HTTP status; the Redis worker sends the same codes in ``RedisResult.error``.
Whether to try again depends on the status alone (``RETRYABLE_STATUSES``), so every client decides
the same way: the trainer's HTTP client, the VLM client (whose server is not ours and sends no code),
and the Redis worker when its own scoring fails. Wire contract (docs: shared/design.md): 422
malformed, 400 unknown reward, 401 missing/bad token, 413 too large, 429 overloaded (with
Retry-After), 503 not ready.
"""

from __future__ import annotations

from dataclasses import dataclass

# Statuses after which the same request may succeed: timeout, overloaded, the server failed or is not
# ready, a gateway in between failed. Every other status is deterministic and reported at once (see
# pitfalls: retrying deterministic failures made them look like hangs). 501 and 505 are not transient.
RETRYABLE_STATUSES: frozenset[int] = frozenset({408, 429, 500, 502, 503, 504})


def is_retryable_status(status: int) -> bool:
    """True if a request answered with ``status`` may succeed when sent again."""
    return status in RETRYABLE_STATUSES


@dataclass(frozen=True)
class ErrorCode:
    """One error code: the HTTP status(es) it is answered with and what it means."""

    name: str
    statuses: tuple[int, ...]  # empty: any status (http_error) or, with redis_only, none
    meaning: str
    redis_only: bool = False  # a dead-lettered job, never an HTTP answer

    @property
    def status(self) -> int:
        """The status of a code answered with exactly one."""
        if len(self.statuses) != 1:
            raise ValueError(f"error code {self.name!r} has statuses {self.statuses}; say which")
        return self.statuses[0]

    def retryable(self, status: int | None = None) -> bool:
        """Worth retrying when answered with ``status`` (default: its only status)."""
        if self.redis_only:
            return False
        return is_retryable_status(self.status if status is None else status)


def _codes(*rows: tuple[str, tuple[int, ...], str]) -> dict[str, ErrorCode]:
    return {name: ErrorCode(name, statuses, meaning) for name, statuses, meaning in rows}


def _redis_only(*rows: tuple[str, str]) -> dict[str, ErrorCode]:
    return {name: ErrorCode(name, (), meaning, redis_only=True) for name, meaning in rows}


ERROR_CODES: dict[str, ErrorCode] = _codes(
    # 400: the request cannot be served as sent
    ("bad_request", (400,), "The body is longer than its Content-Length."),
    ("malformed_body", (400,), "A binary body that is not well-formed safetensors, or truncated."),
    ("unknown_reward", (400,), "No reward of that name on this server (the reason lists the valid ones)."),
    ("invalid_host", (400,), "The Host header is not in allowed_hosts (DNS rebinding)."),
    ("client_disconnected", (400,), "The client hung up before its body ended."),
    # 401
    ("unauthorized", (401,), "Missing or wrong bearer token."),
    # 404, 405: routing
    ("not_found", (404,), "No such path."),
    ("method_not_allowed", (405,), "The path exists, the method does not."),
    # 409
    ("request_id_conflict", (409,), "request_id reused for a different request."),
    # 408: too slow; the same request sent promptly may succeed
    ("request_timeout", (408,), "The request head or body did not arrive within header/body_timeout_s."),
    # 413: over a limit; the same request will never fit
    ("body_too_large", (413,), "The body is over max_body_bytes."),
    ("too_many_images", (413,), "More images than max_images_per_request."),
    ("image_too_large", (413,), "An image over max_image_pixels."),
    ("too_much_work", (413,), "More work units (images, VLM calls) than max_inflight_images."),
    ("too_many_questions", (413,), "llava_strict: more questions than llava_strict_max_questions."),
    ("too_many_alternatives", (413,), "llava_strict: more accepted answers than the limit."),
    ("answer_too_long", (413,), "llava_strict: an accepted answer over llava_strict_max_answer_chars."),
    (
        "over_memory_budget",
        (413, 429),
        "413: the request alone is over max_inflight_bytes; 429: the budget is busy, retry later.",
    ),
    # 415
    ("unsupported_media_type", (415,), "A CORS-simple Content-Type on POST /score (text/plain, forms)."),
    # 422: malformed
    ("invalid_request", (422,), "The request does not match the schema (the reason names the fields)."),
    ("invalid_image", (422,), "An image that is not an RGB PNG / uint8 N x H x W x 3 tensor."),
    ("invalid_metadata", (422,), "Per-sample metadata the reward cannot use (e.g. missing questions)."),
    # 429: overloaded, Retry-After says when to come back
    ("overloaded", (429,), "Too many requests or images in flight (max_inflight_*)."),
    ("queue_full", (429,), "The reward's batch queue is full (max_queue_images)."),
    # 5xx: the server side failed; the same request may succeed later or elsewhere
    ("internal_error", (500,), "An unexpected server error (logged with its traceback)."),
    ("scoring_failed", (500,), "The scorer failed (reason given)."),
    ("vlm_error", (502,), "The VLM judge failed after its own retries (reason given)."),
    ("not_ready", (503,), "Models still loading (Retry-After)."),
    ("load_failed", (503,), "Loading the models failed (details with the API key)."),
    ("shutting_down", (503,), "The server is stopping."),
    # Any status: another HTTP-level refusal from the framework (answered with its own status)
    ("http_error", (), "Another HTTP-level refusal; its status is the one answered."),
) | _redis_only(
    # A dead-lettered job, answered to its trainer through its reply stream
    ("invalid_job", "A Redis job that does not decode, or whose binary field disagrees with it."),
    ("invalid_reply_to", "A job's reply_to is not a reply stream of this deployment."),
    ("too_many_deliveries", "A job delivered more than max_deliveries times (it may crash workers)."),
)


def error_code(name: str) -> ErrorCode:
    """The table's row for ``name``; KeyError for a code nobody declared (a test keeps them declared)."""
    try:
        return ERROR_CODES[name]
    except KeyError:
        raise KeyError(f"undeclared error code {name!r}: add it to shared/errors.py") from None


def check_code(name: str, status: int) -> ErrorCode:
    """The row of ``name``, which must be declared and answered with ``status`` (ValueError if not)."""
    code = error_code(name)
    if code.redis_only or (code.statuses and status not in code.statuses):
        allowed = "none (Redis only)" if code.redis_only else ", ".join(map(str, code.statuses))
        raise ValueError(f"error code {name!r} is answered with status {allowed}, not {status}")
    return code


def status_meanings() -> dict[int, list[str]]:
    """status -> the codes answered with it (for the OpenAPI document's responses)."""
    out: dict[int, list[str]] = {}
    for code in ERROR_CODES.values():
        for status in code.statuses:
            out.setdefault(status, []).append(code.name)
    return dict(sorted(out.items()))


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After in seconds, or None (absent, or an HTTP date: our servers send integer seconds)."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return max(0.0, seconds) if seconds == seconds else None  # NaN is no answer
