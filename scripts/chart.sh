#!/usr/bin/env bash
# Verifies the Helm chart and the k8s/ dev manifests without a cluster:
#   helm lint --strict (default and ci/*-values.yaml); kubernetes-validate --strict against
#   Kubernetes 1.30 and the newest schemas it bundles; trivy (no HIGH/CRITICAL finding; the
#   dev manifests' skips are justified in k8s/.trivyignore); the committed rendering of the
#   defaults (helm/orders-service/rendered/default.yaml) must match, so reviews see manifest
#   changes (UPDATE_RENDERED=1 rewrites it); scripts/chart_check.py asserts what the
#   manifests promise and runs the real binary exactly as the chart runs it; promtool checks
#   the alert rules (files/alerts.yaml) and runs their unit tests (files/alerts.test.yaml).
# Needs the tools from tools.sh and the debug binary (smoke.sh builds it).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"
HELM="$KUBE_TOOLS/helm"
KUBECTL="$KUBE_TOOLS/kubectl"
VENV="$ORDERS_CACHE/venv"
CHART=helm/orders-service
out="$(mktemp -d)"
database=""
cleanup() {
  [ -n "$database" ] && psql "$TEST_DATABASE_URL" -qc "DROP DATABASE IF EXISTS \"$database\" WITH (FORCE)" >/dev/null
  rm -rf "$out"
}
trap cleanup EXIT

log "promtool check rules and test rules (the chart's alerts)"
"$PROMTOOL" check rules "$CHART/files/alerts.yaml"
(cd "$CHART/files" && "$PROMTOOL" test rules alerts.test.yaml)

log "helm lint --strict (default and $CHART/ci/*-values.yaml)"
"$HELM" lint --strict --quiet "$CHART"
for values in "$CHART"/ci/*-values.yaml; do "$HELM" lint --strict --quiet "$CHART" -f "$values"; done

mkdir -p "$out/chart" "$out/k8s"
render() { "$HELM" template orders-service "$CHART" --namespace orders "$@"; }
render >"$out/chart/default.yaml"
for name in hpa split-roles mesh minimal tracing; do render -f "$CHART/ci/$name-values.yaml" >"$out/chart/$name.yaml"; done
"$KUBECTL" kustomize k8s >"$out/k8s/dependencies.yaml"

log "kubernetes-validate --strict (1.30 and newest)"
for manifest in "$out"/chart/*.yaml "$out"/k8s/*.yaml; do
  for version in 1.30.0 1.37.0; do
    # CRD kinds (ServiceMonitor, PrometheusRule, Gateway API routes) have no bundled schema: warnings.
    "$VENV/bin/kubernetes-validate" --quiet --no-warn --strict -k "$version" "$manifest"
  done
done

log "trivy config: no HIGH or CRITICAL misconfiguration"
trivy() { # trivy DIR [FLAGS...]: quiet unless it finds something
  local dir="$1"; shift
  "$VENV/bin/trivy" config --quiet --skip-check-update --severity HIGH,CRITICAL --exit-code 1 "$@" "$dir" \
    >"$out/trivy.txt" 2>&1 || { cat "$out/trivy.txt"; die "trivy found HIGH/CRITICAL misconfigurations in $dir"; }
}
trivy "$out/chart"
trivy "$out/k8s" --ignorefile k8s/.trivyignore

log "the committed rendering of the default values is current"
if [ -n "${UPDATE_RENDERED:-}" ]; then
  cp "$out/chart/default.yaml" "$CHART/rendered/default.yaml"
fi
diff -u "$CHART/rendered/default.yaml" "$out/chart/default.yaml" \
  || die "helm template output changed: review it, then UPDATE_RENDERED=1 ./scripts/chart.sh"

log "chart and binary agree (the binary run with the chart's ports, probes, env and grace period)"
database="orders_test_chart_$(date +%s)_$$"
psql "$TEST_DATABASE_URL" -qc "CREATE DATABASE \"$database\""
url="$(printf '%s' "$TEST_DATABASE_URL" | sed -E "s#/[^/?]+(\?|$)#/$database\1#")"
mv "$out/chart/split-roles.yaml" "$out/chart/split.yaml"
"$VENV/bin/python" scripts/chart_check.py "$out/chart" "$CARGO_TARGET_DIR/debug/orders-service" "$url"
