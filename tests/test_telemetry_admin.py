"""The admin HTTP port (telemetry.metrics_listen): /metrics, /healthz, /readyz, on a real gateway."""

from __future__ import annotations

import json
import re
import socket
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.support.checks import CheckClient
from tests.support.issuer import TestIssuer
from tests.support.processes import GatewayProcess, free_port, wait_for_port, wait_until
from tests.test_telemetry_fast_path import MODES, TelemetryGateway

# Telemetry on, no OTLP endpoint: metrics are only served on /metrics, nothing is pushed.
NO_EXPORT = {"OTEL_SDK_DISABLED": "false"}


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one Prometheus sample whose labels include `labels`."""
    for line in text.splitlines():
        match = re.match(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)$", line)
        if not match or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(2) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(match.group(3))
    return None


@pytest.mark.parametrize("fast_path", MODES)
def test_metrics_health_and_ready(tmp_path: Path, issuer: TestIssuer, fast_path: bool) -> None:
    admin_port = free_port()
    config = {
        "auth": {"issuers": [issuer.issuer_config(jwks_file=issuer.write_jwks(tmp_path / "jwks.json"))]},
        "telemetry": {"metrics_listen": f"127.0.0.1:{admin_port}"},
    }
    gateway = TelemetryGateway(config, tmp_path, fast_path=fast_path, env=NO_EXPORT)
    client = CheckClient(gateway.address)
    try:
        wait_for_port(admin_port)
        assert get(admin_port, "/healthz") == (200, "ok\n")
        status, body = get(admin_port, "/readyz")
        assert status == 200 and json.loads(body) == {"ready": True, "problems": []}
        assert get(admin_port, "/nope")[0] == 404

        log_before = gateway.log_text().count("\n")
        token = issuer.token("alice")
        for n in range(20):
            assert client.status(token=token, session_id=f"session-{n}") == 200
        for _ in range(5):
            assert client.status(token=None) == 401
        # Nothing is printed per request when nothing is exported.
        assert gateway.log_text().count("\n") == log_before

        status, text = get(admin_port, "/metrics")
        assert status == 200
        assert sample(text, "authz_checks_total", decision="allow", reason="allowed", policy="") == 20
        assert sample(text, "authz_checks_total", decision="deny", reason="token_missing", policy="") == 5
        assert sample(text, "authz_check_duration_seconds_count", decision="allow") == 20
        assert sample(text, "authz_check_duration_seconds_bucket", decision="allow", le="+Inf") == 20
        assert sample(text, "authz_policy_reloads_total", result="success") == 1
        assert sample(text, "authz_sessions_live", store="memory") == 20
        store_ops = "authz_store_operation_duration_seconds_count"
        assert sample(text, store_ops, store="memory", operation="load") == 20
        assert sample(text, store_ops, store="memory", operation="create") == 20
        assert token not in text and "session-1" not in text
    finally:
        client.close()
        gateway.stop()
    # The admin port closes with the gateway.
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/healthz", timeout=1)


def test_not_ready_until_keys_load(tmp_path: Path, issuer: TestIssuer) -> None:
    admin_port = free_port()
    issuer.fail_jwks = True  # the IdP is down: no keys yet
    config = {
        "auth": {"issuers": [issuer.issuer_config()], "jwks_cooldown": "0s"},
        "telemetry": {"metrics_listen": f"127.0.0.1:{admin_port}"},
    }
    gateway = GatewayProcess(config, tmp_path, env=NO_EXPORT, wait=False)
    try:
        wait_for_port(admin_port, 20)
        assert get(admin_port, "/healthz")[0] == 200
        status, body = get(admin_port, "/readyz")
        assert status == 503
        assert json.loads(body) == {"ready": False, "problems": ["signing keys not loaded"]}

        def jwks_fetches(result: str) -> float:
            text = get(admin_port, "/metrics")[1]
            return sample(text, "authz_jwks_refreshes_total", issuer=issuer.issuer, result=result) or 0

        wait_until(lambda: jwks_fetches("failure") >= 1, what="a failed JWKS fetch counted")
        issuer.fail_jwks = False  # the IdP is back: the gateway becomes ready
        wait_until(lambda: get(admin_port, "/readyz")[0] == 200, timeout=10, what="ready once keys load")
        assert jwks_fetches("success") == 1
    finally:
        gateway.stop()


def two_free_ports() -> int:
    """A port P with P + 1 free too (for two workers' admin ports)."""
    for _ in range(50):
        port = free_port()
        try:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no two adjacent free ports")


def test_each_worker_serves_its_own_admin_port(tmp_path: Path, issuer: TestIssuer) -> None:
    admin_port = two_free_ports()
    config = {
        "store": f"sqlite:///{tmp_path / 'sessions.db'}",
        "auth": {"issuers": [issuer.issuer_config(jwks_file=issuer.write_jwks(tmp_path / "jwks.json"))]},
        "telemetry": {"metrics_listen": f"127.0.0.1:{admin_port}"},
    }
    gateway = GatewayProcess(config, tmp_path, env=NO_EXPORT, extra_args=["--workers", "2"], wait=False)
    try:
        for port in (admin_port, admin_port + 1):
            wait_for_port(port, 30)
            wait_until(lambda port=port: get(port, "/readyz")[0] == 200, timeout=20, what=f"ready on {port}")
            assert "authz_policy_reloads_total" in get(port, "/metrics")[1]
    finally:
        gateway.stop()
