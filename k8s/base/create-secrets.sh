#!/usr/bin/env bash
# Create the `<svc>-page-tokens` Secrets every Deployment of the base reads PAGE_TOKEN_SECRET from (key:
# page-token-secret): one random secret per service, shared by all of its replicas, so a page token one
# replica signed is accepted by the next. Idempotent: an existing Secret is left alone (replacing it
# invalidates the page tokens clients hold; they restart their listing from the first page).
#
#   k8s/base/create-secrets.sh            # create the missing Secrets in the cluster
#   DRY_RUN=1 k8s/base/create-secrets.sh  # print them as YAML instead (no cluster needed)
#
# The list of services comes from services.txt next to this script. The namespace is created if missing
# (`kubectl apply -k` then adopts it and adds its labels). Secrets never appear on a command line: they go
# through files in a private temp dir.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
KUBECTL="${KUBECTL:-kubectl}"
tmp="$(umask 077 && mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

random_secret() {
  if command -v openssl >/dev/null 2>&1; then openssl rand -hex 32
  else head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n'; fi
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
  (umask 077 && random_secret | tr -d "\n" >"$tmp/page-token-secret")
  args=(-n "$namespace" create secret generic "$secret" --from-file=page-token-secret="$tmp/page-token-secret")
  if [ -n "${DRY_RUN:-}" ]; then
    [ "$first" = 1 ] || echo "---"
    first=0
    "$KUBECTL" "${args[@]}" --dry-run=client -o yaml
  else
    "$KUBECTL" "${args[@]}" >/dev/null
    "$KUBECTL" -n "$namespace" label secret "$secret" app.kubernetes.io/part-of=shop-mesh app.kubernetes.io/name="$service" >/dev/null
    echo "secret $namespace/$secret created" >&2
  fi
  rm -f "$tmp/page-token-secret"
done
