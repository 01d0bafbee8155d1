#!/usr/bin/env bash
# Regenerates generated/ts/src (TypeScript, protobuf-es v2) from protos/; make protos runs it after
# gen_protos.sh. protoc builds one image of the contracts and what they import (with comments); `buf generate`
# runs the pinned local protoc-gen-es (buf.gen.yaml, node_modules from package-lock.json) on it. Offline.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
BUF="${BUF:-$(dirname "$PY")/buf}"
# buf.gen.yaml writes to $OUT_BASE/generated/ts/src; make check-generated points it at a temporary directory.
OUT_BASE="${OUT_BASE:-.}"
if [ ! -x node_modules/.bin/protoc-gen-es ]; then
  echo "gen_ts.sh: node_modules/.bin/protoc-gen-es is missing: run 'make node_modules/.installed' (npm ci)" >&2
  exit 1
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# google/rpc/error_details.proto (BadRequest, ErrorInfo: the details of every error the services return) from
# the googleapis-common-protos wheel, pinned in the dev dependencies. Only that file: the rest of the wheel's
# directory would shadow protoc's own well-known types.
site=$("$PY" -c 'import google.rpc, os; print(os.path.dirname(os.path.dirname(list(google.rpc.__path__)[0])))')
mkdir -p "$tmp/include/google/rpc"
cp "$site/google/rpc/error_details.proto" "$tmp/include/google/rpc/"

# buf/validate/validate.proto has no source we can reach: when the contracts import it, protoc reads its
# descriptor from the protovalidate wheel, the same input gen_protos.sh uses for Python.
deps=()
if grep -rqs 'import "buf/validate/' protos; then
  "$PY" scripts/validate_descriptor.py "$tmp/validate.binpb"
  deps=(--descriptor_set_in="$tmp/validate.binpb")
fi

mapfile -t PROTOS < <(cd protos && find . -name '*.proto' | sed 's|^\./||' | sort)
"$PY" -m grpc_tools.protoc -I protos -I "$tmp/include" "${deps[@]}" \
  --include_imports --include_source_info --descriptor_set_out="$tmp/image.binpb" \
  "${PROTOS[@]}" google/rpc/error_details.proto

# google/protobuf/* come with the @bufbuild/protobuf runtime (@bufbuild/protobuf/wkt); everything else in the
# image (shop/**, google/rpc/error_details, buf/validate when imported) is generated.
rm -rf "$OUT_BASE/generated/ts/src"
"$BUF" generate "$tmp/image.binpb" --template buf.gen.yaml --exclude-path google/protobuf -o "$OUT_BASE"
