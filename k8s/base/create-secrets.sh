#!/usr/bin/env bash
# Create the `<svc>-page-tokens` Secrets every Deployment of the base reads PAGE_TOKEN_SECRET from (key:
# page-token-secret): one random secret per service, shared by all of its replicas, so a page token one
# replica signed is accepted by the next. Idempotent: an existing Secret is left alone (replacing it
# invalidates the page tokens clients hold; they restart their listing from the first page).
#
#   k8s/base/create-secrets.sh            # create the missing Secrets in the cluster
#   DRY_RUN=1 k8s/base/create-secrets.sh  # print them as YAML instead (no cluster needed)
#
# The list of services comes from services.txt next to this script; the loop is k8s/secrets-lib.sh's.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=../secrets-lib.sh
. "$here/../secrets-lib.sh"

secret_files() {  # service secret namespace dir
  random_hex 32 | tr -d "\n" >"$4/page-token-secret"
  echo "--from-file=page-token-secret=$4/page-token-secret"
}

create_secrets "$here/services.txt"
