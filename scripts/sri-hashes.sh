#!/usr/bin/env bash
# Recompute the Subresource Integrity hashes of the /docs and /redoc assets (SWAGGER_UI_JS_SRI,
# SWAGGER_UI_CSS_SRI, REDOC_JS_SRI in reward_server/app.py) from the published npm tarballs of the
# versions pinned there (jsDelivr's /npm/ serves those files unchanged), and compare. Run it after
# bumping SWAGGER_UI_VERSION or REDOC_VERSION, and paste what it prints. Needs npm, openssl and the
# npm registry; downloads into a temporary folder, removed at exit. Exit 1 if a constant differs.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
APP="$ROOT/reward_server/app.py"
version() { sed -n "s/^$1 = \"\(.*\)\"$/\1/p" "$APP"; }
SWAGGER="$(version SWAGGER_UI_VERSION)"
REDOC="$(version REDOC_VERSION)"
[ -n "$SWAGGER" ] && [ -n "$REDOC" ] || { echo "versions not found in $APP" >&2; exit 2; }

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
cd "$TMP"
for spec in "swagger-ui-dist@$SWAGGER" "redoc@$REDOC"; do
    tarball="$(npm pack --silent "$spec")"  # npm verifies it against the registry's dist.integrity
    expected="$(npm view "$spec" dist.integrity)"
    actual="sha512-$(openssl dgst -sha512 -binary "$tarball" | openssl base64 -A)"
    [ "$expected" = "$actual" ] || { echo "$spec: tarball $actual != registry $expected" >&2; exit 2; }
    mkdir -p "${spec%@*}" && tar -xzf "$tarball" -C "${spec%@*}"
done

status=0
for pair in SWAGGER_UI_JS_SRI:swagger-ui-dist/package/swagger-ui-bundle.js \
    SWAGGER_UI_CSS_SRI:swagger-ui-dist/package/swagger-ui.css \
    REDOC_JS_SRI:redoc/package/bundles/redoc.standalone.js; do
    name="${pair%%:*}"
    hash="sha384-$(openssl dgst -sha384 -binary "${pair#*:}" | openssl base64 -A)"
    echo "$name = \"$hash\""
    if [ "$(version "$name")" != "$hash" ]; then
        echo "  ^ differs from reward_server/app.py ($(version "$name"))" >&2
        status=1
    fi
done
exit "$status"
