#!/usr/bin/env bash
# The whole test suite: set up .venv if needed, make a redis-server binary available, lint, pytest.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -m "not slow"`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup-venv.sh"
cd "$ROOT"
if [ -f "$ROOT/scripts/ensure-test-services.sh" ]; then
    source "$ROOT/scripts/ensure-test-services.sh"
fi
# In CI (CI=true) no test may skip for a missing tool (tests/conftest.py makes such a skip a failure),
# and the real-vLLM integration test must run: a failed vLLM venv install fails it, not skips it.
if [ "${CI:-}" = "true" ]; then
    export DDPO_REQUIRE_VLLM=1
fi
echo "[test] ruff"
ruff check .
echo "[test] pytest"
exec python -m pytest "$@"
