#!/usr/bin/env bash
# Create the `<svc>-db` Secrets the postgres component mounts (keys: password, database-url), with a random
# password per service. Idempotent: an existing Secret is left alone (PostgreSQL keeps the password it was
# initialised with, so rotating means ALTER ROLE first, then replacing the Secret).
#
#   k8s/components/postgres/create-secrets.sh            # create the missing Secrets in the cluster
#   DRY_RUN=1 k8s/components/postgres/create-secrets.sh  # print them as YAML instead (no cluster needed)
#
# The list of services comes from services.txt (one line per service of shop_mesh/mesh/topology.yaml); the
# loop is k8s/secrets-lib.sh's.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=../../secrets-lib.sh
. "$here/../../secrets-lib.sh"

secret_files() {  # service secret namespace dir
  random_hex 24 | tr -d "\n" >"$4/password"
  printf 'postgresql+psycopg2://%s:%s@%s.%s.svc.cluster.local:5432/%s' \
    "$1" "$(cat "$4/password")" "$2" "$3" "$1" >"$4/database-url"
  echo "--from-file=password=$4/password"
  echo "--from-file=database-url=$4/database-url"
}

create_secrets "$here/services.txt"
