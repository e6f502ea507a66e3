#!/usr/bin/env bash
# The main job: set up .venv if needed, then train. With no arguments: the `tiny` preset on CPU,
# with the reward server started as its own process on loopback and rewards over HTTP (the real
# architecture on one machine). Any arguments are passed to ddpo-train (see `ddpo-train --help`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup-venv.sh"
cd "$ROOT"
if [ "$#" -eq 0 ]; then
    set -- --preset tiny --reward.transport http --reward.embed_server true
fi
exec ddpo-train "$@"
