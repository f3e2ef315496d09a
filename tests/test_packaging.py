"""A plain install works: a wheel built from this tree, pip-installed with its dependencies
into a fresh venv, serves Checks and exports their spans over OTLP, whatever the install order.

Envoy's API comes from the wheel itself (gateway/envoy_api), and so do the OTLP messages the
gateway exports with (gateway/otlp_api): neither xds-protos nor opentelemetry-proto is a
dependency. xds-protos ships an old copy of opentelemetry/proto/**, and whichever of it and
opentelemetry-proto pip installs last owns those files (grpc/grpc#42926). Here:

1. xds-protos is installed into the venv first, as a user might have it, then the wheel: the
   gateway's Envoy API and xds-protos' live side by side in one process (the client imports both).
2. Then opentelemetry-proto, as another package would bring it, and after it
   `pip install --force-reinstall --no-deps xds-protos`: opentelemetry.proto is now broken
   (InstrumentationScope cannot be imported; checked). The gateway still serves and exports its
   spans, over OTLP/gRPC and OTLP/HTTP, with no repair step.

Needs the package index (or pip's cache): the venv gets every dependency from it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import yaml

from tests.support.issuer import TestIssuer
from tests.support.otlp import OtlpReceiver
from tests.support.processes import REPO, ManagedProcess, free_port, health_status, wait_until

SPAN_NAME = "envoy.service.auth.v3.Authorization/Check"

# Run with the fresh venv's python: a Check as Envoy sends it, over gRPC, with a message class
# of the gateway's package; xds-protos' own envoy.* modules imported in the same process,
# before or after (argv[3]), and the answer read back with both.
CLIENT = """
import json, sys
import grpc

address, token, order = sys.argv[1:4]
if order == "xds-protos-first":
    from envoy.service.auth.v3 import external_auth_pb2 as xds_auth
    from gateway.envoy_api.envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
else:
    from gateway.envoy_api.envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
    from envoy.service.auth.v3 import external_auth_pb2 as xds_auth
from gateway.envoy_api.envoy.service.ext_proc.v3 import external_processor_pb2_grpc
import gateway

request = external_auth_pb2.CheckRequest()
http = request.attributes.request.http
http.id, http.method, http.path, http.host, http.scheme = "r-1", "POST", "/mcp", "mcp.example.test", "http"
http.headers.update({":method": "POST", ":path": "/mcp", ":authority": "mcp.example.test",
                     "authorization": "Bearer " + token})
with grpc.insecure_channel(address) as channel:
    response = external_auth_pb2_grpc.AuthorizationStub(channel).Check(request, timeout=10)
again = xds_auth.CheckResponse.FromString(response.SerializeToString())
print(json.dumps({
    "gateway": gateway.__file__,
    "allowed": response.HasField("ok_response"),
    "grpc_code": response.status.code,
    "xds_protos_reads": again.HasField("ok_response") and again.status.code == response.status.code,
}))
"""


def run(argv: list[str], env: dict[str, str], cwd: Path, timeout: float = 180) -> str:
    result = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{argv} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def build_wheel(tmp_path: Path, env: dict[str, str]) -> Path:
    # From a copy of what goes into the wheel: built in place, setuptools would write build/
    # and *.egg-info into the checkout (and pack whatever stale files build/ holds).
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    shutil.copytree(REPO / "gateway", source / "gateway", ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path / "dist"
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(source)]
    run(pip_wheel, env, tmp_path)
    (wheel,) = dist.glob("authz_gateway-*.whl")
    return wheel


# Run with the fresh venv's python: whether opentelemetry.proto is broken as xds-protos leaves it.
BROKEN_OTEL_PROTO = """
import json
try:
    from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope
except ImportError as exc:
    print(json.dumps({"broken": True, "error": str(exc)}))
else:
    print(json.dumps({"broken": False, "error": ""}))
