#!/usr/bin/env bash
# Builds the contracts into a Buf image (a FileDescriptorSet with imports and comments) at $1, for
# buf lint / breaking / build. buf cannot resolve buf/validate/validate.proto from source (it is on no
# registry we reach), so protoc compiles the image with that file's descriptor from the protovalidate
# wheel, the same way scripts/gen_protos.sh generates code.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
out=$(realpath -m "$1")
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" scripts/validate_descriptor.py "$tmp/validate.binpb"
mapfile -t PROTOS < <(cd protos && find . -name '*.proto' | sed 's|^\./||' | sort)
"$PY" -m grpc_tools.protoc -I protos --descriptor_set_in="$tmp/validate.binpb" \
  --include_imports --include_source_info --descriptor_set_out="$out" "${PROTOS[@]}"
