"""Slow and idle clients against a real uvicorn server on loopback, through raw sockets: header,
body, write and keep-alive timeouts and the connection limit (reward_server/timeouts.py, issue 14).

The servers run with the options ``ddpo-reward-server`` gives uvicorn (``uvicorn_options``), in a
thread with small timeouts; ``test_cli_passes_the_options`` runs the command itself with 1 and 2
worker processes."""

from __future__ import annotations

import asyncio
import json
import os
import select
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn

from reward_server.app import create_app
from reward_server.settings import ServerSettings
from reward_server.timeouts import uvicorn_options
from shared.codec import encode_png_b64
from tests.reward_server.server_utils import free_loopback_socket, wait_ready

ROOT = Path(__file__).resolve().parents[2]
HEADER_S = 0.5
BODY_S = 0.8
KEEP_ALIVE_S = 0.6
WRITE_S = 0.8
SLACK_S = 1.5  # a busy 2-core machine: timers fire late, never early
HEAD = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


class Server:
    """``create_app(settings)`` under uvicorn with ``uvicorn_options(settings)``, in a thread."""

    def __init__(self, **overrides: Any):
        timeouts = {
            "header_timeout_s": HEADER_S,
            "body_timeout_s": BODY_S,
            "keep_alive_timeout_s": KEEP_ALIVE_S,
            "write_timeout_s": WRITE_S,
        }
        settings = ServerSettings(**{**timeouts, **overrides})
        sock = free_loopback_socket()
        self.port = sock.getsockname()[1]
        self.base = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(create_app(settings), log_level="warning", **uvicorn_options(settings))
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=lambda: asyncio.run(self.server.serve(sockets=[sock])), daemon=True
        )
        self.thread.start()
        wait_ready(self.base)

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture
def server() -> Iterator[Server]:
    running = Server()
    yield running
    running.stop()


def read_until_closed(sock: socket.socket, limit_s: float) -> tuple[float, bytes]:
    """(seconds until the server closed the connection, what it sent before); fails after limit_s."""
    started = time.monotonic()
    sock.settimeout(limit_s)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError(f"still open after {limit_s} s (sent {data[:200]!r})") from None
    return time.monotonic() - started, data


