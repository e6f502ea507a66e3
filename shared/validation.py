"""The one way a pydantic validation error becomes a message: ``where: what`` per error.

Input values are never included: they may be megabytes of base64 (a request body) or secrets
(an API key, a Redis password in a settings error).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

MAX_REASON_CHARS = 1000  # what an error body or a dead letter carries at most


class _HasErrors(Protocol):
    def errors(self) -> Any: ...


def _entries(err: _HasErrors | Iterable[Mapping[str, Any]]) -> Iterable[Mapping[str, Any]]:
    errors = getattr(err, "errors", None)
    if errors is None:
        return err  # type: ignore[return-value]
    try:  # pydantic's ValidationError: leave the inputs and documentation links out
        return errors(include_url=False, include_input=False)
    except TypeError:  # FastAPI's RequestValidationError.errors() takes no arguments
        return errors()


def validation_messages(err: _HasErrors | Iterable[Mapping[str, Any]], root: str = "") -> list[str]:
    """One ``loc: msg`` line per error (``root: msg`` or just ``msg`` for a whole-object error).

    ``err``: a pydantic ``ValidationError``, FastAPI's ``RequestValidationError`` or its ``errors()``.
    """
    lines = []
    for entry in _entries(err):
        where = ".".join(str(part) for part in entry.get("loc", ())) or root
        # pydantic prefixes what a validator's ValueError said; the field name says enough.
        msg = str(entry.get("msg", "invalid")).removeprefix("Value error, ")
        lines.append(f"{where}: {msg}" if where else msg)
    return lines


def format_validation_error(
    err: _HasErrors | Iterable[Mapping[str, Any]],
    root: str = "",
    sep: str = "; ",
    limit: int | None = MAX_REASON_CHARS,
) -> str:
    """``validation_messages`` joined by ``sep``, cut at ``limit`` characters (None: whole)."""
    text = sep.join(validation_messages(err, root))
    return text if limit is None else text[:limit]
