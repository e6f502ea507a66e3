"""Prometheus metrics of one server instance (its own registry, so several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class ServerMetrics:
    """All metrics, labelled by reward where it makes sense (unknown names are labelled 'unknown')."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "ddpo_reward_requests",
            "POST /score requests by reward and HTTP status.",
            ["reward", "status"],
            registry=r,
        )
        self.body_bytes = Counter(
            "ddpo_reward_body_bytes",
            "Request body bytes read by POST /score, by codec (json: base64 PNG; binary: safetensors).",
            ["codec"],
            registry=r,
        )
        self.replays = Counter(
            "ddpo_reward_idempotent_replays",
            "Requests answered from the idempotency cache (a retried request_id, not re-scored).",
            ["reward"],
            registry=r,
        )
        self.images = Counter(
            "ddpo_reward_images", "Images scored (each counted once).", ["reward"], registry=r
        )
        self.errors = Counter("ddpo_reward_errors", "Error responses by reason.", ["reason"], registry=r)
        self.latency = Histogram(
            "ddpo_reward_request_latency_seconds",
            "POST /score latency, body read to response.",
            ["reward"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "ddpo_reward_batch_size",
            "Images per scorer batch.",
            ["reward"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.batch_requests = Histogram(
            "ddpo_reward_batch_requests",
            "Requests merged into one scorer batch.",
            ["reward"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.batch_latency = Histogram(
            "ddpo_reward_batch_latency_seconds",
            "Time a scorer takes for one batch.",
            ["reward"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "ddpo_reward_queue_depth", "Images waiting for a scorer batch.", ["reward"], registry=r
        )
        self.inflight_requests = Gauge(
            "ddpo_reward_inflight_requests", "Requests being decoded or scored.", registry=r
        )
        self.inflight_images = Gauge(
            "ddpo_reward_inflight_images", "Images being decoded or scored.", registry=r
        )
        self.inflight_bytes = Gauge(
            "ddpo_reward_inflight_bytes",
            "Bytes reserved against max_inflight_bytes (bodies, parsed requests, decoded images).",
            registry=r,
        )
        self.closed_connections = Counter(
            "ddpo_reward_connections_closed",
            "Connections the server cut, by reason (write_timeout: the client left its response "
            "unread for write_timeout_s).",
            ["reason"],
            registry=r,
        )
        self.ready = Gauge("ddpo_reward_ready", "1 once every enabled reward is loaded.", registry=r)
