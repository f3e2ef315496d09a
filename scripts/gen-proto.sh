#!/usr/bin/env bash
# Generate the Python code checked in under gateway/ from proto/:
#   gateway/adminpb/     the admin API, proto/authz_gateway/admin/v1/admin.proto
#   gateway/envoy_api/   Envoy's ext_authz and ext_proc APIs and the files they import, copied
#                        from upstream into proto/ (proto/README.md says from where)
#   gateway/otlp_api/    OpenTelemetry's OTLP trace and metrics messages and collector services,
#                        copied from upstream into proto/opentelemetry/
#   bash scripts/gen-proto.sh            # regenerate gateway/adminpb/, envoy_api/ and otlp_api/
#   bash scripts/gen-proto.sh OUT_DIR    # generate OUT_DIR/adminpb/, envoy_api/, otlp_api/ instead
#                                        # (tests/test_session_admin.py compares the two)
# Needs grpcio-tools (in the `test` extra). PYTHON picks the interpreter (default: python3).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-gateway}"
python="${PYTHON:-python3}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# --- gateway/adminpb -------------------------------------------------------------------------
mkdir -p "$work/admin"
"$python" -m grpc_tools.protoc -I proto \
  --python_out="$work/admin" --pyi_out="$work/admin" --grpc_python_out="$work/admin" \
  proto/authz_gateway/admin/v1/admin.proto
mkdir -p "$out/adminpb"
generated="$work/admin/authz_gateway/admin/v1"
cp "$generated/admin_pb2.py" "$generated/admin_pb2.pyi" "$out/adminpb/"
# The gRPC module imports its messages by proto path; here they live in gateway.adminpb.
sed 's/^from authz_gateway\.admin\.v1 import admin_pb2/from gateway.adminpb import admin_pb2/' \
  "$generated/admin_pb2_grpc.py" > "$out/adminpb/admin_pb2_grpc.py"

# --- gateway/envoy_api and gateway/otlp_api --------------------------------------------------
# Each: every .proto under its upstream trees, and the gRPC modules of the files that define
# services. The Python modules import each other under their package (gateway.envoy_api.*, not
# as top-level envoy.*, which is xds-protos' name; gateway.otlp_api.*, not opentelemetry.proto.*,
# which opentelemetry-proto and xds-protos both install) and register their files in that
# package's POOL, a descriptor pool of its own: another copy of the same files can be imported
# in the same process. The package's __init__.py (POOL) is written by hand and kept.
#   generate PACKAGE "PROTO_DIRS" "MODULE_PREFIXES" "LICENCE_FILES"
# MODULE_PREFIXES: the generated imports to rewrite (google.protobuf, the well-known types, stays
# protobuf's own).
generate() {
  local package="$1" roots="$2" prefixes="$3" licences="$4"
  local protos=() file
  while IFS= read -r file; do protos+=("$file"); done < <(
    # shellcheck disable=SC2086  # the roots are words
    cd proto && find $roots -name '*.proto' | LC_ALL=C sort)
  mkdir -p "$work/$package"
  "$python" -m grpc_tools.protoc -I proto \
    --python_out="$work/$package" --grpc_python_out="$work/$package" "${protos[@]/#/proto/}"
  "$python" - "$work/$package" "$out/$package" "$package" "$prefixes" "$licences" "${protos[@]}" <<'EOF'
import re
import shutil
import sys
from pathlib import Path

work, out, package = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
prefixes, licences, protos = sys.argv[4].split(), sys.argv[5].split(), sys.argv[6:]
PREFIX = f"gateway.{package}"
IMPORT = re.compile(rf"^from ({'|'.join(re.escape(prefix) for prefix in prefixes)})([. ])", re.M)


def rewrite(text: str, name: str) -> str:
    text = IMPORT.sub(rf"from {PREFIX}.\1\2", text)
    if name.endswith("_pb2.py"):
        pool = "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile("
        assert text.count(pool) == 1, name
        text = text.replace(pool, f"DESCRIPTOR = _{package}.POOL.AddSerializedFile(")
        imports = "# @@protoc_insertion_point(imports)\n"
        assert text.count(imports) == 1, name
        text = text.replace(imports, imports + f"\nfrom gateway import {package} as _{package}\n")
        module = name[: -len(".py")].replace("/", ".")
        build = f"_builder.BuildTopDescriptorsAndMessages(DESCRIPTOR, '{module}', _globals)"
        assert text.count(build) == 1, name
        text = text.replace(build, build.replace(f"'{module}'", f"'{PREFIX}.{module}'"))
    return text


for existing in sorted(out.rglob("*"), reverse=True):  # stale generated files go; __init__.py stays
    if existing.is_file() and existing != out / "__init__.py":
        existing.unlink()
    elif existing.is_dir() and not any(existing.iterdir()):
        existing.rmdir()
for proto in protos:
    stem = proto[: -len(".proto")]
    names = [f"{stem}_pb2.py"]
    grpc_text = (work / f"{stem}_pb2_grpc.py").read_text()
    if re.search(r"^class \w+Servicer\b", grpc_text, re.M):  # only files that define a service
        names.append(f"{stem}_pb2_grpc.py")
    for name in names:
        target = out / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(rewrite((work / name).read_text(), name))
for directory in [out, *sorted(d for d in out.rglob("*") if d.is_dir())]:
    if not (directory / "__init__.py").exists():
        (directory / "__init__.py").write_text("")
licence_dir = out / "LICENSES"
licence_dir.mkdir(exist_ok=True)
for licence in licences:
    shutil.copyfile(Path("proto/LICENSES") / licence, licence_dir / licence)
shutil.copyfile("proto/README.md", licence_dir / "README.md")
EOF
}

generate envoy_api "envoy udpa xds validate google" "envoy udpa xds validate google.rpc" \
  "bufbuild-protoc-gen-validate.txt cncf-xds.txt envoyproxy-data-plane-api.txt googleapis.txt"
generate otlp_api "opentelemetry" "opentelemetry" "open-telemetry-opentelemetry-proto.txt"
