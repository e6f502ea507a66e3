"""Redis key names and defaults live in shared/redis_streams.py; the trainer's options and the
worker's have the same names and the same defaults."""

from __future__ import annotations

import inspect

from reward_server.worker import WorkerSettings
from shared import redis_streams as rs
from trainer.config import RewardConfig
from trainer.transports.redis import RedisRewardClient

SHARED = {
    "redis_stream": rs.DEFAULT_STREAM,
    "redis_group": rs.DEFAULT_GROUP,
    "redis_prefix": rs.DEFAULT_PREFIX,
}


def test_same_names_and_defaults_on_both_sides(monkeypatch):
    monkeypatch.delenv(rs.REDIS_URL_ENV, raising=False)
    worker = WorkerSettings()
    trainer = RewardConfig()
    for name, default in SHARED.items():
        assert getattr(worker, name) == default, name
        assert getattr(trainer, name) == default, name
    assert worker.redis_url == rs.DEFAULT_REDIS_URL
    assert trainer.redis_password_env == rs.REDIS_PASSWORD_ENV
    assert trainer.redis_max_queued_jobs == rs.DEFAULT_MAX_QUEUED_JOBS
    # The client's own defaults are the shared ones too.
    params = inspect.signature(RedisRewardClient).parameters
    assert params["stream"].default == rs.DEFAULT_STREAM and params["group"].default == rs.DEFAULT_GROUP
    assert params["prefix"].default == rs.DEFAULT_PREFIX
    assert params["max_queued_jobs"].default == rs.DEFAULT_MAX_QUEUED_JOBS


def test_the_url_and_password_come_from_the_shared_variables(monkeypatch):
    monkeypatch.setenv(rs.REDIS_URL_ENV, "redis://elsewhere:6380/1")
    monkeypatch.setenv(rs.REDIS_PASSWORD_ENV, "pw")
    worker = WorkerSettings()
    assert (worker.redis_url, worker.redis_password) == ("redis://elsewhere:6380/1", "pw")


def test_key_layout():
    assert rs.result_key("p", "r1") == "p:result:r1"
    assert rs.reply_stream_key("p", "c1") == "p:replies:c1"
    assert rs.dead_letter_key("s") == "s:dead"
