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

# Reinstall only when what we install changed: the stamp is a hash of pyproject.toml + TORCH_SPEC.
STAMP="$VENV/.ddpo-stamp"
WANT="$( (cat "$ROOT/pyproject.toml"; echo "$TORCH_SPEC") | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
    echo "[setup] installing $TORCH_SPEC"
    "${PIP[@]}" install "$TORCH_SPEC" 2>&1 | grep -v "^WARNING: Location" || true
    "$VENV/bin/python" -c "import torch" || { echo "[setup] torch failed to install" >&2; exit 1; }
    echo "[setup] installing ddpo-stack[dev] (editable)"
    "${PIP[@]}" install -e "$ROOT[dev]" 2>&1 | grep -v "^WARNING: Location" || true
    "$VENV/bin/python" -c "import trainer, reward_server, shared, diffusers, peft" \
        || { echo "[setup] ddpo-stack failed to install" >&2; exit 1; }
    echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
