"""The one error table (shared/errors.py): the wire contract, the retryable set, and that every code
the code base answers with is declared there, with the status it is answered with."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from reward_server.errors import ApiError
from shared import errors
from shared.errors import ERROR_CODES, RETRYABLE_STATUSES, check_code, is_retryable_status, parse_retry_after

ROOT = Path(__file__).resolve().parents[2]


def test_the_wire_contract():
    # design.md: 422 malformed, 400 unknown reward, 401 token, 413 too large, 429 overloaded, 503 not ready.
    assert ERROR_CODES["invalid_request"].status == 422
    assert ERROR_CODES["unknown_reward"].status == 400
    assert ERROR_CODES["unauthorized"].status == 401
    assert ERROR_CODES["body_too_large"].status == 413
    assert ERROR_CODES["overloaded"].status == 429
    assert ERROR_CODES["not_ready"].status == 503


def test_which_statuses_are_retried():
    assert RETRYABLE_STATUSES == {408, 429, 500, 502, 503, 504}
    for status in range(100, 600):
        assert is_retryable_status(status) == (status in RETRYABLE_STATUSES)
    # Overloaded and not ready are worth another try; every 4xx but 408 and 429 is not.
    assert ERROR_CODES["overloaded"].retryable() and ERROR_CODES["queue_full"].retryable()
    assert ERROR_CODES["not_ready"].retryable() and ERROR_CODES["vlm_error"].retryable()
    final = ("invalid_request", "unknown_reward", "unauthorized", "body_too_large")
    assert not any(ERROR_CODES[c].retryable() for c in final)
    budget = ERROR_CODES["over_memory_budget"]  # 413 never fits, 429 is busy right now
    assert budget.retryable(429) and not budget.retryable(413)
    assert not any(c.retryable() for c in ERROR_CODES.values() if c.redis_only)


def test_api_errors_only_with_declared_codes_and_their_statuses():
    assert ApiError(429, "overloaded", "busy").retryable
    assert not ApiError(413, "over_memory_budget", "too big").retryable
    with pytest.raises(KeyError, match="undeclared error code 'made_up'"):
        ApiError(400, "made_up", "x")
    with pytest.raises(ValueError, match="'overloaded' is answered with status 429, not 503"):
        ApiError(503, "overloaded", "x")
    with pytest.raises(ValueError, match="Redis only"):
        ApiError(400, "invalid_job", "x")
    assert ApiError(418, "http_error", "any status").status == 418


@pytest.mark.parametrize(
    ("value", "seconds"), [("3", 3.0), ("0", 0.0), ("1.5", 1.5), ("-2", 0.0), (None, None), ("soon", None)]
)
def test_retry_after(value, seconds):
    assert parse_retry_after(value) == seconds


def _codes_in_source() -> list[tuple[str, int | None, str]]:
    """(code, status or None, where) for every error code written in the server's and shared code."""
    found = []
    files = [*ROOT.glob("reward_server/**/*.py"), *ROOT.glob("shared/**/*.py")]
    for path in files:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
            args = node.args
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            if name == "ApiError" and len(args) >= 2 and isinstance(args[1], ast.Constant):
                status = args[0].value if isinstance(args[0], ast.Constant) else None
                found.append((args[1].value, status, where))
            elif name in ("LimitError", "InputLimitError") and args and isinstance(args[0], ast.Constant):
                found.append((args[0].value, 413, where))
            elif name == "poison" and len(args) >= 3 and isinstance(args[2], ast.Constant):
                found.append((args[2].value, None, where))
        for node in ast.walk(tree):  # class attributes: error = "..." (shared/binary.py's errors)
            if isinstance(node, ast.ClassDef):
                attrs = {
                    t.id: s.value.value
                    for s in node.body
                    if isinstance(s, ast.Assign) and isinstance(s.value, ast.Constant)
                    for t in s.targets
                    if isinstance(t, ast.Name)
                }
                if isinstance(attrs.get("error"), str):
                    where = f"{path.relative_to(ROOT)}:{node.lineno}"
                    found.append((attrs["error"], attrs.get("status"), where))
    return found


def test_every_code_in_the_source_is_declared_with_its_status():
    found = _codes_in_source()
    assert len(found) >= 30, found  # the scan sees the code base, not nothing
    for code, status, where in found:
        assert code in ERROR_CODES, f"{where}: error code {code!r} is not in shared/errors.py"
        if status is not None:
            check_code(code, status)


def test_no_other_home_for_retryable_statuses():
    """No module keeps its own set of retryable statuses (there were three, all different)."""
    offenders = []
    paths = [p for package in ("reward_server", "trainer", "shared") for p in ROOT.glob(f"{package}/**/*.py")]
    for path in paths:
        if path == Path(errors.__file__).resolve():
            continue
        text = path.read_text()
        if "frozenset({408" in text or "{408, 429" in text or "status >= 500" in text:
            offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []
