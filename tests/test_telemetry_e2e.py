"""End to end, for real: Envoy with its OpenTelemetry tracer, the gateway, a real redis-server,
and one OTLP receiver that both export to. Run with the gateway exporting over OTLP/gRPC
and over OTLP/HTTP (protobuf); Envoy's tracer always exports over gRPC.

For every decision the test finds Envoy's trace, and checks that the gateway's span is in
it, as the child of Envoy's ext_authz egress span, with the decision's attributes. Then
it scans every byte the receiver got, and the gateway's and Envoy's logs (decision log
included), for the tokens and session ids it used. Each protocol runs with the telemetry
fast path and with `telemetry.fast_path: false` (the plain SDK).
"""

from __future__ import annotations

import http.client
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from gateway.otlp_api.opentelemetry.proto.trace.v1 import trace_pb2
from gateway.telemetry.tracing import SPAN_NAME, SubjectHasher
from tests.support.issuer import TestIssuer
from tests.support.otlp import OtlpReceiver, ReceivedSpan
from tests.support.processes import (
    EnvoyProcess,
    GatewayProcess,
    RecordingUpstream,
    RedisServer,
    start_envoy,
    wait_until,
)
from tests.test_telemetry_fast_path import TelemetryGateway

pytestmark = pytest.mark.timeout(120)

HASH_KEY = "e2e-hash-key"
STATUS = "http.response.status_code"
# Envoy batches spans for 5 s by default; flush each one within 100 ms here.
ENVOY_FAST_FLUSH = """layered_runtime:
  layers:
    - name: test-flush
      static_layer:
        tracing.opentelemetry.flush_interval_ms: 100
        tracing.opentelemetry.min_flush_spans: 1
static_resources:"""


@dataclass
class Stack:
    protocol: str
    port: int
    receiver: OtlpReceiver
    idp: TestIssuer
    other_idp: TestIssuer
    redis: RedisServer
    gateway: GatewayProcess
    envoy: EnvoyProcess
    upstream: RecordingUpstream

    def send(
        self,
        path: str,
        *,
        token: str | None = None,
        session: str | None = None,
        body: str = "",
        traceparent: str | None = None,
    ) -> int:
        headers = {"content-type": "application/json", "host": "mcp.example.test"}
        if traceparent is not None:
            headers["traceparent"] = traceparent
        if token is not None:
            headers["authorization"] = f"Bearer {token}"
        if session is not None:
            headers["mcp-session-id"] = session
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            connection.request("POST", path, body=body.encode(), headers=headers)
            response = connection.getresponse()
            response.read()
            return int(response.status)
        finally:
            connection.close()

    def trace_of(self, path: str, root_parent: str = "") -> tuple[ReceivedSpan, list[ReceivedSpan]]:
        """The gateway's span for this path, and Envoy's spans of the same trace (once both arrived)."""
        gateway_span = self.receiver.wait_for_span(
            lambda s: s.attributes.get("url.path") == path, service="authz-gateway", name=SPAN_NAME
        )

        def envoy_spans() -> list[ReceivedSpan]:
            return [s for s in self.receiver.spans(service="envoy") if s.trace_id == gateway_span.trace_id]

        wait_until(
            lambda: any(s.span_id == gateway_span.parent_span_id for s in envoy_spans())
            and any(s.parent_span_id == root_parent for s in envoy_spans()),
            timeout=10,
            what=f"Envoy's spans for {path}",
        )
        return gateway_span, envoy_spans()


@pytest.fixture(
    scope="module",
    params=[
        pytest.param((protocol, fast_path), id=f"{protocol}-{'fast' if fast_path else 'plain'}")
        for protocol in ("grpc", "http/protobuf")
        for fast_path in (True, False)
    ],
)
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    protocol: str
    fast_path: bool
    protocol, fast_path = request.param
    work = tmp_path_factory.mktemp("telemetry-e2e")
    receiver = OtlpReceiver()
    idp, other_idp = TestIssuer(name="a"), TestIssuer(name="b")
    upstream = RecordingUpstream()
    started: list[Any] = []
    try:
        redis = RedisServer(work)
        started.append(redis)
        config = {
            "store": redis.url,
            "session": {"store_timeout": "200ms"},
            "auth": {
                "issuers": [
                    idp.issuer_config(jwks_file=idp.write_jwks(work / "a.json")),
                    other_idp.issuer_config(jwks_file=other_idp.write_jwks(work / "b.json")),
                ]
            },
            "telemetry": {"decision_log": True, "subject_hash_key": HASH_KEY},
        }
        gateway = TelemetryGateway(config, work, fast_path=fast_path, env=receiver.exporter_env(protocol))
        started.append(gateway)
        envoy, port = start_envoy(
            work,
            [gateway.port],
            upstream.port,
            extra={"port_value: 4317": f"port_value: {receiver.port}", "static_resources:": ENVOY_FAST_FLUSH},
        )
        started.append(envoy)
        yield Stack(protocol, port, receiver, idp, other_idp, redis, gateway, envoy, upstream)
    finally:
        for process in reversed(started):
            process.stop()
        upstream.stop()
        receiver.stop()
        idp.stop()
        other_idp.stop()


def unique_path() -> str:
    return f"/mcp/{uuid.uuid4().hex[:12]}"


