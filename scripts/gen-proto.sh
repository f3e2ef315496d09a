#!/usr/bin/env bash
# Generate the Python code of the admin API from proto/ (checked in under gateway/adminpb/).
#   bash scripts/gen-proto.sh            # regenerate gateway/adminpb/
#   bash scripts/gen-proto.sh OUT_DIR    # generate elsewhere (the test compares the two)
# Needs grpcio-tools (in the `test` extra). PYTHON picks the interpreter (default: python3).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-gateway/adminpb}"
python="${PYTHON:-python3}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$python" -m grpc_tools.protoc -I proto \
  --python_out="$work" --pyi_out="$work" --grpc_python_out="$work" \
  proto/authz_gateway/admin/v1/admin.proto
mkdir -p "$out"
generated="$work/authz_gateway/admin/v1"
cp "$generated/admin_pb2.py" "$generated/admin_pb2.pyi" "$out/"
# The gRPC module imports its messages by proto path; here they live in gateway.adminpb.
sed 's/^from authz_gateway\.admin\.v1 import admin_pb2/from gateway.adminpb import admin_pb2/' \
  "$generated/admin_pb2_grpc.py" > "$out/admin_pb2_grpc.py"
