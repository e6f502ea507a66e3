"""Why a batch has no reward. Futures fail with these; the trainer's drop path catches ``RewardError``."""

from __future__ import annotations


class RewardError(RuntimeError):
    """The reward of a submitted batch could not be obtained; the message says why."""

    def __init__(self, reason: str, request_id: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.request_id = request_id


class RewardRejectedError(RewardError):
    """The reward service refused the request (4xx, poison job): retrying cannot help."""

    def __init__(self, reason: str, request_id: str | None = None, status: int | None = None, code: str = ""):
        super().__init__(reason, request_id)
        self.status = status
        self.code = code


class RewardUnavailableError(RewardError):
    """Transient failures (connection, 429, 5xx) outlasted the retry budget."""


class RewardDeadlineError(RewardUnavailableError):
    """No result within the request's deadline."""


class RewardLostError(RewardUnavailableError):
    """The job is gone from Redis without a result (a restart without persistence, a trimmed stream)."""
