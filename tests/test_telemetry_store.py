"""Telemetry around a real Redis store: child spans per round trip, store_unavailable as an
ERROR span with the exception, store metrics and readiness, when the redis-server is killed.
With the telemetry fast path and without it (the plain SDK)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from gateway.otlp_api.opentelemetry.proto.trace.v1 import trace_pb2
from gateway.telemetry.tracing import SPAN_NAME
from tests.support.checks import CheckClient
from tests.support.issuer import TestIssuer
from tests.support.otlp import OtlpReceiver, ReceivedSpan
from tests.support.processes import RedisServer, free_port, wait_until
from tests.test_telemetry_admin import get, sample
from tests.test_telemetry_fast_path import MODES, TelemetryGateway


@pytest.mark.parametrize("fast_path", MODES)
def test_store_unavailable_span_metrics_and_readiness(
    tmp_path: Path, issuer: TestIssuer, fast_path: bool
) -> None:
    receiver = OtlpReceiver()
    redis = RedisServer(tmp_path)
    admin_port = free_port()
    config = {
        "store": redis.url,
        "session": {"store_timeout": "200ms"},
        "auth": {"issuers": [issuer.issuer_config(jwks_file=issuer.write_jwks(tmp_path / "jwks.json"))]},
        "telemetry": {"metrics_listen": f"127.0.0.1:{admin_port}", "decision_log": True},
    }
    gateway = TelemetryGateway(config, tmp_path, fast_path=fast_path, env=receiver.exporter_env("grpc"))
    client = CheckClient(gateway.address)
    try:
        token = issuer.token("alice")
        session = f"s-{uuid.uuid4()}"
        assert client.status(path="/bound", token=token, session_id=session) == 200
        check = receiver.wait_for_span(lambda s: s.attributes.get("url.path") == "/bound", name=SPAN_NAME)
        assert check.attributes["authz.session.new"] is True
        # Each Redis round trip is a client span under the Check span; nothing else is.
        def children() -> list[ReceivedSpan]:
            return [s for s in receiver.spans() if s.parent_span_id == check.span_id]

        # GETEX (no record), EXISTS (nor one of the old layout), EVAL (the owner's place), EVAL
        # (the bind); one redis-server without replicas: no WAIT.
        wait_until(lambda: len(children()) >= 4, what="four child spans")
        names = sorted(s.name for s in children())
        assert names == ["redis EVAL", "redis EVAL", "redis EXISTS", "redis GETEX"]
        assert {(s.trace_id, s.attributes["db.system.name"]) for s in children()} == {
            (check.trace_id, "redis")
        }
        assert get(admin_port, "/readyz")[0] == 200

        redis.kill()
        assert client.status(path="/down", token=token, session_id=session) == 503
        span = receiver.wait_for_span(lambda s: s.attributes.get("url.path") == "/down", name=SPAN_NAME)
        assert span.attributes["authz.decision"] == "deny"
        assert span.attributes["authz.reason"] == "store_unavailable"
        assert span.attributes["http.response.status_code"] == 503
        assert span.attributes["http.request.method"] == "POST"
        assert span.status_code == trace_pb2.Status.STATUS_CODE_ERROR
        exceptions = [attrs for name, attrs in span.events if name == "exception"]
        assert exceptions and exceptions[0]["exception.type"].endswith("StoreUnavailable")

        status, body = get(admin_port, "/readyz")
        assert status == 503
        assert json.loads(body)["problems"] == ["session store not answering (StoreUnavailable)"]
        assert get(admin_port, "/healthz")[0] == 200
        metrics_text = get(admin_port, "/metrics")[1]
        assert (sample(metrics_text, "authz_store_errors_total", store="redis", operation="load") or 0) >= 1
        assert sample(metrics_text, "authz_checks_total", decision="deny", reason="store_unavailable") == 1
        store_ops = "authz_store_operation_duration_seconds_count"
        assert sample(metrics_text, store_ops, store="redis", operation="create") == 1

        logged = [json.loads(line) for line in gateway.log_text().splitlines() if line.startswith("{")]
        assert [(e["path"], e["reason"], e["status"]) for e in logged] == [
            ("/bound", "allowed", 200),
            ("/down", "store_unavailable", 503),
        ]
        exported = receiver.all_bytes()
        for secret in (token, session):
            assert secret.encode() not in exported
            assert secret not in gateway.log_text()
    finally:
        client.close()
        gateway.stop()
        redis.stop()
        receiver.stop()
