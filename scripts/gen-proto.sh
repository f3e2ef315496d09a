#!/usr/bin/env bash
# Generate the Python code checked in under gateway/ from proto/:
#   gateway/adminpb/     the admin API, proto/authz_gateway/admin/v1/admin.proto
#   gateway/envoy_api/   Envoy's ext_authz and ext_proc APIs and the files they import, copied
#                        from upstream into proto/ (proto/README.md says from where)
#   bash scripts/gen-proto.sh            # regenerate gateway/adminpb/ and gateway/envoy_api/
#   bash scripts/gen-proto.sh OUT_DIR    # generate OUT_DIR/adminpb/ and OUT_DIR/envoy_api/ instead
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

# --- gateway/envoy_api -----------------------------------------------------------------------
# Every .proto under these upstream trees; the gRPC modules of the files that define services.
# The Python modules import each other under gateway.envoy_api (not as top-level envoy.*, which
# is xds-protos' name) and register their files in gateway.envoy_api.POOL, a descriptor pool of
# their own: another copy of the same files (xds-protos) can be imported in the same process.
# gateway/envoy_api/__init__.py (POOL) is written by hand and kept.
mkdir -p "$work/envoy"
protos=()
while IFS= read -r file; do protos+=("$file"); done < <(
  cd proto && find envoy udpa xds validate google -name '*.proto' | LC_ALL=C sort)
"$python" -m grpc_tools.protoc -I proto \
  --python_out="$work/envoy" --grpc_python_out="$work/envoy" "${protos[@]/#/proto/}"
"$python" - "$work/envoy" "$out/envoy_api" "${protos[@]}" <<'EOF'
import re
import shutil
import sys
from pathlib import Path

work, out, protos = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
PREFIX = "gateway.envoy_api"
IMPORT = re.compile(r"^from (envoy|udpa|xds|validate|google\.rpc)([. ])", re.M)


def rewrite(text: str, name: str) -> str:
    text = IMPORT.sub(rf"from {PREFIX}.\1\2", text)
    if name.endswith("_pb2.py"):
        pool = "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile("
        assert text.count(pool) == 1, name
        text = text.replace(pool, "DESCRIPTOR = _envoy_api.POOL.AddSerializedFile(")
        imports = "# @@protoc_insertion_point(imports)\n"
        assert text.count(imports) == 1, name
        text = text.replace(imports, imports + "\nfrom gateway import envoy_api as _envoy_api\n")
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
licenses = out / "LICENSES"
licenses.mkdir(exist_ok=True)
for license_file in sorted(Path("proto/LICENSES").iterdir()):
    shutil.copyfile(license_file, licenses / license_file.name)
shutil.copyfile("proto/README.md", licenses / "README.md")
EOF
