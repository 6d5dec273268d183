#!/usr/bin/env bash
# Makes sure a Kafka-protocol broker listens on 127.0.0.1:9092. Real Apache Kafka and
# Redpanda cannot be installed from the reachable registries; tansu (Apache-2.0, Rust) can.
# It is built once into $ORDERS_CACHE/tansu (about 12 minutes on 2 cores) and reused; the
# tests also start private tansu instances from it (TANSU_BIN) for broker-outage scenarios.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

TANSU_VERSION="0.6.0"
TANSU_ROOT="$ORDERS_CACHE/tansu"
export TANSU_BIN="$TANSU_ROOT/bin/tansu"

if ! "$TANSU_BIN" --version 2>/dev/null | grep -q "$TANSU_VERSION"; then
  log "building tansu $TANSU_VERSION (once; cached in $TANSU_ROOT)"
  cargo install tansu --version "$TANSU_VERSION" --locked --no-default-features --features dynostore \
    --root "$TANSU_ROOT" --target-dir "$ORDERS_CACHE/tansu-build"
  rm -rf "$ORDERS_CACHE/tansu-build"
fi

if (exec 3<>/dev/tcp/127.0.0.1/9092) 2>/dev/null; then
  exit 0 # a broker is already listening
fi
log "starting tansu on 127.0.0.1:9092 (pid in $ORDERS_CACHE/tansu.pid)"
tansu_broker 127.0.0.1:9092 "$ORDERS_CACHE/tansu.log"
echo $! >"$ORDERS_CACHE/tansu.pid"
wait_for 30 "tansu on 127.0.0.1:9092" bash -c '(exec 3<>/dev/tcp/127.0.0.1/9092)'
