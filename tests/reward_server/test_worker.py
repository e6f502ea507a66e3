# ruff: noqa: F811  (pytest fixtures imported from tests.transport_support)
"""ddpo-reward-worker and the redis transport against a real redis-server and real worker processes."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from reward_server.rewards.jpeg import JpegCompressibility
from shared.redis_streams import result_key
from shared.schemas import RedisJob
from tests.transport_support import (  # noqa: F401  (fixtures)
    RedisServer,
    Workers,
    redis_server,
    redis_server_with_auth,
    reward_workers,
    wait_for,
)
from trainer.transports.base import build_request
from trainer.transports.errors import RewardDeadlineError, RewardRejectedError
from trainer.transports.redis import RedisRewardClient

PROMPTS = ["a cat", "a dog", "a horse"]


def batch(seed: int, n: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 24, 24, 3), dtype=np.uint8)


def expected(images: np.ndarray) -> np.ndarray:
    outputs = JpegCompressibility().score(list(images), PROMPTS[: len(images)], [{}] * len(images))
    return np.array([o.reward for o in outputs])


def test_two_workers_score_every_batch_once(reward_workers: Workers, redis_server: RedisServer):
    reward_workers.start("w1")
    reward_workers.start("w2")
    with RedisRewardClient("jpeg_compressibility", redis_server.url, deadline_s=30) as client:
        batches = [batch(i) for i in range(6)]
        futures = [client.submit(b, PROMPTS, request_id=f"req-{i}") for i, b in enumerate(batches)]
        for b, future in zip(batches, futures, strict=True):
            result = future.result(timeout=30)
            np.testing.assert_array_equal(result.rewards, expected(b))
            assert [d["jpeg_kb"] for d in result.details] == pytest.approx(-expected(b))
        r = redis_server.client()
        assert r.xlen(client.reply_stream) == 6  # one notification per request
        assert all(r.exists(result_key("ddpo:rewards", f"req-{i}")) for i in range(6))
        assert 0 < r.ttl(result_key("ddpo:rewards", "req-0")) <= 3600  # results expire
        # Acked jobs are deleted: the stream holds only work to do (the ack follows the result).
        wait_for(lambda: r.xlen("ddpo:rewards:jobs") == 0, 10, "the jobs to be acked and deleted")
    assert not r.exists(client.reply_stream)  # closed client cleans up its reply stream


@pytest.mark.slow
def test_sigkilled_worker_jobs_are_reclaimed(reward_workers: Workers, redis_server: RedisServer):
    # w1 is slow, so it dies holding jobs (one being scored, others delivered but waiting).
    reward_workers.start("w1", "--concurrency", "2", "--claim-idle-s", "1", delay_s=3.0)
    r = redis_server.client()
    with RedisRewardClient("test_slow_jpeg", redis_server.url, deadline_s=60) as client:
        batches = [batch(10 + i) for i in range(4)]
        futures = [client.submit(b, PROMPTS, request_id=f"kill-{i}") for i, b in enumerate(batches)]
        wait_for(
            lambda: r.xpending("ddpo:rewards:jobs", "reward-workers")["pending"] >= 2, 30, "w1 to take jobs"
        )
        time.sleep(0.5)  # w1 is inside the scorer's sleep
        reward_workers.kill("w1")
        assert not any(f.done() for f in futures)
        reward_workers.start("w2", "--claim-idle-s", "1", delay_s=0.0)
        for b, future in zip(batches, futures, strict=True):
            np.testing.assert_array_equal(future.result(timeout=60).rewards, expected(b))
        assert r.xlen(client.reply_stream) == 4  # exactly one result per request
        pending = lambda: r.xpending("ddpo:rewards:jobs", "reward-workers")["pending"]  # noqa: E731
        wait_for(lambda: pending() == 0, 10, "every job to be acked")
        assert not r.exists("ddpo:rewards:jobs:dead")
    assert "reclaimed job" in reward_workers.log("w2")


def test_duplicate_delivery_gives_one_result(reward_workers: Workers, redis_server: RedisServer):
    reward_workers.start("w1")
    r = redis_server.client()
    images = batch(3)
    job = RedisJob(
        request=build_request("dup-1", "jpeg_compressibility", images, PROMPTS, None),
        reply_to="ddpo:rewards:replies:test",
        submitted_at=time.time(),
    )
    for _ in range(3):  # the same job queued three times (a producer retrying its XADD)
        r.xadd("ddpo:rewards:jobs", {"job": job.model_dump_json()})
    wait_for(lambda: r.xlen("ddpo:rewards:jobs") == 0, 30, "the jobs to be done")
    replies = r.xrange("ddpo:rewards:replies:test")
    assert len(replies) == 1
    stored = json.loads(r.get(result_key("ddpo:rewards", "dup-1")))
    assert stored["ok"] and stored["response"]["rewards"] == pytest.approx(expected(images).tolist())
    assert "already has a result" in reward_workers.log("w1")


def test_poison_messages_are_dead_lettered_and_reported(reward_workers: Workers, redis_server: RedisServer):
    reward_workers.start("w1")
    r = redis_server.client()
    r.xadd("ddpo:rewards:jobs", {"job": b"\x80 not json"})
    r.xadd("ddpo:rewards:jobs", {"something": "else"})
    with RedisRewardClient("no_such_reward", redis_server.url, deadline_s=30) as client:
        with pytest.raises(
            RewardRejectedError, match="unknown_reward: unknown reward 'no_such_reward'"
        ) as info:
            client.submit(batch(0), PROMPTS, request_id="poison-1").result(timeout=30)
        assert info.value.code == "unknown_reward"
    wait_for(lambda: r.xlen("ddpo:rewards:jobs:dead") == 3, 30, "three dead letters")
    dead = [{k.decode(): v for k, v in fields.items()} for _, fields in r.xrange("ddpo:rewards:jobs:dead")]
    errors = sorted(d["error"].decode() for d in dead)
    assert errors == ["invalid_job", "invalid_job", "unknown_reward"]
    assert any(d["request_id"] == b"poison-1" for d in dead)
    assert all(d["reason"] for d in dead)
    wait_for(lambda: r.xpending("ddpo:rewards:jobs", "reward-workers")["pending"] == 0, 10, "acks")
    assert r.xlen("ddpo:rewards:jobs") == 0


def test_no_worker_deadline_is_reported(redis_server: RedisServer):
    with RedisRewardClient("jpeg_compressibility", redis_server.url, deadline_s=1.0) as client:
        started = time.monotonic()
        with pytest.raises(
            RewardDeadlineError, match=r"within the deadline of 1 s.*ddpo-reward-worker running"
        ):
            client.submit(batch(0), PROMPTS).result(timeout=10)
        assert time.monotonic() - started < 5


def test_job_stream_is_bounded(redis_server: RedisServer):
    with RedisRewardClient(
        "jpeg_compressibility", redis_server.url, deadline_s=1.0, max_queued_jobs=2
    ) as client:
        futures = [client.submit(batch(i), PROMPTS) for i in range(3)]
        errors = []
        for future in futures:
            with pytest.raises(RewardDeadlineError) as info:
                future.result(timeout=10)
            errors.append(str(info.value))
    assert sum("job stream ddpo:rewards:jobs full (2 jobs queued)" in e for e in errors) == 1
    assert redis_server.client().xlen("ddpo:rewards:jobs") == 2


def test_redis_auth(redis_server_with_auth: RedisServer, tmp_path, monkeypatch):
    server = redis_server_with_auth
    bad = f"redis://:wrong@127.0.0.1:{server.port}/0"
    with pytest.raises(ConnectionError, match=r"cannot use Redis at redis://:\*\*\*@127.0.0.1") as info:
        RedisRewardClient("jpeg_compressibility", bad)
    assert "wrong" not in str(info.value)
    workers = Workers(server, tmp_path)
    try:
        workers.start("w1", env={"DDPO_REDIS_PASSWORD": server.password})
        monkeypatch.setenv("DDPO_REDIS_PASSWORD", server.password)
        from trainer.config import build_config
        from trainer.reward_client import make_reward_client

        cfg = build_config("tiny", {"reward": {"transport": "redis", "redis_url": server.url}})
        client = make_reward_client(cfg.reward)
        try:
            images = batch(5)
            np.testing.assert_array_equal(
                client.submit(images, PROMPTS).result(timeout=30).rewards, expected(images)
            )
        finally:
            client.close()
    finally:
        workers.stop_all()


def test_reply_to_outside_the_reply_streams_is_refused(reward_workers: Workers, redis_server: RedisServer):
    reward_workers.start("w1")
    r = redis_server.client()
    r.set("ddpo:rewards:replies:a-string", "precious")

    def job(rid: str, reply_to: str) -> dict:
        request = build_request(rid, "jpeg_compressibility", batch(1), PROMPTS, None)
        return {
            "job": RedisJob(request=request, reply_to=reply_to, submitted_at=time.time()).model_dump_json()
        }

    r.xadd("ddpo:rewards:jobs", job("to-queue", "ddpo:rewards:jobs"))  # the job stream itself
    r.xadd("ddpo:rewards:jobs", job("to-string", "ddpo:rewards:replies:a-string"))  # not a stream
    r.xadd("ddpo:rewards:jobs", job("elsewhere", "other:key"))  # outside the prefix
    wait_for(lambda: r.xlen("ddpo:rewards:jobs:dead") == 3, 30, "three dead letters")
    dead = {f[b"request_id"]: f for _, f in r.xrange("ddpo:rewards:jobs:dead")}
    assert {f[b"error"] for f in dead.values()} == {b"invalid_reply_to"}
    assert b"not a stream" in dead[b"to-string"][b"reason"]
    assert r.ttl("ddpo:rewards:jobs") == -1  # no TTL was set on the queue
    assert r.get("ddpo:rewards:replies:a-string") == b"precious"
    assert not r.exists("other:key")
    assert not r.exists(result_key("ddpo:rewards", "to-queue"))
    wait_for(lambda: r.xpending("ddpo:rewards:jobs", "reward-workers")["pending"] == 0, 10, "acks")


@pytest.mark.slow
def test_orphaned_jobs_are_reclaimed_promptly_under_continuous_load(
    reward_workers: Workers, redis_server: RedisServer
):
    claim_idle = 1.0
    r = redis_server.client()
    reward_workers.start("w1", "--concurrency", "2", "--claim-idle-s", str(claim_idle), delay_s=5.0)
    with RedisRewardClient("test_slow_jpeg", redis_server.url, deadline_s=120) as client:
        futures = {f"first-{i}": client.submit(batch(i), PROMPTS, request_id=f"first-{i}") for i in range(2)}
        wait_for(lambda: r.xpending("ddpo:rewards:jobs", "reward-workers")["pending"] == 2, 30, "w1 busy")
        reward_workers.start("w2", "--concurrency", "2", "--claim-idle-s", str(claim_idle), delay_s=0.2)
        for i in range(20):  # more than w2 can score: the queue never empties while the orphans wait
            futures[f"load-{i}"] = client.submit(batch(100 + i), PROMPTS, request_id=f"load-{i}")
        time.sleep(0.5)
        reward_workers.kill("w1")
        killed = time.monotonic()
        for i in range(20, 40):
            futures[f"load-{i}"] = client.submit(batch(100 + i), PROMPTS, request_id=f"load-{i}")
            time.sleep(0.05)
        done_at = {}
        for rid in ["first-0", "first-1"]:
            futures[rid].result(timeout=60)
            done_at[rid] = time.monotonic() - killed
        assert r.xlen("ddpo:rewards:jobs") > 0  # new jobs were still queued when the orphans finished
        results = {rid: f.result(timeout=60) for rid, f in futures.items()}  # 0 lost
        assert len(results) == 42
        assert r.xlen(client.reply_stream) == 42  # 0 duplicated: one result per request
    print(f"\norphans answered {done_at} s after SIGKILL (claim_idle {claim_idle} s, scoring 0.2 s)")
    # Claimable claim_idle after w1's last refresh (<= claim_idle / 4 before the kill), then scored.
    assert max(done_at.values()) < claim_idle + 1.0


def test_close_is_prompt_and_clean(redis_server: RedisServer, capfd):
    r = redis_server.client()
    for _ in range(8):  # right after construction: the reply reader is inside its blocking XREAD
        client = RedisRewardClient("jpeg_compressibility", redis_server.url)
        started = time.monotonic()
        client.close()
        assert time.monotonic() - started < 1.5
        assert not client._loop._thread.is_alive()
        assert not r.exists(client.reply_stream)
    client = RedisRewardClient("jpeg_compressibility", redis_server.url)
    redis_server.process.kill()  # Redis gone: close still returns, bounded, without raising
    redis_server.process.wait()
    started = time.monotonic()
    client.close()
    assert time.monotonic() - started < 10
    assert "Task was destroyed but it is pending" not in capfd.readouterr().err


# --- the binary codec -----------------------------------------------------------------------------


def test_binary_jobs_carry_raw_pixels_and_score_like_json(reward_workers: Workers, redis_server: RedisServer):
    r = redis_server.client()
    # Not square (20 x 36): a transposed decoding would change the JPEG sizes.
    batches = [
        np.random.default_rng(40 + i).integers(0, 256, (n, 20, 36, 3), np.uint8)
        for i, n in enumerate([1, 3, 2])
    ]
    rewards = {}
    for codec in ("binary", "json"):
        with RedisRewardClient(
            "jpeg_compressibility", redis_server.url, deadline_s=60, codec=codec
        ) as client:
            futures = [
                client.submit(b, PROMPTS[: len(b)], request_id=f"{codec}-{i}") for i, b in enumerate(batches)
            ]
            if codec == "binary":  # no worker yet: look at the queued entries
                wait_for(lambda: r.xlen("ddpo:rewards:jobs") == 3, 10, "three queued jobs")
                entries = [fields for _, fields in r.xrange("ddpo:rewards:jobs")]
                for fields in entries:
                    assert set(fields) == {b"job", b"request"}
                    job = json.loads(fields[b"job"])
                    assert "request" not in job and job["request_id"].startswith("binary-")
                    b = batches[int(job["request_id"].split("-")[1])]
                    assert fields[b"request"].endswith(b.tobytes())  # the raw pixels, no base64
                    assert len(fields[b"request"]) < b.nbytes + 512
                reward_workers.start("w1")
            rewards[codec] = [f.result(timeout=60) for f in futures]
    for by_binary, by_json, b in zip(rewards["binary"], rewards["json"], batches, strict=True):
        np.testing.assert_array_equal(by_binary.rewards, by_json.rewards)
        np.testing.assert_array_equal(by_binary.rewards, expected(b))
        assert by_binary.details == by_json.details


def binary_field(
    rid: str, images: np.ndarray, dtype: str | None = None, shape: list[int] | None = None
) -> bytes:
    """A binary request whose header may lie about the dtype or shape (its length prefix kept right)."""
    import struct

    from shared import binary

    body = binary.encode(rid, "jpeg_compressibility", images, PROMPTS[: len(images)])
    (length,) = struct.unpack("<Q", body[:8])
    header = json.loads(body[8 : 8 + length])
    header["images"]["dtype"] = dtype or header["images"]["dtype"]
    header["images"]["shape"] = shape or header["images"]["shape"]
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body[8 + length :]


def test_corrupt_binary_jobs_are_dead_lettered_with_the_reason(
    reward_workers: Workers, redis_server: RedisServer
):
    reward_workers.start("w1")
    r = redis_server.client()
    images = batch(5, 2)
    cases = {  # request_id -> (binary field or None, error, words in the reason)
        "truncated": (binary_field("truncated", images)[:-100], "malformed_body", "truncated"),
        "float32": (binary_field("float32", images, dtype="F32"), "invalid_image", "dtype F32"),
        "huge": (
            binary_field("huge", images, shape=[2, 99999, 99999, 3]),
            "image_too_large",
            "over the limit",
        ),
        "negative": (
            binary_field("negative", images, shape=[-2, 24, 24, 3]),
            "invalid_image",
            "[-2, 24, 24, 3]",
        ),
        "garbage": (b"\x00" * 3, "malformed_body", "too short"),
        "no-field": (None, "invalid_job", "without its 'request' field"),
        "other-id": (binary_field("x", images), "invalid_job", "request 'x', the job says 'other-id'"),
    }
    reply_to = "ddpo:rewards:replies:corrupt"
    for rid, (field, _, _) in cases.items():
        job = RedisJob(request_id=rid, reply_to=reply_to, submitted_at=time.time())
        entry = {"job": job.model_dump_json(exclude_none=True)}
        if field is not None:
            entry["request"] = field
        r.xadd("ddpo:rewards:jobs", entry)
    wait_for(lambda: r.xlen("ddpo:rewards:jobs:dead") == len(cases), 30, "the dead letters")
    dead = {f[b"request_id"].decode(): f for _, f in r.xrange("ddpo:rewards:jobs:dead")}
    replies = {}
    for _, fields in r.xrange(reply_to):
        result = json.loads(fields[b"result"])
        replies[result["request_id"]] = result
    for rid, (field, error, words) in cases.items():
        assert dead[rid][b"error"].decode() == error, (rid, dead[rid])
        assert words in dead[rid][b"reason"].decode(), (rid, dead[rid][b"reason"])
        if field is not None:
            assert dead[rid][b"request"] == field  # kept for a person to look at (first 1 MB)
        # The trainer is answered at once with the reason, not left to its deadline.
        assert replies[rid]["ok"] is False and words in replies[rid]["error"]["reason"]
    wait_for(lambda: r.xpending("ddpo:rewards:jobs", "reward-workers")["pending"] == 0, 10, "acks")
    # The worker is healthy afterwards.
    with RedisRewardClient("jpeg_compressibility", redis_server.url, deadline_s=30) as client:
        b = batch(6)
        np.testing.assert_array_equal(client.submit(b, PROMPTS).result(timeout=30).rewards, expected(b))


def test_a_json_job_over_the_json_limit_is_refused_unparsed(
    reward_workers: Workers, redis_server: RedisServer
):
    """A JSON-codec job larger than max_json_body_bytes (parsing it would hold the worker's loop) is
    dead-lettered as body_too_large and its trainer answered at once; smaller JSON jobs still score."""
    reward_workers.start("w1", "--max-json-body-bytes", "200000")
    r = redis_server.client()
    reply_to = "ddpo:rewards:replies:large"
    large = np.random.default_rng(0).integers(0, 256, (3, 256, 256, 3), dtype=np.uint8)  # ~790 kB of PNG
    small = batch(7)
    for rid, images in (("large-json", large), ("small-json", small)):
        job = RedisJob(
            request=build_request(rid, "jpeg_compressibility", images, PROMPTS, None),
            reply_to=reply_to,
            submitted_at=time.time(),
        )
        r.xadd("ddpo:rewards:jobs", {"job": job.model_dump_json()})
    wait_for(lambda: r.xlen(reply_to) == 2, 30, "both answers")
    results = {}
    for _, fields in r.xrange(reply_to):
        result = json.loads(fields[b"result"])
        results[result["request_id"]] = result
    assert results["large-json"]["ok"] is False
    assert results["large-json"]["error"]["error"] == "body_too_large"
    assert "binary" in results["large-json"]["error"]["reason"]
    assert results["small-json"]["ok"], results["small-json"]
    assert results["small-json"]["response"]["rewards"] == pytest.approx(expected(small).tolist())
    dead = [f for _, f in r.xrange("ddpo:rewards:jobs:dead")]
    assert [f[b"error"] for f in dead] == [b"body_too_large"]