def trickle_until_closed(
    sock: socket.socket, data: bytes, every_s: float, limit_s: float
) -> tuple[float, bytes]:
    """Send ``data`` one byte every ``every_s`` until the server closes; (seconds, what it sent)."""
    started = time.monotonic()
    received = b""
    for byte in data:
        if time.monotonic() - started > limit_s:
            raise AssertionError(f"still open after {limit_s} s of trickling")
        if select.select([sock], [], [], every_s)[0]:
            rest = read_until_closed(sock, limit_s)[1]
            return time.monotonic() - started, rest
        try:
            sock.sendall(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            return time.monotonic() - started, received
    raise AssertionError("ran out of bytes to trickle")


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length body: (status, headers, body)."""
    sock.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before a response head: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers["content-length"]):
        chunk = sock.recv(65536)
        assert chunk, "closed inside a response body"
        body += chunk
    return int(lines[0].split()[1]), headers, body


# Pipelined GET /openapi.json (8 kB each): 1500 of them are 12 MB of responses, more than the
# kernel's buffers on both sides (the server's send buffer autotunes up to ~4 MB on loopback) and
# asyncio's 64 kB high-water mark together, so the server's writes pause.
OPENAPI = b"GET /openapi.json HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
UNREAD_REQUESTS = 1500


def request_unread_responses(port: int, requests: int = UNREAD_REQUESTS) -> socket.socket:
    """A client with a 4 kB receive buffer that sends ``requests`` pipelined requests (and reads nothing)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: sets the window
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    sock.sendall(OPENAPI * requests)
    return sock


def reset_within(sock: socket.socket, limit_s: float, started: float) -> float:
    """Seconds from ``started`` until the server reset ``sock`` (POLLHUP/POLLERR: seen without reading
    a byte); fails after ``limit_s``."""
    poller = select.poll()
    poller.register(sock, select.POLLHUP | select.POLLERR)
    if not poller.poll(max(0.0, started + limit_s - time.monotonic()) * 1000):
        raise AssertionError(f"still open {limit_s} s after the requests")
    return time.monotonic() - started


def parse_error(data: bytes) -> tuple[int, dict[str, Any]]:
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


# --- (a), (b): the request head ------------------------------------------------------------------


def test_a_silent_connection_is_closed_after_the_header_timeout(server):
    with server.connect() as sock:
        elapsed, data = read_until_closed(sock, HEADER_S + SLACK_S)
    assert data == b""  # nothing asked, nothing answered
    assert HEADER_S - 0.1 <= elapsed <= HEADER_S + SLACK_S


def test_b_a_head_sent_one_byte_at_a_time_gets_408_and_is_closed(server):
    head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 100
    with server.connect() as sock:
        elapsed, data = trickle_until_closed(sock, head, 0.2, HEADER_S + SLACK_S)
    assert HEADER_S - 0.1 <= elapsed <= HEADER_S + SLACK_S
    status, body = parse_error(data)
    assert status == 408 and body["error"] == "request_timeout", data
    assert b"connection: close" in data.lower()


def test_b_the_head_timer_runs_again_for_the_next_request_on_a_kept_alive_connection(server):
    with server.connect() as sock:
        sock.sendall(HEAD)
        assert read_response(sock)[0] == 200
        # The keep-alive timer stops at the first byte of the next request; the head timer takes over.
        elapsed, data = trickle_until_closed(
            sock, HEAD[:-4] + b"X-Slow: " + b"a" * 100, 0.2, HEADER_S + SLACK_S
        )
    assert elapsed <= HEADER_S + SLACK_S
    assert parse_error(data)[0] == 408


# --- (c): the request body -----------------------------------------------------------------------


def test_c_a_body_shorter_than_its_content_length_gets_408_json(server):
    head = (
        b"POST /score HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000\r\n\r\n"
    )
    with server.connect() as sock:
        sock.sendall(head + b'{"reward":')
        elapsed, data = read_until_closed(sock, BODY_S + SLACK_S)
    assert BODY_S - 0.1 <= elapsed <= BODY_S + SLACK_S
    status, body = parse_error(data)
    assert status == 408 and body["error"] == "request_timeout", data
    assert "did not arrive within" in body["reason"]
    assert b"connection: close" in data.lower()
    metrics = httpx.get(server.base + "/metrics").text
    assert 'ddpo_reward_requests_total{reward="unknown",status="408"} 1.0' in metrics
    assert 'ddpo_reward_errors_total{reason="request_timeout"} 1.0' in metrics


def test_c_a_body_trickled_after_an_early_answer_is_cut_at_the_body_timeout(server):
    """An answer before the body is read (405 here, 401 without a token): uvicorn then discards the
    rest of the body, and each discarded byte used to cancel its keep-alive timer for good."""
    head = b"POST /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n\r\n"
    with server.connect() as sock:
        sock.sendall(head + b"x" * 10)
        status, _headers, body = read_response(sock)
        assert status == 405 and json.loads(body)["error"] == "method_not_allowed"
        elapsed, _ = trickle_until_closed(sock, b"x" * 1000, 0.2, BODY_S + SLACK_S)
    assert elapsed <= BODY_S + SLACK_S


def test_c_a_slow_body_within_the_deadline_is_served(server):
    image = encode_png_b64(np.zeros((8, 8, 3), np.uint8))
    request = {"request_id": "t", "reward": "jpeg_compressibility", "images": [image], "prompts": ["p"]}
    body = json.dumps(request).encode()
    head = "POST /score HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    head += f"Content-Length: {len(body)}\r\n\r\n"
    with server.connect() as sock:
        sock.sendall(head.encode())
        for piece in (body[:10], body[10:20], body[20:]):
            time.sleep(BODY_S / 5)
            sock.sendall(piece)
        status, _headers, answer = read_response(sock)
    assert status == 200 and len(json.loads(answer)["rewards"]) == 1, answer


def test_c_after_the_body_receive_passes_through_untouched():
    """The deadline is the body's: an app that waits on http.disconnect past it is not cut off."""
    from reward_server.timeouts import BodyDeadline

    messages = [
        {"type": "http.request", "body": b"ab", "more_body": True},
        {"type": "http.request", "body": b"c"},
    ]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        await asyncio.sleep(0.3)  # the client goes away long after the deadline
        return {"type": "http.disconnect"}

    seen = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.extend([await receive(), await receive(), await receive()])

    asyncio.run(BodyDeadline(app, timeout_s=0.1)({"type": "http"}, receive, None))
    assert [m["type"] for m in seen] == ["http.request", "http.request", "http.disconnect"]


# --- (d): keep-alive -----------------------------------------------------------------------------


def test_d_keep_alive_serves_the_next_request_then_closes_when_idle(server):
    with server.connect() as sock:
        for _ in range(3):
            sock.sendall(HEAD)
            status, headers, _ = read_response(sock)
            assert status == 200 and headers.get("connection") != "close"
        elapsed, data = read_until_closed(sock, KEEP_ALIVE_S + SLACK_S)
    assert data == b""
    assert KEEP_ALIVE_S - 0.1 <= elapsed <= KEEP_ALIVE_S + SLACK_S


# --- (e): limit_concurrency ----------------------------------------------------------------------


def test_e_beyond_limit_concurrency_connections_a_request_gets_503_json():
    running = Server(limit_concurrency=3, header_timeout_s=30)
    try:
        idle = [running.connect() for _ in range(3)]
        time.sleep(0.2)  # accepted by the server
        with running.connect() as sock:  # the 4th connection
            sock.sendall(HEAD)
            status, headers, body = read_response(sock)
        assert status == 503 and json.loads(body)["error"] == "http_error", body
        assert "limit_concurrency" in json.loads(body)["reason"]
        assert headers["retry-after"] == "1" and headers["connection"] == "close"
        for sock in idle:
            sock.close()
        deadline = time.monotonic() + 5
        while httpx.get(running.base + "/healthz").status_code != 200:  # room again
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        running.stop()


# --- (f): slowloris does not starve the probes ---------------------------------------------------


def test_f_healthz_answers_quickly_while_20_slowloris_sockets_are_open():
    header_s = 5.0
    running = Server(header_timeout_s=header_s)
    try:
        opened = time.monotonic()
        slow = [running.connect() for _ in range(20)]
        for sock in slow:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: a")
        with httpx.Client() as client:
            client.get(running.base + "/healthz")  # connect once: time the answers, not the handshake
            times: list[float] = []
            # Probe for 2 s (at least 5 times), all while the 20 sockets trickle their heads.
            while len(times) < 5 or time.monotonic() < opened + 2.0:
                for sock in slow:
                    sock.sendall(b"a")
                started = time.perf_counter()
                assert client.get(running.base + "/healthz").status_code == 200
                times.append(time.perf_counter() - started)
                time.sleep(0.05)
        print(
            f"/healthz with 20 slowloris sockets: {len(times)} probes, median "
            f"{statistics.median(times) * 1000:.1f} ms, max {max(times) * 1000:.1f} ms"
        )
        assert statistics.median(times) < 0.1, times
        # ...and the server lets them go: every one closed at its header timeout.
        for sock in slow:
            read_until_closed(sock, max(0.1, opened + header_s + SLACK_S - time.monotonic()))
            sock.close()
    finally:
        running.stop()


# --- (g): slow readers of the response ---------------------------------------------------------


def test_g_a_client_that_never_reads_its_responses_is_reset_after_the_write_timeout(server):
    """Without the write timer, the connection, the buffered responses and the request task waiting
    on uvicorn's flow control (drain) stay for ever; /healthz answers meanwhile."""
    started = time.monotonic()
    sock = request_unread_responses(server.port)
    times: list[float] = []
    with sock, httpx.Client() as client:
        client.get(server.base + "/healthz")  # connect once: time the answers, not the handshake
        poller = select.poll()
        poller.register(sock, select.POLLHUP | select.POLLERR)
        while not poller.poll(0) and time.monotonic() < started + WRITE_S + SLACK_S:
            probe = time.perf_counter()
            assert client.get(server.base + "/healthz").status_code == 200
            times.append(time.perf_counter() - probe)
            time.sleep(0.05)  # (every 20 ms: ~45 ms each, idle or not: delayed ACKs on loopback)
        elapsed = reset_within(sock, WRITE_S + SLACK_S, started)
        with pytest.raises(ConnectionResetError):  # a reset: the kernel dropped the rest too
            while sock.recv(65536):
                pass
        metrics = client.get(server.base + "/metrics").text
    print(
        f"non-reading client reset after {elapsed:.2f} s (write_timeout_s {WRITE_S}); /healthz "
        f"meanwhile: {len(times)} probes, median {statistics.median(times) * 1000:.1f} ms, "
        f"max {max(times) * 1000:.1f} ms"
    )
    assert WRITE_S - 0.1 <= elapsed <= WRITE_S + SLACK_S
    assert len(times) >= 3 and statistics.median(times) < 0.1, times
    assert 'ddpo_reward_connections_closed_total{reason="write_timeout"} 1.0' in metrics
    state = server.server.server_state
    deadline = time.monotonic() + 5
    while state.connections or state.tasks:  # the connection and its request task are gone
        assert time.monotonic() < deadline, (state.connections, state.tasks)
        time.sleep(0.02)


def test_g_a_slow_but_steady_reader_is_not_cut(server):
    """The timer runs while the writes stay paused, not over the whole response: a client reading
    32 kB every 0.1 s gets 100 pipelined responses over several write_timeout_s."""
    requests = 100
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)  # room for one read's 32 kB
    sock.settimeout(10)
    before = set(server.server.server_state.connections)
    sock.connect(("127.0.0.1", server.port))
    deadline = time.monotonic() + 5
    while not (new := set(server.server.server_state.connections) - before):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    (protocol,) = new
    # A small send buffer on the server's side of this connection (no autotuning): its writes pause
    # after a few responses instead of after megabytes. Count the pauses to be sure they happened.
    protocol.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
    pauses = []
    pause_writing = protocol.pause_writing
    protocol.pause_writing = lambda: (pauses.append(time.monotonic()), pause_writing())
    started = time.monotonic()
    with sock:
        sock.sendall(OPENAPI * requests)
        data = b""
        while data.count(b"HTTP/1.1 200 OK") < requests or not data.endswith(b"}"):
            time.sleep(0.1)
            chunk = sock.recv(32768)
            assert chunk, f"closed after {data.count(b'HTTP/1.1 200 OK')} responses"
            data += chunk
    elapsed = time.monotonic() - started
    print(f"slow reader: {requests} responses ({len(data)} bytes) in {elapsed:.1f} s, {len(pauses)} pauses")
    assert elapsed > 2 * WRITE_S and len(pauses) >= 5, (elapsed, len(pauses))


