"""Slow and idle clients: header, body, write and keep-alive timeouts and a connection limit (issue 14).

uvicorn (0.54, h11; httptools is not a dependency) closes an idle kept-alive connection after
``timeout_keep_alive`` but has no timeout for a request head or body: a client that connects and
sends nothing, sends its head one byte at a time, or declares a body it never sends (slowloris)
holds a connection and a file descriptor for ever, before any auth. Here:

- ``TimeoutH11Protocol``: uvicorn's h11 protocol (the one ``http="auto"`` picks without httptools,
  so no change of parser or speed) with two timers per connection. The head timer runs from
  connecting, or from the first byte of the next request on a kept-alive connection, until the head
  is complete (``header_timeout_s``; then 408 if part of a head came, else a silent close). The body
  timer runs from the head until the body is complete (``body_timeout_s``); the app answers that one
  (``BodyDeadline``), the timer only closes connections whose response went out before the body
  ended (e.g. a 401 before the body was read: uvicorn discards the rest of the body, and each byte
  it discards cancels its keep-alive timer, so a trickle would hold the connection for ever).
  A third timer cuts slow readers of the response (``write_timeout_s``): once the transport's
  write buffer is over its high-water mark, asyncio calls ``pause_writing`` (uvicorn's flow control
  then holds the next ``send`` of the response) and ``resume_writing`` when it drains; a client that
  never reads would hold the connection, its response buffer and the request task for ever. Paused
  for longer than the timeout: a reset (``SO_LINGER`` 0, ``transport.abort()``; ``close()`` would
  wait for the buffer to drain), a warning in the log and
  ``ddpo_reward_connections_closed_total{reason="write_timeout"}``.
  ``limit_concurrency`` (uvicorn's option) is checked as uvicorn does, at each request head, but
  answered with our JSON error (uvicorn's own 503 is plain text).
- ``BodyDeadline``: ASGI middleware giving the whole request body a deadline while the app reads
  it: past it, the app's ``receive()`` raises ``ApiError(408, "request_timeout")``, which the app's
  error handler answers as JSON (``Connection: close``: the rest of the body never came). After the
  body is complete, ``receive()`` passes through untouched (the app may wait on ``http.disconnect``).
- ``uvicorn_options(settings)``: the uvicorn keyword arguments for all of this, used by
  ``ddpo-reward-server`` for one worker and for N (a ``functools.partial`` of a module-level class
  pickles into uvicorn's spawned worker processes).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import http
import logging
import socket
import struct
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from reward_server.errors import ApiError, error_response
from reward_server.settings import ServerSettings

logger = logging.getLogger(__name__)

# The key of the app's lifespan state under which the protocol finds the app's ``ServerMetrics``
# (uvicorn hands every connection the lifespan state; reward_server/app.py puts it there).
METRICS_STATE_KEY = "ddpo_reward_metrics"


def raw_error(err: ApiError) -> bytes:
    """A whole HTTP/1.1 response for ``err`` that closes the connection: written on the transport
    directly where no request cycle exists to answer it (the head never completed). The body is
    ``error_response()``'s, byte for byte."""
    body = error_response(err).body
    head = (
        f"HTTP/1.1 {err.status} {http.HTTPStatus(err.status).phrase}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body


class TimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol plus the head, body and write timers and a JSON 503 over the limit."""

    def __init__(
        self,
        config: Any,
        server_state: Any,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        header_timeout_s: float,
        body_timeout_s: float,
        write_timeout_s: float,
        retry_after_s: int = 1,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.header_timeout_s = header_timeout_s
        self.body_timeout_s = body_timeout_s
        self.write_timeout_s = write_timeout_s
        self.retry_after_s = retry_after_s
        self.head_timer: asyncio.TimerHandle | None = None
        self.body_timer: asyncio.TimerHandle | None = None
        self.write_timer: asyncio.TimerHandle | None = None
        self.body_overdue = False
        # uvicorn's own check would answer 503 in plain text; ``admit`` makes the same check in JSON.
        self.concurrency_limit, self.limit_concurrency = self.limit_concurrency, None
        if self.concurrency_limit is not None:
            self.app = self.admit

    # --- timers -----------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.head_timer = self.loop.call_later(self.header_timeout_s, self.head_expired)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self.watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may start parsing a pipelined request
        if self.body_overdue and self.conn.their_state is h11.SEND_BODY:
            self.transport.close()  # answered, and the body is late: stop discarding it
        elif not self.transport.is_closing():
            self.watch()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.cancel_timers()

    def watch(self) -> None:
        """Arm or cancel the timers from h11's view of the client: IDLE with bytes buffered is a
        head in progress (IDLE without bytes is keep-alive, uvicorn's timer), SEND_BODY a body."""
        if self.transport.get_protocol() is not self:  # upgraded to a WebSocket: not ours to time
            self.cancel_timers()
            return
        state = self.conn.their_state
        if state is not h11.SEND_BODY and self.body_timer is not None:
            self.body_timer.cancel()
            self.body_timer = None
        if state is h11.IDLE:
            if self.head_timer is None and self.conn.trailing_data[0]:
                self.head_timer = self.loop.call_later(self.header_timeout_s, self.head_expired)
            return
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None
        if state is h11.SEND_BODY and self.body_timer is None:
            self.body_overdue = False
            self.body_timer = self.loop.call_later(self.body_timeout_s, self.body_expired)

    def cancel_timers(self) -> None:
        for timer in (self.head_timer, self.body_timer, self.write_timer):
            if timer is not None:
                timer.cancel()
        self.head_timer = self.body_timer = self.write_timer = None

    def head_expired(self) -> None:
        self.head_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self.conn.trailing_data[0]:  # part of a head came: its sender waits for an answer
            reason = f"the request head did not arrive within {self.header_timeout_s:g} s"
            self.transport.write(raw_error(ApiError(408, "request_timeout", reason)))
        self.transport.close()

    def body_expired(self) -> None:
        self.body_timer = None
        if self.cycle is None or self.cycle.response_complete:
            self.transport.close()  # answered without reading the body (e.g. 401): drop the rest
        else:
            self.body_overdue = True  # the app's receive() answers 408 (BodyDeadline); close after

    # --- slow readers of the response -------------------------------------------------------------
    def pause_writing(self) -> None:
        """The write buffer is over its high-water mark (the client reads slower than we write)."""
        super().pause_writing()
        if self.write_timer is None:
            self.write_timer = self.loop.call_later(self.write_timeout_s, self.write_expired)

    def resume_writing(self) -> None:
        """The client read enough for the buffer to drain under its low-water mark."""
        super().resume_writing()
        if self.write_timer is not None:
            self.write_timer.cancel()
            self.write_timer = None

    def write_expired(self) -> None:
        self.write_timer = None
        # abort, not close: close() keeps the connection until the buffer drains, i.e. for ever. And
        # a reset (SO_LINGER 0): else the kernel keeps the socket (FIN-WAIT-1) and what it holds of
        # the response (2.8 MB measured on loopback) while it probes the zero window, and the
        # client still reads it all.
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()
        client = "{}:{}".format(*self.client) if self.client else "a client"
        logger.warning(
            "%s - closed the connection: the client left its response unread (write buffer full "
            "for %g s, write_timeout_s)",
            client,
            self.write_timeout_s,
        )
        metrics = self.app_state.get(METRICS_STATE_KEY)
        if metrics is not None:
            metrics.closed_connections.labels("write_timeout").inc()

    # --- limit_concurrency ------------------------------------------------------------------------
    async def admit(self, scope: Any, receive: Any, send: Any) -> None:
        """The app, unless more than ``limit_concurrency`` connections are open or requests running
        (this one included): then 503 + Retry-After in our JSON format, and the connection closes."""
        limit = self.concurrency_limit
        if limit is not None and (len(self.connections) > limit or len(self.tasks) > limit):
            reason = f"over limit_concurrency ({limit} connections or requests at once); retry"
            headers = {"Retry-After": str(self.retry_after_s), "Connection": "close"}
            err = ApiError(503, "http_error", reason, headers)
            await error_response(err)(scope, receive, send)
            return
        await self.config.loaded_app(scope, receive, send)


class BodyDeadline:
    """ASGI middleware: the whole request body must arrive within ``timeout_s`` of the request's
    start, or the app's ``receive()`` raises ``ApiError(408, "request_timeout")`` (answered as JSON
    by the app's handler). Once the body is complete, ``receive()`` is the server's own again."""

    def __init__(self, app: Any, timeout_s: float):
        self.app = app
        self.timeout_s = timeout_s

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        body_done = False

        async def timed_receive() -> dict[str, Any]:
            nonlocal body_done
            if body_done:
                return await receive()
            try:
                message = await before(deadline, receive())
            except asyncio.TimeoutError:
                reason = f"the request body did not arrive within {self.timeout_s:g} s"
                raise ApiError(408, "request_timeout", reason, {"Connection": "close"}) from None
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await self.app(scope, timed_receive, send)


async def before(deadline: float, awaitable: Any) -> Any:
    """``await awaitable``, or asyncio.TimeoutError at the loop time ``deadline``."""
    if hasattr(asyncio, "timeout_at"):  # Python 3.11+: a timer, no extra task per call (3 vs 11 us)
        async with asyncio.timeout_at(deadline):
            return await awaitable
    return await asyncio.wait_for(awaitable, max(0.0, deadline - asyncio.get_running_loop().time()))


def uvicorn_options(settings: ServerSettings) -> dict[str, Any]:
    """uvicorn's keyword arguments for the timeouts and the connection limit of ``settings``."""
    protocol = functools.partial(
        TimeoutH11Protocol,
        header_timeout_s=settings.header_timeout_s,
        body_timeout_s=settings.body_timeout_s,
        write_timeout_s=settings.write_timeout_s,
        retry_after_s=settings.retry_after_s,
    )
    return {
        "http": protocol,
        "timeout_keep_alive": settings.keep_alive_timeout_s,
        "limit_concurrency": settings.limit_concurrency,
    }