"""


def serve_and_export(
    venv: Path, tmp_path: Path, issuer: TestIssuer, env: dict[str, str], protocol: str, service: str
) -> None:
    """`authz-gateway serve` from the venv, exporting to a real OTLP receiver over `protocol`;
    Checks sent with the gateway's message classes and xds-protos' imported in the same client;
    the Check span, with its authz.* attributes, must arrive."""
    python = str(venv / "bin" / "python")
    receiver = OtlpReceiver()
    port = free_port()
    jwks = issuer.write_jwks(tmp_path / "jwks.json")
    config = tmp_path / f"gateway-{service}.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "listen": f"127.0.0.1:{port}",
                "store": "memory://",
                "auth": {"issuers": [issuer.issuer_config(jwks_file=jwks)]},
            }
        )
    )
    served = ManagedProcess(
        service,
        [str(venv / "bin" / "authz-gateway"), "serve", "--config", str(config)],
        tmp_path,
        {**receiver.exporter_env(protocol), "OTEL_SERVICE_NAME": service, "PYTHONUNBUFFERED": "1"},
    )
    try:
        address = f"127.0.0.1:{port}"
        wait_until(
            lambda: health_status(address) == "SERVING" or not served.alive(), timeout=30, what="SERVING"
        )
        assert served.alive(), served.log_text()
        client = tmp_path / "client.py"
        client.write_text(CLIENT)
        for order in ("xds-protos-first", "gateway-first"):
            argv = [python, str(client), address, issuer.token("alice"), order]
            answer = json.loads(run(argv, env, tmp_path))
            assert answer["gateway"].startswith(str(venv)), answer  # the installed wheel, not this checkout
            assert answer["allowed"] and answer["grpc_code"] == 0 and answer["xds_protos_reads"], answer
        span = receiver.wait_for_span(lambda s: True, timeout=20, service=service, name=SPAN_NAME)
        assert span.attributes["authz.decision"] == "allow", span
        assert span.attributes["authz.reason"] == "allowed", span
        assert "authz.session.new" in span.attributes, span
    finally:
        assert served.stop() == 0, served.log_text()
        receiver.stop()
    log = served.log_text()
    assert f"traces -> OTLP {protocol}" in log, log
    assert "Traceback" not in log and "not exported" not in log and "fast path off" not in log, log


def test_a_wheel_in_a_fresh_venv_serves_and_exports_spans(tmp_path: Path, issuer: TestIssuer) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    wheel = build_wheel(tmp_path, env)
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = next(archive.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
    assert "gateway/envoy_api/envoy/service/auth/v3/external_auth_pb2_grpc.py" in names
    assert "gateway/envoy_api/envoy/service/ext_proc/v3/external_processor_pb2.py" in names
    assert "gateway/envoy_api/LICENSES/envoyproxy-data-plane-api.txt" in names
    assert "gateway/otlp_api/opentelemetry/proto/collector/trace/v1/trace_service_pb2.py" in names
    assert "gateway/otlp_api/LICENSES/open-telemetry-opentelemetry-proto.txt" in names
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    runtime = [line for line in requires if "extra ==" not in line]
    assert runtime and not [line for line in runtime if "xds" in line.lower()], requires
    assert not [line for line in runtime if "opentelemetry-proto" in line or "otlp" in line], runtime

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)], env, tmp_path)  # a clean venv: no site packages
    python = str(venv / "bin" / "python")
    pip = [python, "-m", "pip", "install", "-q"]
    # 1. xds-protos first, then the wheel.
    run([*pip, "xds-protos"], env, tmp_path)
    run([*pip, str(wheel)], env, tmp_path)
    serve_and_export(venv, tmp_path, issuer, env, "grpc", "packaged-gateway")

    # 2. opentelemetry-proto as another package brings it, then xds-protos over it again.
    run([*pip, "opentelemetry-proto>=1.45,<1.46"], env, tmp_path)
    check = tmp_path / "otel_proto.py"
    check.write_text(BROKEN_OTEL_PROTO)
    assert json.loads(run([python, str(check)], env, tmp_path)) == {"broken": False, "error": ""}
    run([*pip, "--force-reinstall", "--no-deps", "xds-protos"], env, tmp_path)
    hostile = json.loads(run([python, str(check)], env, tmp_path))
    assert hostile["broken"] and "InstrumentationScope" in hostile["error"], hostile
    for protocol in ("grpc", "http/protobuf"):
        service = "hostile-" + protocol.replace("/", "-")
        serve_and_export(venv, tmp_path, issuer, env, protocol, service)
