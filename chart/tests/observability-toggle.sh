#!/usr/bin/env bash
# Observability toggles and the CH-less profile (Catalyst BLUEPRINT-AUTHORING §11.2).
#   bash tests/observability-toggle.sh [CHART_DIR]     (needs the helm binary)
# 1. default render: no ServiceMonitor/PrometheusRule, no monitoring.coreos.com
# 2. opt-in with --api-versions monitoring.coreos.com/v1: a ServiceMonitor
# 3. opt-in WITHOUT the API: still none (the Capabilities half of the gate)
# 4. explicit off: none
# 5. CH-less leak check: no ClickHouse, Kafka or bitnami anything
# 6. grafanaDashboard toggle: default none, opt-in renders grafana_dashboard ConfigMap
set -euo pipefail

CHART_DIR="${1:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
RELEASE="smoke-pgmeter"
NS="smoke-pgmeter"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

fail() { echo "FAIL: $*" >&2; exit 1; }
render() { # render <outfile> [helm args...]
  local out="$1"; shift
  helm template "$RELEASE" "$CHART_DIR" --namespace "$NS" "$@" >"$out" \
    || fail "helm template $* failed"
}
has_kind() { grep -Eq "^kind: $2\$" "$1"; }

# 1. default
render "$WORK/default.yaml"
[ "$(wc -l <"$WORK/default.yaml")" -ge 5 ] || fail "default render is under 5 lines"
if grep -Eq '^kind: (ServiceMonitor|PrometheusRule)$' "$WORK/default.yaml"; then
  fail "default render contains a ServiceMonitor/PrometheusRule"
fi
if grep -q 'monitoring.coreos.com' "$WORK/default.yaml"; then
  fail "default render mentions monitoring.coreos.com"
fi
echo "ok 1 default render has no monitoring objects"

# 2. opt-in
render "$WORK/on.yaml" --api-versions monitoring.coreos.com/v1 --set serviceMonitor.enabled=true
has_kind "$WORK/on.yaml" ServiceMonitor || fail "opt-in render has no ServiceMonitor"
echo "ok 2 opt-in renders a ServiceMonitor"

# 3. opt-in, but the cluster lacks the CRD
render "$WORK/nocrd.yaml" --set serviceMonitor.enabled=true
if has_kind "$WORK/nocrd.yaml" ServiceMonitor; then
  fail "ServiceMonitor rendered without monitoring.coreos.com/v1"
fi
echo "ok 3 no ServiceMonitor without the monitoring API"

# 4. explicit off
render "$WORK/off.yaml" --api-versions monitoring.coreos.com/v1 --set serviceMonitor.enabled=false
if grep -Eq '^kind: (ServiceMonitor|PrometheusRule)$' "$WORK/off.yaml"; then
  fail "explicit-off render contains a ServiceMonitor/PrometheusRule"
fi
echo "ok 4 explicit off renders none"

# 5. CH-less leak check (default and opt-in renders)
for f in "$WORK/default.yaml" "$WORK/on.yaml"; do
  for pattern in 'clickhouse.altinity.com' 'kind: Kafka$' 'image: bitnami/kafka' \
                 'kind: ClickHouseInstallation' '[Cc]lick[Hh]ouse' '[Kk]afka' '[Bb]itnami'; do
    if grep -Eq "$pattern" "$f"; then
      fail "CH-less leak: '$pattern' in $(basename "$f")"
    fi
  done
done
grep -q 'catalyst.openova.io/backend: cnpg' "$WORK/default.yaml" || fail "backend label is not cnpg"
echo "ok 5 no ClickHouse, Kafka or bitnami in the renders"

# 6. Grafana dashboard toggle
if grep -q 'grafana_dashboard' "$WORK/default.yaml"; then
  fail "default render contains the Grafana dashboard"
fi
render "$WORK/dash.yaml" --set grafanaDashboard.enabled=true
grep -q 'grafana_dashboard: "1"' "$WORK/dash.yaml" || fail "dashboard ConfigMap missing"
echo "ok 6 grafana dashboard toggle"

echo "observability-toggle: all checks passed"
