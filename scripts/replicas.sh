#!/usr/bin/env bash
# The chaos ledger, long form: three replicas behind nginx sharing a private PostgreSQL,
# Redis and broker, under create/cancel/payment load through CYCLES fault cycles (each about
# 90 s: kill -9 of a replica and its restart, the broker unreachable for 20 s, a PostgreSQL
# restart, Redis flushed and blackholed for 10 s), then the ledger checks of
# tests/it/chaos.rs. The test command runs the short form (one cycle) with every other test.
# Prints the ledger and writes it to docs/chaos-ledger.md, the evidence the README links to.
#   scripts/replicas.sh [CYCLES]      (default 3, about 5 minutes)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"
"$ROOT/scripts/services.sh"
"$ROOT/scripts/kafka.sh"
"$ROOT/scripts/tools.sh"
export CHAOS_CYCLES="${1:-3}" CHAOS_LEDGER="$ROOT/docs/chaos-ledger.md"
export TANSU_BIN="${TANSU_BIN:-$ORDERS_CACHE/tansu/bin/tansu}"
cargo nextest run --locked --no-capture -E 'test(chaos_ledger)'
printf '\nRecorded by scripts/replicas.sh %s at commit %s on %s (%s cores).\n' \
  "$CHAOS_CYCLES" "$(git describe --always --dirty)" "$(date -u +%Y-%m-%d)" "$(nproc)" >>"$CHAOS_LEDGER"
echo "ledger written to $CHAOS_LEDGER"
