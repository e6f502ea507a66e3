"""Retries of the same ``request_id`` are answered once.

A bounded LRU with a TTL maps request_id -> entry. While the first request is being scored, a
retry waits for it (it does not score again); once it succeeds, retries get the stored response.
Errors are not stored: a retry after a 429/5xx is scored afresh. A request_id reused with a
different payload is a client bug and is refused (409).

The fingerprint covers the full content: a SHA-256 hash of the canonical body (the request as
pydantic serializes it, every image byte included, without the request_id). Any change to any
byte of any image (an extra PNG chunk, other pixels of the same length), prompt or metadata value
gives another fingerprint, so a reused request_id is refused (409), never answered with the stale
reward of another request. Hashing runs at about 1 GB/s and releases the GIL; the server runs it in
a worker thread, while the request is scored. The same request serialized with other whitespace or key
order hashes the same (it is parsed first); metadata keys in another order do not (409, safe).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from shared.binary import BinaryScoreRequest
from shared.schemas import ScoreFields, ScoreRequest, ScoreResponse


def fingerprint(request: ScoreRequest | BinaryScoreRequest) -> str:
    """SHA-256 (first 128 bits) of everything but the request_id: the canonical JSON of the fields
    (bytes straight from pydantic), then every image. SHA-256 rather than BLAKE2b: 1.5x faster here
    (SHA-NI), 0.95 vs 0.63 GB/s.

    A binary request: its fields' canonical JSON, its shape, then every pixel byte. The codecs hash
    differently, so one request_id sent once as JSON and once as binary is a conflict (409).
    """
    if isinstance(request, BinaryScoreRequest):
        digest = binary_digest(request.fields, request.images.shape)
        digest.update(request.images.data)
        return digest.hexdigest()[:32]
    # The fields' canonical JSON, then each image length-prefixed: serializing a 100 MB request in
    # one call would hold the interpreter lock for ~0.1 s (the event loop with it); hashlib
    # releases it while it hashes each image.
    digest = hashlib.sha256(b"ddpo-json\0")
    digest.update(ScoreRequest.__pydantic_serializer__.to_json(request, exclude={"request_id", "images"}))
    for image in request.images:
        data = image.encode()
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()[:32]


def binary_digest(fields: ScoreFields, shape: tuple[int, ...]) -> Any:
    """A binary request's hash before its pixels: feed it the pixel bytes in order, then
    ``hexdigest()[:32]`` is ``fingerprint(request)`` (the server hashes while the body streams in)."""
    digest = hashlib.sha256(b"ddpo-binary\0")
    digest.update(ScoreFields.__pydantic_serializer__.to_json(fields, exclude={"request_id"}))
    digest.update(repr(tuple(shape)).encode() + b"\0")
    return digest


@dataclass
class Entry:
    fingerprint: asyncio.Future[str]  # being hashed while the first attempt is scored
    done: asyncio.Event = field(default_factory=asyncio.Event)
    response: ScoreResponse | None = None
    error: BaseException | None = None
    finished_at: float = 0.0

    async def fingerprint_value(self) -> str:
        """The first attempt's fingerprint (waits while it is still being hashed)."""
        return await asyncio.shield(self.fingerprint)


class IdempotencyCache:
    """request_id -> in-flight or finished entry; at most ``max_entries`` finished ones for ``ttl_s``."""

    def __init__(self, max_entries: int, ttl_s: float, clock: Any = time.monotonic):
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._clock = clock
        self._entries: OrderedDict[str, Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, request_id: str) -> Entry | None:
        entry = self._entries.get(request_id)
        if entry is None:
            return None
        if entry.done.is_set() and self._clock() - entry.finished_at > self.ttl_s:
            del self._entries[request_id]
            return None
        self._entries.move_to_end(request_id)
        return entry

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0

    def begin(self, request_id: str, fp: asyncio.Future[str] | None) -> Entry | None:
        """Register an in-flight request and its fingerprint (being hashed); None when disabled."""
        if not self.enabled or fp is None:
            return None
        entry = Entry(fingerprint=fp)
        self._entries[request_id] = entry
        self._entries.move_to_end(request_id)
        return entry

    def finish(self, request_id: str, entry: Entry, response: ScoreResponse) -> None:
        entry.response = response
        entry.finished_at = self._clock()
        entry.done.set()
        self._evict()

    def fail(self, request_id: str, entry: Entry, error: BaseException) -> None:
        """Wake waiters with the error and forget the id, so a later retry scores again."""
        entry.error = error
        entry.finished_at = self._clock()
        entry.done.set()
        if self._entries.get(request_id) is entry:
            del self._entries[request_id]

    def _evict(self) -> None:
        # Only finished entries count against the bound; in-flight ones are bounded by the in-flight limits.
        finished = [k for k, e in self._entries.items() if e.done.is_set()]
        now = self._clock()
        for key in finished:
            if now - self._entries[key].finished_at > self.ttl_s:
                del self._entries[key]
        finished = [k for k, e in self._entries.items() if e.done.is_set()]
        for key in finished[: max(0, len(finished) - self.max_entries)]:
            del self._entries[key]
