#!/usr/bin/env bash
# The main job: set up .venv if needed, then train. With no arguments: the `digits-alignment`
# preset on CPU. The digits base model is pretrained here on first use (cached), the digits
# captioner (the VLM's stand-in) likewise, then DDPO-IS trains the base for prompt-image alignment
# with the reward server started as its own process on loopback and rewards over HTTP (the real
# architecture on one machine). Any arguments are passed to ddpo-train (see `ddpo-train --help`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup-venv.sh"
cd "$ROOT"
if [ "$#" -eq 0 ]; then
    # Build (or reuse) the judge first, so its progress shows here rather than in the server's log.
    ddpo-build-captioner
    set -- --preset digits-alignment --reward.transport http --reward.embed_server true
fi
exec ddpo-train "$@"
