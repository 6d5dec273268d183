#!/usr/bin/env bash
# The whole Kubernetes flow on a local kind cluster (needs Docker, kind, kubectl, helm):
#   create the cluster, build and load the image, apply the dev dependencies, install the
#   chart and wait for it, run `helm test`, and make one call through a port-forward.
# Idempotent: re-running reuses the cluster and upgrades the release. CI runs exactly this.
#
#   ./scripts/kind-up.sh            # KIND_CLUSTER=orders, NAMESPACE=orders
#   kind delete cluster --name orders
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"
CLUSTER="${KIND_CLUSTER:-orders}"
NAMESPACE="${NAMESPACE:-orders}"
RELEASE="${RELEASE:-orders-service}"
IMAGE="orders-service:dev"
for tool in docker kind kubectl helm; do
  command -v "$tool" >/dev/null || die "$tool is required (this flow cannot run without a Docker engine)"
done

if ! kind get clusters | grep -qx "$CLUSTER"; then
  log "creating kind cluster $CLUSTER"
  kind create cluster --name "$CLUSTER" --config k8s/kind-config.yaml --wait 120s
fi
kubectl config use-context "kind-$CLUSTER" >/dev/null

log "building $IMAGE and loading it into the nodes"
docker build --build-arg GIT_COMMIT="$(git -C "$ROOT" rev-parse --short=12 HEAD)" -t "$IMAGE" .
kind load docker-image "$IMAGE" --name "$CLUSTER"

log "dev dependencies (PostgreSQL, Redis, Kafka) in namespace $NAMESPACE"
kubectl apply -k k8s/
kubectl -n "$NAMESPACE" rollout status statefulset/postgres --timeout=180s
kubectl -n "$NAMESPACE" rollout status deployment/redis --timeout=120s
kubectl -n "$NAMESPACE" rollout status statefulset/kafka --timeout=300s

log "helm upgrade --install $RELEASE (migrations run as a hook first)"
helm upgrade --install "$RELEASE" helm/orders-service --namespace "$NAMESPACE" \
  -f k8s/values-kind.yaml --wait --timeout 5m

log "helm test"
helm test "$RELEASE" --namespace "$NAMESPACE" --logs --timeout 3m

log "smoke call through a port-forward"
port_forward_pid=""
trap '[ -n "$port_forward_pid" ] && kill "$port_forward_pid" 2>/dev/null || true' EXIT
kubectl -n "$NAMESPACE" port-forward "svc/$RELEASE" 18080:8080 >/dev/null 2>&1 &
port_forward_pid=$!
wait_for 30 "the port-forward" curl -fsS http://127.0.0.1:18080/readyz
curl -fsS -X POST http://127.0.0.1:18080/v1/orders -H 'content-type: application/json' \
  -H "idempotency-key: kind-up-$(date +%s)" \
  -d '{"customer_id":"kind","currency":"EUR","items":[{"sku":"K-1","quantity":1,"unit_price_minor":100}]}'
echo
log "orders-service runs on kind cluster $CLUSTER (namespace $NAMESPACE)"
