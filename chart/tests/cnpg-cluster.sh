#!/usr/bin/env bash
# CNPG Cluster / Pooler toggles and database wiring.
#   bash tests/cnpg-cluster.sh [CHART_DIR]     (needs the helm binary)
# 1. default, no CNPG API: no Cluster/Pooler; workloads read <release>-pg-app/uri
# 2. default WITH postgresql.cnpg.io/v1: a Cluster (pinned image, initdb), no Pooler,
#    and the migration hook moves to post-install
# 3. cluster.enabled=false: no Cluster even with the API
# 4. pooler on: a transaction-mode Pooler; only the api gets PGMETER_POSTGRES_QUERY_URL
#    and nothing sends PGMETER_POSTGRES_URL to the pooler
# 5. explicit DSN Secret: every role and the migration Job use it
set -euo pipefail

CHART_DIR="${1:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
RELEASE="smoke-pgmeter"
NS="smoke-pgmeter"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

fail() { echo "FAIL: $*" >&2; exit 1; }
render() {
  local out="$1"; shift
  helm template "$RELEASE" "$CHART_DIR" --namespace "$NS" "$@" >"$out" \
    || fail "helm template $* failed"
}
has_kind() { grep -Eq "^kind: $2\$" "$1"; }
count() { grep -Ec "$2" "$1" || true; }

# 1. default without the CNPG API
render "$WORK/default.yaml"
has_kind "$WORK/default.yaml" Cluster && fail "Cluster rendered without postgresql.cnpg.io/v1"
has_kind "$WORK/default.yaml" Pooler && fail "Pooler rendered by default"
grep -q "name: $RELEASE-pg-app" "$WORK/default.yaml" || fail "workloads do not read $RELEASE-pg-app"
grep -q 'helm.sh/hook: pre-install,pre-upgrade' "$WORK/default.yaml" || fail "migration hook is not pre-install"
echo "ok 1 default: no CNPG objects offline, DSN from $RELEASE-pg-app"

# 2. with the CNPG API
render "$WORK/cnpg.yaml" --api-versions postgresql.cnpg.io/v1
has_kind "$WORK/cnpg.yaml" Cluster || fail "no Cluster with postgresql.cnpg.io/v1"
has_kind "$WORK/cnpg.yaml" Pooler && fail "Pooler rendered without pooler.enabled"
grep -Eq 'imageName: "?ghcr.io/cloudnative-pg/postgresql:[0-9]+' "$WORK/cnpg.yaml" || fail "Cluster image is not pinned"
grep -q 'database: pgmeter' "$WORK/cnpg.yaml" || fail "no bootstrap.initdb.database"
grep -q 'owner: pgmeter' "$WORK/cnpg.yaml" || fail "no bootstrap.initdb.owner"
grep -q 'helm.sh/hook: post-install,pre-upgrade' "$WORK/cnpg.yaml" || fail "migration hook should be post-install when the release creates the Cluster"
echo "ok 2 Cluster rendered with the CNPG API"

# 3. cluster disabled
render "$WORK/nocluster.yaml" --api-versions postgresql.cnpg.io/v1 \
  --set postgres.cluster.enabled=false --set postgres.clusterName=shared-pg
has_kind "$WORK/nocluster.yaml" Cluster && fail "Cluster rendered with cluster.enabled=false"
grep -q 'name: shared-pg-app' "$WORK/nocluster.yaml" || fail "clusterName=shared-pg not used"
echo "ok 3 cluster.enabled=false uses an existing Cluster"

# 4. pooler
render "$WORK/pooler.yaml" --api-versions postgresql.cnpg.io/v1 --set postgres.pooler.enabled=true
has_kind "$WORK/pooler.yaml" Pooler || fail "no Pooler with pooler.enabled"
grep -q 'poolMode: transaction' "$WORK/pooler.yaml" || fail "Pooler is not in transaction mode"
[ "$(count "$WORK/pooler.yaml" 'name: PGMETER_POSTGRES_QUERY_URL')" = 1 ] || fail "PGMETER_POSTGRES_QUERY_URL must be set once (api only)"
# Every PGMETER_POSTGRES_URL (api, sink, refresher, migrate) reads the app Secret's direct uri.
[ "$(count "$WORK/pooler.yaml" 'name: PGMETER_POSTGRES_URL$')" -ge 4 ] || fail "missing PGMETER_POSTGRES_URL"
if grep -A4 'name: PGMETER_POSTGRES_URL$' "$WORK/pooler.yaml" | grep -q pooler; then
  fail "a direct DSN points at the pooler"
fi
echo "ok 4 Pooler for api queries only"

# 5. explicit DSN Secret
render "$WORK/dsn.yaml" --set postgres.dsnSecret.name=external-pg --set postgres.dsnSecret.key=dsn
[ "$(count "$WORK/dsn.yaml" 'name: external-pg$')" -ge 4 ] || fail "dsnSecret not used by every role and the Job"
grep -q 'key: dsn' "$WORK/dsn.yaml" || fail "dsnSecret.key not used"
echo "ok 5 explicit DSN Secret"

echo "cnpg-cluster: all checks passed"
