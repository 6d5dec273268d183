#!/usr/bin/env bash
# Proves scripts/can-i-deploy.sh fails closed without a real answer: with no broker
# configured it refuses with a message that says what to set, and a broker that accepts
# connections and never answers (a blackholed peer) is a "no" within CAN_I_DEPLOY_TIMEOUT,
# not a hang. The answering broker is exercised by .github/workflows/contracts.yml.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

out="$(env -u PACT_BROKER_BASE_URL "$ROOT/scripts/can-i-deploy.sh" 2>&1)" \
  && die "can-i-deploy passed without a broker"
grep -q "PACT_BROKER_BASE_URL is not set" <<<"$out" || die "unclear refusal without a broker: $out"

# A listener that accepts and never answers; it exits by itself after 30 s.
port_file="$(mktemp)"
python3 - "$port_file" <<'PY' &
import socket, sys, time
listener = socket.create_server(("127.0.0.1", 0))
open(sys.argv[1], "w").write(str(listener.getsockname()[1]))
listener.settimeout(0.5)
held, deadline = [], time.monotonic() + 30
while time.monotonic() < deadline:
    try:
        held.append(listener.accept()[0])
    except TimeoutError:
        pass
PY
blackhole=$!
trap 'kill "$blackhole" 2>/dev/null || true; rm -f "$port_file"' EXIT
wait_for 10 "the blackholed listener" test -s "$port_file"
started=$SECONDS
out="$(CAN_I_DEPLOY_TIMEOUT=5 PACT_BROKER_BASE_URL="http://127.0.0.1:$(cat "$port_file")" \
  "$ROOT/scripts/can-i-deploy.sh" 2>&1)" && die "can-i-deploy passed against a broker that never answers"
grep -q "did not answer within 5s" <<<"$out" || die "unclear failure against a blackholed broker: $out"
log "can-i-deploy fails closed: no broker refused, a blackholed broker a \"no\" after $((SECONDS - started))s"
