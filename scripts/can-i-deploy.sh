#!/usr/bin/env bash
# Asks the Pact Broker whether this version of orders-service can go to an environment:
# whether every consumer version deployed there has a successful verification against it,
# and it against every provider version there. The contracts workflow runs the same check
# before its deploy job (.github/workflows/contracts.yml).
#
#   PACT_BROKER_BASE_URL=https://pact.example.com PACT_BROKER_TOKEN=... \
#     ./scripts/can-i-deploy.sh [environment (production)] [version (git HEAD)]
#
# Authentication: PACT_BROKER_TOKEN, or PACT_BROKER_USERNAME and PACT_BROKER_PASSWORD.
# While the verification of this version is still running (unknown results), it polls for
# up to a minute (CAN_I_DEPLOY_RETRIES times 10 s) before it answers. A broker that accepts
# and never answers would hang the CLI forever (measured), so the whole check is bounded by
# CAN_I_DEPLOY_TIMEOUT seconds (180) and fails closed: no answer is a "no".
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

if [ -z "${PACT_BROKER_BASE_URL:-}" ]; then
  die "PACT_BROKER_BASE_URL is not set. can-i-deploy asks a Pact Broker which verified versions
are deployed where, and no broker runs here. Set PACT_BROKER_BASE_URL (and PACT_BROKER_TOKEN,
or PACT_BROKER_USERNAME and PACT_BROKER_PASSWORD) to your team's broker and rerun.
Without a broker, ./scripts/test.sh verifies every pact in pacts/ against the running service."
fi
environment="${1:-production}"
version="${2:-$(git -C "$ROOT" rev-parse HEAD)}"
[ -x "$PACT_CLI" ] || "$ROOT/scripts/tools.sh"

limit="${CAN_I_DEPLOY_TIMEOUT:-180}"
status=0
timeout "$limit" "$PACT_CLI" broker can-i-deploy --pacticipant orders-service --version "$version" \
  --to-environment "$environment" --retry-while-unknown "${CAN_I_DEPLOY_RETRIES:-6}" --retry-interval 10 \
  || status=$?
[ "$status" -ne 124 ] || die "the Pact Broker at $PACT_BROKER_BASE_URL did not answer within ${limit}s: not deploying"
exit "$status"
