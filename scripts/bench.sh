#!/usr/bin/env bash
# Measures the write path and the outbox relay on this machine and prints a table:
#   1. commit throughput of the order + outbox transaction (pgbench, 64 clients), with and
#      without pg_notify inside the transaction (why wake-ups happen after commit);
#   2. the service (release build, PostgreSQL + Kafka): REST create throughput and latency
#      under wrk, and commit-to-publish latency from the relay's histogram; once more at the
#      default log level, where the (unexported) tracing spans are built, for their cost.
# Bounded: each phase runs BENCH_SECONDS (default 15) against 127.0.0.1 only, then stops.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"
SECONDS_PER_PHASE="${BENCH_SECONDS:-15}"
"$ROOT/scripts/services.sh"
"$ROOT/scripts/kafka.sh"
command -v wrk >/dev/null || { log "installing wrk"; apt_install wrk; }

DB="orders_bench"
psql "$TEST_DATABASE_URL" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" -c "CREATE DATABASE $DB"
DB_URL="$(printf '%s' "$TEST_DATABASE_URL" | sed -E "s#/[^/?]+(\?|$)#/$DB\1#")"
cargo build --quiet --release --bin orders-service
BIN="$CARGO_TARGET_DIR/release/orders-service"
APP_DATABASE__URL="$DB_URL" "$BIN" migrate >/dev/null

tps() { pgbench -n -c 64 -j 2 -T "$SECONDS_PER_PHASE" -f "$1" "$DB_URL" 2>/dev/null | awk '/^tps/ {print int($3)}'; }
log "pgbench: order + outbox transaction, 64 clients, ${SECONDS_PER_PHASE}s each"
plain="$(tps bench/order_outbox.sql)"
notify="$(tps bench/order_outbox_notify.sql)"
psql "$DB_URL" -qc "TRUNCATE orders, outbox"

pid=""
trap '[ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null; wait "$pid" 2>/dev/null || true' EXIT
# serve_and_load LOG_LEVEL: the service on PostgreSQL + Kafka under wrk for one phase;
# leaves wrk's report in $wrk_out and the final scrape in $metrics, then stops the service.
serve_and_load() {
  log "service (APP_LOG_LEVEL=$1): wrk POST /v1/orders, 32 connections, ${SECONDS_PER_PHASE}s"
  local topic
  topic="orders.events.bench-$(date +%s)-$1"
  psql "$DB_URL" -qc "TRUNCATE orders, outbox" # each phase starts from the same tables
  APP_DATABASE__URL="$DB_URL" APP_DATABASE__MAX_CONNECTIONS=32 APP_KAFKA__BROKERS=127.0.0.1:9092 \
    APP_KAFKA__TOPIC_REPLICATION=1 APP_EVENTS__TOPIC="$topic" APP_HTTP__ADDR=127.0.0.1:18080 APP_GRPC__ADDR=127.0.0.1:15051 \
    APP_ADMIN__ADDR=127.0.0.1:19090 APP_LOG_LEVEL="$1" "$BIN" >"$ORDERS_CACHE/bench-service-$1.log" 2>&1 &
  pid=$!
  wait_for 30 "the service" curl -fsS http://127.0.0.1:18080/readyz
  wrk_out="$(wrk -t2 -c32 -d"${SECONDS_PER_PHASE}s" --latency -s bench/create_order.lua http://127.0.0.1:18080)"
  wait_for 60 "the outbox to drain" bash -c "curl -fsS http://127.0.0.1:19090/metrics | grep -qx 'outbox_pending 0'"
  metrics="$(curl -fsS http://127.0.0.1:19090/metrics)"
  kill -TERM "$pid"
  wait "$pid" || true
  pid=""
}
# Tracing off (no OTLP endpoint, the default): with the default level the request, database
# and messaging spans exist as plain tracing spans; at warn they are filtered out entirely.
# The difference is what the spans cost when nothing exports them.
serve_and_load info
info_rps="$(printf '%s\n' "$wrk_out" | awk '/Requests\/sec/ {print int($2)}')"
info_p99="$(printf '%s\n' "$wrk_out" | awk '$1=="99%" {print $2}')"
serve_and_load warn
rps="$(printf '%s\n' "$wrk_out" | awk '/Requests\/sec/ {print int($2)}')"
p50="$(printf '%s\n' "$wrk_out" | awk '$1=="50%" {print $2}')"
p99="$(printf '%s\n' "$wrk_out" | awk '$1=="99%" {print $2}')"
non2xx="$(printf '%s\n' "$wrk_out" | awk '/Non-2xx/ {print $NF}')"
quantile() { # quantile Q from the cumulative histogram buckets of outbox_publish_latency_seconds
  printf '%s\n' "$metrics" | awk -v q="$1" '
    /^outbox_publish_latency_seconds_bucket/ { match($0, /le="[^"]+"/); le=substr($0, RSTART+4, RLENGTH-5); n++; les[n]=le; cum[n]=$2 }
    /^outbox_publish_latency_seconds_count/ { total=$2 }
    END { for (i=1;i<=n;i++) if (cum[i] >= q*total) { print "<= " les[i] " s"; exit } }'
}
published="$(printf '%s\n' "$metrics" | awk '$1=="outbox_published_total" {print $2}')"
mean="$(printf '%s\n' "$metrics" | awk '$1=="outbox_publish_latency_seconds_sum" {s=$2} $1=="outbox_publish_latency_seconds_count" {c=$2} END {if (c>0) printf "%.0f ms", 1000*s/c}')"

printf '\n%-58s %s\n' "measurement (this machine, $(nproc) cores)" "result"
printf '%-58s %s\n' "----------------------------------------------------------" "----------------"
printf '%-58s %s\n' "pgbench order+outbox commit, 64 clients" "$plain TPS"
printf '%-58s %s\n' "pgbench order+outbox commit with pg_notify in the tx" "$notify TPS"
printf '%-58s %s\n' "REST POST /v1/orders, 32 connections (service + Kafka)" "$rps req/s"
printf '%-58s %s\n' "REST create latency p50 / p99" "$p50 / $p99"
printf '%-58s %s\n' "same at APP_LOG_LEVEL=info (spans built, none exported)" "$info_rps req/s, p99 $info_p99"
printf '%-58s %s\n' "REST non-2xx responses" "${non2xx:-0}"
# A ROLLBACK queued behind a COMMIT that a cancelled request had already sent (wrk closing
# its connections mid-request): must stay 0 (see the COMMIT shield in store/mod.rs).
printf '%-58s %s\n' "\"no transaction in progress\" notices" "$(cat "$ORDERS_CACHE"/bench-service-*.log | grep -c 'no transaction in progress' || true)"
printf '%-58s %s\n' "events published during the run" "$published"
printf '%-58s %s\n' "commit -> broker ack latency mean" "$mean"
printf '%-58s %s\n' "commit -> broker ack latency p50" "$(quantile 0.5)"
printf '%-58s %s\n' "commit -> broker ack latency p99" "$(quantile 0.99)"