def assert_in_envoys_trace(
    gateway_span: ReceivedSpan, envoy_spans: list[ReceivedSpan], root_parent: str = ""
) -> None:
    """Same trace as Envoy's, and the parent is Envoy's ext_authz egress span (not its ingress span)."""
    assert gateway_span.kind == trace_pb2.Span.SPAN_KIND_SERVER
    parent = next(s for s in envoy_spans if s.span_id == gateway_span.parent_span_id)
    assert parent.kind == trace_pb2.Span.SPAN_KIND_CLIENT
    assert "envoy.service.auth.v3.Authorization" in parent.name and "egress" in parent.name
    root = next(s for s in envoy_spans if s.parent_span_id == root_parent)
    assert parent.parent_span_id == root.span_id
    assert root.kind == trace_pb2.Span.SPAN_KIND_SERVER


def test_decisions_join_envoys_trace_with_their_reasons(stack: Stack) -> None:
    secrets: list[str] = []
    session = f"session-{uuid.uuid4()}"
    alice = stack.idp.token("alice")
    secrets += [alice, session]
    expected: dict[str, dict[str, Any]] = {}

    # An allow that binds a new session, for an MCP tool call.
    path = unique_path()
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "get_weather"}})
    assert stack.send(path, token=alice, session=session, body=body) == 200
    expected[path] = {
        "authz.decision": "allow", "authz.reason": "allowed", "authz.session.new": True,
        "mcp.method.name": "tools/call", "gen_ai.tool.name": "get_weather",
    }
    # Someone else (same issuer, other subject) with alice's session id.
    path = unique_path()
    mallory = stack.idp.token("mallory")
    secrets.append(mallory)
    assert stack.send(path, token=mallory, session=session) == 404
    expected[path] = {
        "authz.decision": "deny", "authz.reason": "subject_mismatch", "authz.mismatch.claim": "sub",
        "http.response.status_code": 404, "authz.policy": "mcp-session-binding", "authz.rule": "same-subject",
    }
    # The same subject name from another issuer.
    path = unique_path()
    other_alice = stack.other_idp.token("alice")
    secrets.append(other_alice)
    assert stack.send(path, token=other_alice, session=session) == 404
    expected[path] = {
        "authz.decision": "deny", "authz.reason": "issuer_mismatch", "authz.mismatch.claim": "iss",
        "http.response.status_code": 404, "authz.rule": "same-issuer",
    }
    # An expired token, and none at all.
    path = unique_path()
    expired = stack.idp.token("alice", ttl=-600)
    secrets.append(expired)
    assert stack.send(path, token=expired, session=session) == 401
    expected[path] = {"authz.decision": "deny", "authz.reason": "token_expired", STATUS: 401}
    path = unique_path()
    assert stack.send(path, session=session) == 401
    expected[path] = {"authz.decision": "deny", "authz.reason": "token_missing", STATUS: 401}
    # The store goes away: fail closed, and say so.
    stack.redis.kill()
    path = unique_path()
    assert stack.send(path, token=alice, session=session) == 503
    expected[path] = {
        "authz.decision": "deny", "authz.reason": "store_unavailable", "http.response.status_code": 503,
    }

    for path, attributes in expected.items():
        gateway_span, envoy_spans = stack.trace_of(path)
        assert_in_envoys_trace(gateway_span, envoy_spans)
        assert gateway_span.attributes["http.request.method"] == "POST"
        for key, value in attributes.items():
            assert gateway_span.attributes.get(key) == value, (path, key)
        reason = attributes["authz.reason"]
        expect_error = reason == "store_unavailable"
        assert (gateway_span.status_code == trace_pb2.Status.STATUS_CODE_ERROR) == expect_error, reason
        if reason == "subject_mismatch":
            hasher = SubjectHasher(False, HASH_KEY)
            assert gateway_span.events == [
                ("authz.binding_mismatch", {
                    "authz.mismatch.claim": "sub",
                    "authz.bound": hasher("alice"),
                    "authz.presented": hasher("mallory"),
                })
            ]
        if reason == "issuer_mismatch":
            assert gateway_span.events == [
                ("authz.binding_mismatch", {
                    "authz.mismatch.claim": "iss",
                    "authz.bound": stack.idp.issuer,
                    "authz.presented": stack.other_idp.issuer,
                })
            ]

    # The decision log has one line per decision, tied to the same spans.
    lines = [line for line in stack.gateway.log_text().splitlines() if line.startswith("{")]
    logged = {entry["path"]: entry for entry in map(json.loads, lines)}
    assert len(lines) == len(expected)
    for path, attributes in expected.items():
        assert logged[path]["reason"] == attributes["authz.reason"]
        assert logged[path]["trace_id"] == stack.trace_of(path)[0].trace_id

    # A client that sends its own traceparent: Envoy continues that trace, and the gateway's
    # parent is still Envoy's egress span (gRPC metadata), not the client's span (headers).
    path = unique_path()
    client_trace, client_span = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    assert stack.send(path, traceparent=f"00-{client_trace}-{client_span}-01") == 401
    gateway_span, envoy_spans = stack.trace_of(path, root_parent=client_span)
    assert gateway_span.trace_id == client_trace
    assert gateway_span.parent_span_id != client_span
    assert_in_envoys_trace(gateway_span, envoy_spans, root_parent=client_span)

    # The secret scan: every exported byte (Envoy's and the gateway's), and every log line.
    exported = stack.receiver.all_bytes()
    assert stack.receiver.spans(service="envoy") and stack.receiver.spans(service="authz-gateway")
    logs = stack.gateway.log_text() + stack.envoy.log_text()
    for secret in secrets:
        for piece in (secret, *secret.split(".")):  # a JWT's signature alone is secret too
            if len(piece) >= 16:
                assert piece.encode() not in exported, f"exported telemetry holds a secret ({stack.protocol})"
                assert piece not in logs, "a log holds a secret"
