# Sourced by k8s/base/create-secrets.sh and k8s/components/postgres/create-secrets.sh: one Secret per line
# of a services.txt (service, secret, namespace), created only where missing (an existing Secret is left
# alone), with DRY_RUN=1 printed as YAML instead (no cluster needed). Values never appear on a command
# line: the caller's `secret_files SERVICE SECRET NAMESPACE DIR` writes them into DIR (a private temp dir)
# and prints one `--from-file=KEY=PATH` argument per line. The namespace is created if missing
# (`kubectl apply -k` then adopts it and adds its labels).
KUBECTL="${KUBECTL:-kubectl}"

random_hex() {  # $1 random bytes, hex-encoded
  if command -v openssl >/dev/null 2>&1; then openssl rand -hex "$1"
  else head -c "$1" /dev/urandom | od -An -tx1 | tr -d ' \n'; fi
}

create_secrets() {  # $1: the services.txt to read
  local first=1
  tmp="$(umask 077 && mktemp -d)"  # global: the EXIT trap runs after this function has returned
  trap 'rm -rf "$tmp"' EXIT
  grep -v '^#' "$1" | while read -r service secret namespace; do
    [ -n "$service" ] || continue
    if [ -z "${DRY_RUN:-}" ]; then
      "$KUBECTL" get namespace "$namespace" >/dev/null 2>&1 || "$KUBECTL" create namespace "$namespace" >/dev/null
      if "$KUBECTL" -n "$namespace" get secret "$secret" >/dev/null 2>&1; then
        echo "secret $namespace/$secret exists: kept" >&2
        continue
      fi
    fi
    mapfile -t files < <(umask 077 && secret_files "$service" "$secret" "$namespace" "$tmp")
    args=(-n "$namespace" create secret generic "$secret" "${files[@]}")
    if [ -n "${DRY_RUN:-}" ]; then
      [ "$first" = 1 ] || echo "---"
      first=0
      "$KUBECTL" "${args[@]}" --dry-run=client -o yaml
    else
      "$KUBECTL" "${args[@]}" >/dev/null
      "$KUBECTL" -n "$namespace" label secret "$secret" \
        app.kubernetes.io/part-of=shop-mesh app.kubernetes.io/name="$service" >/dev/null
      echo "secret $namespace/$secret created" >&2
    fi
    rm -f "$tmp"/*
  done
}
