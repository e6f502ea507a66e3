"""The errors the API answers with: an HTTP status, a short code and a reason (never a traceback).

Codes and statuses come from the one table in shared/errors.py; an ``ApiError`` with a code that
is not declared there, or with a status its code is not answered with, is a bug caught at once.
``error_response()`` is the one way an ``ApiError`` becomes a JSON response (the app's handlers and
middleware, and reward_server/timeouts.py below the app).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from shared.errors import check_code, is_retryable_status
from shared.schemas import ErrorResponse

if TYPE_CHECKING:  # the Redis worker imports this module and installs no web framework
    from starlette.responses import JSONResponse


class ApiError(Exception):
    """Raised anywhere while handling a request; turned into a JSON ``ErrorResponse``."""

    def __init__(
        self,
        status: int,
        error: str,
        reason: str,
        headers: dict[str, str] | None = None,
        request_id: str | None = None,
    ):
        check_code(error, status)
        super().__init__(reason)
        self.status = status
        self.error = error
        self.reason = reason
        self.headers = headers or {}
        self.request_id = request_id

    @property
    def retryable(self) -> bool:
        """The same request may succeed later (shared/errors.py decides, for every client alike)."""
        return is_retryable_status(self.status)

    def body(self) -> ErrorResponse:
        return ErrorResponse(error=self.error, reason=self.reason, request_id=self.request_id)


def error_response(err: ApiError) -> JSONResponse:
    """``err`` as its JSON ``ErrorResponse`` body, with its status and headers."""
    from starlette.responses import JSONResponse

    return JSONResponse(err.body().model_dump(), status_code=err.status, headers=err.headers)


class QueueFullError(Exception):
    """A reward's batch queue holds too many images; the caller answers 429."""
