#!/usr/bin/env bash
# Proves the first README command: `cargo run` with no APP_* configuration starts the
# service on its embedded defaults (SQLite, 127.0.0.1:8080/50051/9090), answers /healthz and
# /readyz, round-trips an order, serves a client generated from openapi.yaml, and exits 0
# on SIGTERM. Runs from a temporary directory so
# the SQLite file lands there; stops the service by its recorded PID.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

for port in 8080 50051 9090; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    die "port $port is already in use; the defaults need it free"
  fi
done

work="$(mktemp -d)"
pid=""
cleanup() {
  local status=$?
  # A failed check shows what the service said: the cause is usually in its log.
  if [ "$status" -ne 0 ] && [ -f "$work/service.log" ]; then tail -n 40 "$work/service.log" >&2; fi
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then kill -TERM "$pid"; wait "$pid" || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

cargo build --quiet --manifest-path "$ROOT/Cargo.toml" --bin orders-service
while IFS= read -r variable; do unset "$variable"; done < <(env | grep -o '^APP_[A-Z_]*' || true)
(cd "$work" && exec cargo run --quiet --manifest-path "$ROOT/Cargo.toml") >"$work/service.log" 2>&1 &
pid=$!
echo "$pid" >"$work/service.pid"

wait_for 60 "/healthz on the default port" curl -fsS http://127.0.0.1:8080/healthz
# Read whole bodies before grep -q: it exits at the first match, and with pipefail the
# curl still writing would fail the check.
ready="$(curl -fsS http://127.0.0.1:8080/readyz)"
grep -q '"status":"ready"' <<<"$ready" || die "/readyz is not ready: $ready"
created="$(curl -fsS -X POST http://127.0.0.1:8080/v1/orders -H 'content-type: application/json' -H 'idempotency-key: smoke-1' \
  -d '{"customer_id":"smoke","currency":"EUR","items":[{"sku":"SMOKE-1","quantity":2,"unit_price_minor":500}]}')"
id="$(printf '%s' "$created" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')"
fetched="$(curl -fsS "http://127.0.0.1:8080/v1/orders/$id")"
printf '%s' "$fetched" | python3 -c 'import json,sys; o=json.load(sys.stdin); assert o["total_minor"]==1000 and o["status"]=="PENDING", o'
metrics="$(curl -fsS http://127.0.0.1:9090/metrics)"
grep -q '^http_requests_total' <<<"$metrics" || die "/metrics has no request counter"
[ -f "$work/data/orders.db" ] || die "the SQLite file was not created under ./data"

# REST clients are generated from openapi.yaml: generate one and use it against this server.
PATH="$ORDERS_CACHE/venv/bin:$PATH" openapi-python-client generate --path "$ROOT/openapi.yaml" --meta none \
  --output-path "$work/orders_client" >/dev/null
PYTHONPATH="$work" "$ORDERS_CACHE/venv/bin/python" "$ROOT/scripts/client_check.py" http://127.0.0.1:8080

kill -TERM "$pid"
status=0; wait "$pid" || status=$?
pid=""
[ "$status" -eq 0 ] || { cat "$work/service.log"; die "cargo run exited $status after SIGTERM"; }
echo "smoke: cargo run with no configuration serves REST on its defaults and exits 0 on SIGTERM"
