#!/usr/bin/env bash
# The OpenAPI document as a tested contract:
#   1. `redocly lint` (recommended rules): 0 errors;
#   2. schemathesis against the live service (PostgreSQL + Redis, its own database and key
#      prefix) from the served /openapi.json: every check, the examples, coverage, fuzzing and
#      stateful phases (following the document's links create → get / cancel), a bounded
#      number of examples per operation, and a hook giving each create a fresh
#      Idempotency-Key. Any failure fails the run, "schema-valid request rejected" included;
#   3. the same schemathesis arguments against tests/fixtures/planted_500.py must find its
#      planted 500, so a change that blinds the fuzz step shows up here.
#
# Environment: FUZZ_EXAMPLES (per operation, default 100), FUZZ_SEED (default 1; fixed so a
# failure reproduces, change it to explore), FUZZ_PORT_BASE (default 18180: REST, gRPC,
# admin, fixture on the next four ports).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"

VENV="$ORDERS_CACHE/venv"
REDOCLY="$ORDERS_CACHE/node/node_modules/.bin/redocly"
base="${FUZZ_PORT_BASE:-18180}"
http="127.0.0.1:$base" fixture_port=$((base + 3))
database="orders_test_fuzz_$$"
work="$(mktemp -d)"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then kill -TERM "$pid"; wait "$pid" 2>/dev/null || true; fi
  done
  psql "$TEST_DATABASE_URL" -qc "DROP DATABASE IF EXISTS $database WITH (FORCE)" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

log "redocly lint openapi.yaml"
REDOCLY_TELEMETRY=off REDOCLY_SUPPRESS_UPDATE_NOTICE=true "$REDOCLY" lint --format=summary openapi.yaml 2>&1 \
  | grep -v '[║╔╚]'

cat >"$work/fresh_keys.py" <<'EOF'
"""Gives every request that carries a well-formed Idempotency-Key a fresh one, so generated
creates are not replays of each other (malformed keys stay, for the negative cases)."""
import re
import uuid

import schemathesis

KEY = re.compile(r'^([!#-~]{1,255}|"[!#-~]{1,255}")$')


@schemathesis.hook
def before_call(ctx, case, **kwargs):
    if case.headers and KEY.match(case.headers.get("Idempotency-Key", "")):
        case.headers["Idempotency-Key"] = f"fuzz-{uuid.uuid4()}"
EOF

# schemathesis URL: the one set of arguments used on the service and on the fixture.
schemathesis() {
  (cd "$work" && PYTHONPATH="$work" SCHEMATHESIS_HOOKS=fresh_keys "$VENV/bin/schemathesis" run "$1" \
    --checks all --phases examples,coverage,fuzzing,stateful --continue-on-failure \
    --max-examples "${FUZZ_EXAMPLES:-100}" --seed "${FUZZ_SEED:-1}" --request-timeout 10 --wait-for-schema 30)
}

log "schemathesis against the live service (PostgreSQL, Redis)"
for port in "$base" $((base + 1)) $((base + 2)) "$fixture_port"; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then die "port $port is in use (set FUZZ_PORT_BASE)"; fi
done
psql "$TEST_DATABASE_URL" -qc "CREATE DATABASE $database" >/dev/null
cargo build --quiet --locked --bin orders-service
APP_DATABASE__URL="$(printf '%s' "$TEST_DATABASE_URL" | sed "s#/[^/]*\$#/$database#")" \
  APP_REDIS__URL="$TEST_REDIS_URL" APP_REDIS__KEY_PREFIX="orders-test-fuzz-$$:" \
  APP_HTTP__ADDR="$http" APP_GRPC__ADDR="127.0.0.1:$((base + 1))" APP_ADMIN__ADDR="127.0.0.1:$((base + 2))" \
  "$CARGO_TARGET_DIR/debug/orders-service" >"$work/service.log" 2>&1 &
pids+=("$!")
if ! (wait_for 60 "the service's /readyz" curl -fsS "http://$http/readyz"); then
  tail -n 50 "$work/service.log"
  die "the service did not become ready"
fi
if ! schemathesis "http://$http/openapi.json"; then
  tail -n 50 "$work/service.log"
  die "schemathesis found failures (reproduce: FUZZ_SEED=${FUZZ_SEED:-1} $0)"
fi
created="$(psql "$(printf '%s' "$TEST_DATABASE_URL" | sed "s#/[^/]*\$#/$database#")" -Atc 'SELECT count(*) FROM orders')"
[ "$created" -gt 0 ] || die "schemathesis created no order: the document does not describe a valid create"
echo "schemathesis created $created orders through the documented contract"

log "schemathesis finds the planted 500 of tests/fixtures/planted_500.py"
python3 tests/fixtures/planted_500.py "$fixture_port" &
pids+=("$!")
if schemathesis "http://127.0.0.1:$fixture_port/openapi.json" >"$work/planted.out" 2>&1; then
  cat "$work/planted.out"
  die "schemathesis passed against a server with a planted 500: the fuzz step does not bite"
fi
if ! grep -q 'Server error' "$work/planted.out" || ! grep -q '\[500\]' "$work/planted.out"; then
  cat "$work/planted.out"
  die "schemathesis failed on the fixture, but not on its planted 500"
fi
echo "the planted 500 was found"
