#!/usr/bin/env bash
# Create the `<svc>-db` Secrets the postgres component mounts (keys: password, database-url), with a random
# password per service. Idempotent: an existing Secret is left alone (PostgreSQL keeps the password it was
# initialised with, so rotating means ALTER ROLE first, then replacing the Secret).
#
#   k8s/components/postgres/create-secrets.sh            # create the missing Secrets in the cluster
#   DRY_RUN=1 k8s/components/postgres/create-secrets.sh  # print them as YAML instead (no cluster needed)
#
# The list of services comes from services.txt (one line per service of shop_mesh/mesh/topology.yaml). The
# namespace is created if missing (`kubectl apply -k` then adopts it and adds its labels).
# Passwords never appear on a command line: they go through files in a private temp dir.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
KUBECTL="${KUBECTL:-kubectl}"
tmp="$(umask 077 && mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

random_password() {
  if command -v openssl >/dev/null 2>&1; then openssl rand -hex 24
  else head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n'; fi
}

ensure_namespace() {
  [ -n "${DRY_RUN:-}" ] && return 0
  "$KUBECTL" get namespace "$1" >/dev/null 2>&1 || "$KUBECTL" create namespace "$1" >/dev/null
}

first=1
grep -v '^#' "$here/services.txt" | while read -r service secret namespace; do
  [ -n "$service" ] || continue
  ensure_namespace "$namespace"
  if [ -z "${DRY_RUN:-}" ] && "$KUBECTL" -n "$namespace" get secret "$secret" >/dev/null 2>&1; then
    echo "secret $namespace/$secret exists: kept" >&2
    continue
  fi
  (umask 077
   random_password | tr -d "\n" >"$tmp/password"
   printf 'postgresql+asyncpg://%s:%s@%s.%s.svc.cluster.local:5432/%s' \
     "$service" "$(cat "$tmp/password")" "$secret" "$namespace" "$service" >"$tmp/database-url")
  args=(-n "$namespace" create secret generic "$secret"
        --from-file=password="$tmp/password" --from-file=database-url="$tmp/database-url")
  if [ -n "${DRY_RUN:-}" ]; then
    [ "$first" = 1 ] || echo "---"
    first=0
    "$KUBECTL" "${args[@]}" --dry-run=client -o yaml
  else
    "$KUBECTL" "${args[@]}" >/dev/null
    "$KUBECTL" -n "$namespace" label secret "$secret" app.kubernetes.io/part-of=shop-mesh >/dev/null
    echo "secret $namespace/$secret created" >&2
  fi
  rm -f "$tmp/password" "$tmp/database-url"
done
