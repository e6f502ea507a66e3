"""The errors the API answers with: an HTTP status, a short code and a reason (never a traceback)."""

from __future__ import annotations

from shared.schemas import ErrorResponse


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
        super().__init__(reason)
        self.status = status
        self.error = error
        self.reason = reason
        self.headers = headers or {}
        self.request_id = request_id

    def body(self) -> ErrorResponse:
        return ErrorResponse(error=self.error, reason=self.reason, request_id=self.request_id)


class QueueFullError(Exception):
    """A reward's batch queue holds too many images; the caller answers 429."""
