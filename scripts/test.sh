#!/usr/bin/env bash
# The one test command (README, CI and .ci/run all call this): installs and starts what is
# missing, then runs every check. Fails on the first failing check.
#
#   ./scripts/test.sh
#
# Environment: TEST_KAFKA_BROKERS (default 127.0.0.1:9092), ORDERS_CACHE (tool and build cache, default ~/.cache/orders-service),
# CARGO_TARGET_DIR (default $ORDERS_CACHE/target), TEST_DATABASE_URL (a PostgreSQL server
# where tests may create databases).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"
started=$SECONDS

log "services"
"$ROOT/scripts/services.sh"
"$ROOT/scripts/kafka.sh"
export TANSU_BIN="$ORDERS_CACHE/tansu/bin/tansu"
export TEST_KAFKA_BROKERS="${TEST_KAFKA_BROKERS:-127.0.0.1:9092}"
export TEST_REDIS_URL="${TEST_REDIS_URL:-redis://127.0.0.1:6379}"
log "tools"
"$ROOT/scripts/tools.sh"

log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy"
cargo clippy --all-targets --locked -- -D warnings

log "cargo deny check licenses bans sources (advisories: CI only, see deny.toml)"
"$CARGO_DENY" --log-level error check licenses bans sources

log "buf lint, format, breaking against main (on other branches), and proof that breaking bites"
"$ROOT/scripts/proto-check.sh"

log "shellcheck"
shellcheck -x scripts/*.sh .ci/run

log "openapi.yaml is a valid OpenAPI 3.1 document; the CI workflows lint clean"
"$ORDERS_CACHE/venv/bin/openapi-spec-validator" openapi.yaml
"$ORDERS_CACHE/venv/bin/actionlint" .github/workflows/*.yml

log "can-i-deploy fails closed without a broker's answer"
"$ROOT/scripts/can-i-deploy-check.sh"

log "dropping test databases left by earlier runs"
psql "$TEST_DATABASE_URL" -Atqc "SELECT datname FROM pg_database WHERE datname LIKE 'orders\_test\_%'" |
  while read -r db; do psql "$TEST_DATABASE_URL" -qc "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)"; done

log "smoke test of the first command: cargo run with no configuration"
"$ROOT/scripts/smoke.sh"

log "OpenAPI contract: redocly lint, schemathesis against the live service, the planted 500"
"$ROOT/scripts/api-fuzz.sh"

log "Helm chart and Kubernetes manifests (lint, schemas, policy, rendering, chart vs binary)"
"$ROOT/scripts/chart.sh"

log "benchmark smoke: scripts/bench.sh with every orders-loadgen mode for 2 s (debug build; figures meaningless)"
BENCH_SMOKE=1 "$ROOT/scripts/bench.sh"

log "tests (unit; integration against PostgreSQL, SQLite, Redis and Kafka; pact consumer tests and provider verification)"
cargo nextest run --locked --no-fail-fast

log "all checks passed in $((SECONDS - started))s"
