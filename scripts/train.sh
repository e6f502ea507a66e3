#!/usr/bin/env bash
# The main job: set up .venv if needed, then train. With no arguments: the `tiny` preset on CPU.
# Any arguments are passed to ddpo-train (see `ddpo-train --help`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup-venv.sh"
cd "$ROOT"
if [ "$#" -eq 0 ]; then
    set -- --preset tiny
fi
exec ddpo-train "$@"
