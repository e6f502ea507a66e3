"""A memory budget in bytes for what requests hold in flight: bodies, parsed requests, decoded images.

Limits that count requests or images do not bound memory: a 2048x2048 solid PNG is 16 KB on the
wire and 12.6 MB decoded. Every ``POST /score`` (and every Redis job a worker scores) holds a
``Reservation`` against one ``MemoryBudget`` of ``max_inflight_bytes``; it grows *before* the bytes
are allocated and is released when the request ends (answered, failed or still waiting on the
first attempt of its ``request_id``, which counts too):

- the body: ``BODY_BYTES_FACTOR`` x its size, reserved from Content-Length before any byte is read
  (chunked bodies grow the reservation chunk by chunk); the raw bytes and the parsed request's
  strings coexist while parsing;
- the decoded images: ``DECODED_BYTES_PER_PIXEL`` x width x height of every image, computed from
  the PNG header before anything is decoded (the uint8 array is 3 bytes per pixel; PIL's decoder
  works on a 4-byte-per-pixel copy, and scorers such as the JPEG one make another while scoring).

Beyond the budget a request gets 429 + Retry-After; a request that could never fit, even alone,
gets 413. Everything runs on the event loop, so the counter needs no lock.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

from reward_server.errors import ApiError

BODY_BYTES_FACTOR = 2
DECODED_BYTES_PER_PIXEL = 8
MALLOC_ARENAS = 2


@functools.cache
def limit_malloc_arenas() -> bool:
    """At most ``MALLOC_ARENAS`` glibc heaps for the whole process (``MALLOC_ARENA_MAX``).

    glibc gives threads heaps of their own (up to 8 per core), and memory freed in one heap is
    reused only by its threads: bodies read on the event loop and images decoded in worker threads
    each kept their own peak, and the process's RSS outgrew the budget that bounds what is live at
    once (100 hostile requests, 256 MiB budget: +186-279 MiB; with 2 heaps +141-231 MiB over 10 runs,
    at the same throughput). Once per process, before the server's threads start; False where there is no
    glibc (the budget still counts, RSS then follows it less closely).
    """
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    m_arena_max = -8  # <malloc.h>
    return bool(mallopt(m_arena_max, MALLOC_ARENAS))


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


class MemoryBudget:
    def __init__(self, limit_bytes: int, retry_after_s: int = 1, gauge=None):
        self.limit = limit_bytes
        self.used = 0
        self.retry_after_s = retry_after_s
        self._gauge = gauge

    def reservation(self) -> Reservation:
        return Reservation(self)

    def _take(self, n: int, what: str) -> None:
        if n > self.limit:
            raise ApiError(
                413,
                "over_memory_budget",
                f"{what} needs {mib(n)} in memory, over the server's whole budget of {mib(self.limit)} "
                "(max_inflight_bytes); send fewer or smaller images per request",
            )
        if self.used + n > self.limit:
            raise ApiError(
                429,
                "over_memory_budget",
                f"busy: {mib(self.used)} of the {mib(self.limit)} memory budget in use; {what} needs "
                f"{mib(n)} more; retry later",
                {"Retry-After": str(self.retry_after_s)},
            )
        self.used += n
        self._report()

    def _give(self, n: int) -> None:
        self.used -= n
        self._report()

    def _report(self) -> None:
        if self._gauge is not None:
            self._gauge.set(self.used)


class Reservation:
    """The bytes one request holds; grow before allocating, ``release()`` (or ``with``) at the end."""

    def __init__(self, budget: MemoryBudget):
        self.budget = budget
        self.held = 0

    def grow(self, n: int, what: str) -> None:
        """Reserve ``n`` more bytes or raise ApiError (429, or 413 if the total could never fit)."""
        if n <= 0:
            return
        if self.held + n > self.budget.limit:
            raise ApiError(
                413,
                "over_memory_budget",
                f"{what} brings this request to {mib(self.held + n)} in memory, over the server's "
                f"whole budget of {mib(self.budget.limit)} (max_inflight_bytes)",
            )
        self.budget._take(n, what)
        self.held += n

    def shrink_to(self, n: int) -> None:
        if n < self.held:
            self.budget._give(self.held - n)
            self.held = n

    def release(self) -> None:
        self.shrink_to(0)

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
