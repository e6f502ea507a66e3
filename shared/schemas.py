"""The wire schemas: one module, imported by both sides of every transport (HTTP and Redis).

The contract is fixed in the team's design notes: JSON in and out, never pickle; every request
carries a ``request_id`` so that a retry of the same id never double-counts a sample; results are
in the same order as the request.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_REQUEST_ID_LENGTH = 200


class ScoreFields(BaseModel):
    """Everything of a score request but its images (the binary codec carries them as raw pixels)."""

    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(
        min_length=1,
        max_length=MAX_REQUEST_ID_LENGTH,
        description="Caller-chosen id; retrying the same id must not double-count a sample.",
    )
    reward: str = Field(min_length=1, description="Name of the reward, one of `GET /rewards`.")
    prompts: list[str] = Field(description="One prompt per image, same order.")
    metadata: list[dict[str, Any]] | None = Field(
        default=None, description="Optional per-image metadata (e.g. VQA questions), same order."
    )


class ScoreRequest(ScoreFields):
    """Score a batch of images. ``POST /score`` JSON body, and the payload of a JSON Redis job."""

    images: list[str] = Field(
        min_length=1, description="Base64-encoded PNG images, RGB uint8 (lossless on purpose)."
    )

    @model_validator(mode="after")
    def _counts_match(self) -> ScoreRequest:
        if len(self.prompts) != len(self.images):
            raise ValueError(
                f"prompts and images must have the same length, got {len(self.prompts)} prompts "
                f"for {len(self.images)} images"
            )
        if self.metadata is not None and len(self.metadata) != len(self.images):
            raise ValueError(
                f"metadata must have one entry per image, got {len(self.metadata)} for "
                f"{len(self.images)} images"
            )
        return self


class ScoreResponse(BaseModel):
    """``POST /score`` answer: one reward and one details object per image, request order."""

    model_config = ConfigDict(extra="forbid")

    request_id: str
    reward: str
    rewards: list[float]
    details: list[dict[str, Any]]

    @field_validator("rewards")
    @classmethod
    def _finite(cls, rewards: list[float]) -> list[float]:
        # NaN/inf never leaves the server: it would poison the trainer's normalization.
        bad = [i for i, r in enumerate(rewards) if not math.isfinite(r)]
        if bad:
            raise ValueError(f"non-finite rewards at positions {bad}")
        return rewards

    @model_validator(mode="after")
    def _lengths(self) -> ScoreResponse:
        if len(self.details) != len(self.rewards):
            raise ValueError("details and rewards must have the same length")
        return self


class ErrorResponse(BaseModel):
    """Every error the server returns: a machine-readable ``error`` code and a human ``reason``."""

    error: str = Field(description="Short code, e.g. 'unknown_reward', 'unauthorized', 'overloaded'.")
    reason: str = Field(description="What was wrong, for a person to read.")
    request_id: str | None = None


class RewardList(BaseModel):
    """``GET /rewards``: the reward names this server can compute."""

    rewards: list[str]


# --- Redis Streams transport (docs/transport.md) --------------------------------------------------

REDIS_SCHEMA_VERSION = 1


class RedisJob(BaseModel):
    """One entry of the job stream (field ``job``), plus, for the binary codec, the entry's ``request``
    field: the request as a binary body (shared/binary.py), its pixels raw, never base64.

    JSON codec: ``request`` holds the ``ScoreRequest``. Binary codec: ``request`` is absent and
    ``request_id`` names the request (so a worker can answer even when the binary field is corrupt).
    """

    model_config = ConfigDict(extra="forbid")

    version: int = Field(default=REDIS_SCHEMA_VERSION, description="Envelope schema version.")
    request: ScoreRequest | None = Field(
        default=None, description="The request (JSON codec); absent when the entry's binary field holds it."
    )
    request_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_REQUEST_ID_LENGTH,
        description="Binary codec: the request_id of the entry's binary `request` field.",
    )
    reply_to: str = Field(min_length=1, description="Stream the submitting trainer reads its results from.")
    submitted_at: float = Field(description="Unix time the trainer queued the job.")
    expires_at: float | None = Field(
        default=None, description="Unix time after which the trainer no longer waits: skip the work."
    )

    @model_validator(mode="after")
    def _one_request(self) -> RedisJob:
        if (self.request is None) == (self.request_id is None):
            raise ValueError("a job holds either its request (JSON) or the request_id of its binary field")
        return self

    @property
    def rid(self) -> str:
        """The request_id, wherever the request is."""
        return self.request.request_id if self.request is not None else self.request_id  # type: ignore[return-value]


class RedisResult(BaseModel):
    """The answer to one job, stored once per ``request_id`` and sent to the job's ``reply_to`` stream."""

    model_config = ConfigDict(extra="forbid")

    request_id: str
    ok: bool
    response: ScoreResponse | None = None
    error: ErrorResponse | None = None
    worker: str = Field(default="", description="Consumer name of the worker that answered.")

    @model_validator(mode="after")
    def _one_of(self) -> RedisResult:
        if self.ok != (self.response is not None) or self.ok == (self.error is not None):
            raise ValueError("a result holds a response when ok, an error otherwise")
        return self
