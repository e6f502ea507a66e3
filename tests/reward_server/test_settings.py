"""Settings fail fast on bad values; the environment and CLI flags feed the same fields."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from reward_server.cli import build_parser, settings_from_args
from reward_server.settings import ServerSettings, is_loopback_host


def test_defaults_are_safe_and_cheap():
    s = ServerSettings()
    assert (s.host, s.port, s.api_key) == ("127.0.0.1", 8000, None)
    assert s.rewards == ["jpeg_compressibility", "jpeg_incompressibility"]
    assert s.vlm_question == "what is going on in this image?" and s.vlm_temperature == 0
    assert s.bertscore_metric == "recall" and s.bertscore_reference_template == "The image contains {prompt}"


def test_every_field_is_documented():
    assert all(field.description for field in ServerSettings.model_fields.values())


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost", "[::1]"])
def test_loopback_hosts(host):
    assert is_loopback_host(host)
    ServerSettings(host=host)


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "::", "reward-server.internal"])
def test_remote_host_needs_a_key_or_explicit_consent(host):
    assert not is_loopback_host(host)
    with pytest.raises(ValidationError, match="refusing to bind non-loopback host"):
        ServerSettings(host=host)
    ServerSettings(host=host, api_key="k" * 16)
    ServerSettings(host=host, allow_insecure_remote=True)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("port", 70000, "less than or equal"),
        ("workers", 0, "greater than or equal"),
        ("rewards", ["jpeg_compressibility", "nope"], "unknown rewards"),
        ("rewards", [], "at least one reward"),
        ("bertscore_metric", "accuracy", "recall"),
        ("bertscore_reference_template", "The image contains", "{prompt}"),
        ("bertscore_reference_template", "{prompt} {other}", "other"),
        ("vlm_backend", "ollama", "openai"),
        ("api_key", " ", "must not be empty"),
        ("api_key", "x", "at least 8 characters"),
        ("max_wait_ms", -1, "greater than or equal"),
        ("batching", {"aesthetic": {"max_batch_size": 4}}, "not enabled"),
        ("batching", {"jpeg_compressibility": {"max_batch_size": 0}}, "greater than or equal"),
        ("max_images_per_request", 5000, "max_queue_images"),
        ("unknown_field", 1, "Extra inputs"),
    ],
)
def test_bad_values_fail_fast(field, value, message):
    with pytest.raises((ValidationError, KeyError), match=message):
        ServerSettings(**{field: value})


def test_api_key_is_not_in_the_repr():
    assert "s3cret" not in repr(ServerSettings(api_key="s3cret-key", vlm_api_key="s3cret"))


def test_batching_overrides():
    s = ServerSettings(
        max_batch_size=16, max_wait_ms=3, batching={"jpeg_compressibility": {"max_wait_ms": 0}}
    )
    assert s.batching_for("jpeg_compressibility") == (16, 0.0, 1)
    assert s.batching_for("jpeg_incompressibility") == (16, 3.0, 1)


def test_environment(monkeypatch):
    monkeypatch.setenv("DDPO_REWARD_PORT", "9123")
    monkeypatch.setenv("DDPO_REWARD_REWARDS", '["jpeg_incompressibility"]')
    monkeypatch.setenv("DDPO_REWARD_BATCHING", '{"jpeg_incompressibility": {"max_batch_size": 4}}')
    s = ServerSettings()
    assert s.port == 9123 and s.rewards == ["jpeg_incompressibility"]
    assert s.batching_for("jpeg_incompressibility")[0] == 4


def test_cli_flags_override_the_environment(monkeypatch):
    monkeypatch.setenv("DDPO_REWARD_PORT", "9123")
    monkeypatch.setenv("DDPO_REWARD_MAX_BATCH_SIZE", "7")
    s, overrides = settings_from_args(
        [
            "--port",
            "9200",
            "--rewards",
            "jpeg_compressibility,jpeg_incompressibility",
            "--no-cross-request-batching",
        ]
    )
    assert s.port == 9200 and s.max_batch_size == 7 and s.cross_request_batching is False
    assert s.rewards == ["jpeg_compressibility", "jpeg_incompressibility"]
    assert set(overrides) == {"port", "rewards", "cross_request_batching"}


def test_cli_help_lists_every_setting():
    text = build_parser().format_help()
    for name in ServerSettings.model_fields:
        assert "--" + name.replace("_", "-") in text