# --- ddpo-reward-server with 1 and 2 workers ---------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_cli_passes_the_options(workers):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    flags = ["--port", str(port), "--workers", str(workers), "--log-level", "warning"]
    flags += ["--header-timeout-s", str(HEADER_S), "--body-timeout-s", str(BODY_S)]
    flags += ["--write-timeout-s", str(WRITE_S)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "reward_server.cli", *flags, "--limit-concurrency", "2"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc=proc)
        for _ in range(workers * 2):  # connections land on either worker
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                assert read_until_closed(sock, HEADER_S + SLACK_S)[1] == b""
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(b"POST /score HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n{")
                status, body = parse_error(read_until_closed(sock, BODY_S + SLACK_S)[1])
                assert status == 408 and body["error"] == "request_timeout"
            started = time.monotonic()
            with request_unread_responses(port) as sock:
                assert reset_within(sock, WRITE_S + SLACK_S, started) >= WRITE_S - 0.1
        # limit_concurrency 2 (1 would refuse pipelined requests, as uvicorn's own check does: the
        # previous request's task still counts when the next one starts): a request while two other
        # connections are open on its worker -> 503 in JSON. Eight others, so that each worker most
        # likely holds two (connections land on either).
        answers = set()
        for _ in range(4):
            others = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(8)]
            time.sleep(0.1)
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                status, _headers, body = read_response(sock)
                answers.add((status, json.loads(body).get("error", "")))
            for other in others:
                other.close()
        assert (503, "http_error") in answers, answers
    finally:
        proc.terminate()
        proc.wait(timeout=30)
