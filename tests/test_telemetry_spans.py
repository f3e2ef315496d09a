"""The Check span, end to end over real gRPC, exported over OTLP/gRPC to a real receiver.

One gateway process serves every test here: two trusted issuers (one with a remote JWKS,
one from a file), the shipped session-binding policy, an audit-mode policy and a policy
whose expression fails at run time. Each check uses its own path or trace id, so each
test finds its own span among everything the receiver got. Every test runs twice: with
the telemetry fast path, and with `telemetry.fast_path: false` (the plain SDK).
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from gateway.otlp_api.opentelemetry.proto.trace.v1 import trace_pb2
from gateway.telemetry.tracing import SPAN_NAME, SubjectHasher
from tests.support.checks import CheckClient, check_request, http_status
from tests.support.issuer import TestIssuer
from tests.support.otlp import OtlpReceiver, ReceivedSpan
from tests.support.processes import REPO, GatewayProcess, wait_until
from tests.test_telemetry_fast_path import MODES, TelemetryGateway

HASH_KEY = "telemetry-test-key"
SERVER = trace_pb2.Span.SPAN_KIND_SERVER
STATUS_ERROR = trace_pb2.Status.STATUS_CODE_ERROR
STATUS_UNSET = trace_pb2.Status.STATUS_CODE_UNSET

AUDIT_POLICY = """
name: audit-example
mode: audit
when: '"x-audit" in request.headers'
rules:
  - name: no-audit-header
    allow: 'false'
    deny: { status: 403, reason: audit_example }
"""

BROKEN_POLICY = """
name: broken-at-runtime
when: '"x-break" in request.headers'
rules:
  - name: reads-a-missing-claim
    allow: 'claims.no_such_claim == "x"'
    deny: { status: 403, reason: never_reached }
"""


BAD_PATTERN_POLICY = """
name: pattern-from-the-request
when: '"x-pattern" in request.headers'
rules:
  - name: name-matches-the-presented-pattern
    allow: 'request.headers["x-name"].matches(request.headers["x-pattern"])'
    deny: { status: 403, reason: name_mismatch }
"""


@dataclass
class Rig:
    receiver: OtlpReceiver
    idp: TestIssuer  # remote JWKS
    other_idp: TestIssuer  # JWKS file
    gateway: GatewayProcess
    client: CheckClient

    def span_for_path(self, path: str) -> ReceivedSpan:
        return self.receiver.wait_for_span(lambda s: s.attributes.get("url.path") == path, name=SPAN_NAME)

    def decision_lines(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.gateway.log_text().splitlines() if line.startswith("{")]


@pytest.fixture(scope="module", params=MODES)
def rig(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    work = tmp_path_factory.mktemp("telemetry-spans")
    policies = work / "policies"
    policies.mkdir()
    shutil.copy(REPO / "policies" / "10-mcp-session-binding.yaml", policies)
    (policies / "20-audit.yaml").write_text(AUDIT_POLICY)
    (policies / "30-broken.yaml").write_text(BROKEN_POLICY)
    (policies / "40-bad-pattern.yaml").write_text(BAD_PATTERN_POLICY)
    receiver = OtlpReceiver()
    idp = TestIssuer(name="a")
    other_idp = TestIssuer(name="b")
    config = {
        "policies": str(policies),
        "store": "memory://",
        "auth": {
            "issuers": [
                idp.issuer_config(),
                other_idp.issuer_config(jwks_file=other_idp.write_jwks(work / "b.json")),
            ],
            "jwks_cooldown": "0s",
        },
        "telemetry": {"subject_hash_key": HASH_KEY, "decision_log": True},
    }
    gateway = TelemetryGateway(config, work, fast_path=request.param, env=receiver.exporter_env("grpc"))
    client = CheckClient(gateway.address)
    try:
        yield Rig(receiver, idp, other_idp, gateway, client)
    finally:
        client.close()
        gateway.stop()
        receiver.stop()
        idp.stop()
        other_idp.stop()


def unique_path() -> str:
    return f"/mcp/{uuid.uuid4().hex[:12]}"


def tools_call(tool: str) -> str:
    return json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": tool}})


def traceparent(trace_id: str, span_id: str) -> str:
    return f"00-{trace_id}-{span_id}-01"


def assert_common(span: ReceivedSpan, path: str, method: str = "POST") -> None:
    assert span.name == SPAN_NAME
    assert span.kind == SERVER
    assert span.service == "authz-gateway"
    assert span.attributes["http.request.method"] == method
    assert span.attributes["url.path"] == path
    assert isinstance(span.attributes["authz.session.new"], bool)


def test_allow_new_session_carries_mcp_attributes(rig: Rig) -> None:
    path = unique_path()
    request = check_request(
        path=path,
        token=rig.idp.token("alice"),
        session_id=f"s-{uuid.uuid4()}",
        body=tools_call("get_weather"),
    )
    response = rig.client.check(request)
    assert http_status(response) == 200
    span = rig.span_for_path(path)
    assert_common(span, path)
    assert span.attributes["authz.decision"] == "allow"
    assert span.attributes["authz.reason"] == "allowed"
    assert span.attributes["authz.session.new"] is True
    assert span.attributes["mcp.method.name"] == "tools/call"
    assert span.attributes["gen_ai.tool.name"] == "get_weather"
    assert "http.response.status_code" not in span.attributes
    assert span.status_code == STATUS_UNSET
    assert span.events == []


def test_subject_mismatch_hashes_both_subjects(rig: Rig) -> None:
    session = f"s-{uuid.uuid4()}"
    assert rig.client.status(path=unique_path(), token=rig.idp.token("alice"), session_id=session) == 200
    path = unique_path()
    assert rig.client.status(path=path, token=rig.idp.token("mallory"), session_id=session) == 404
    span = rig.span_for_path(path)
    assert_common(span, path)
    assert span.attributes["authz.decision"] == "deny"
    assert span.attributes["authz.reason"] == "subject_mismatch"
    assert span.attributes["http.response.status_code"] == 404
    assert span.attributes["authz.policy"] == "mcp-session-binding"
    assert span.attributes["authz.rule"] == "same-subject"
    assert span.attributes["authz.mismatch.claim"] == "sub"
    assert span.attributes["authz.session.new"] is False
    hasher = SubjectHasher(False, HASH_KEY)
    assert span.events == [
        (
            "authz.binding_mismatch",
            {
                "authz.mismatch.claim": "sub",
                "authz.bound": hasher("alice"),
                "authz.presented": hasher("mallory"),
            },
        )
    ]
    raw = span.raw.SerializeToString()
    assert b"alice" not in raw and b"mallory" not in raw


def test_issuer_mismatch_shows_issuers_in_clear(rig: Rig) -> None:
    session = f"s-{uuid.uuid4()}"
    assert rig.client.status(path=unique_path(), token=rig.idp.token("alice"), session_id=session) == 200
    path = unique_path()
    assert rig.client.status(path=path, token=rig.other_idp.token("alice"), session_id=session) == 404
    span = rig.span_for_path(path)
    assert_common(span, path)
    assert span.attributes["authz.reason"] == "issuer_mismatch"
    assert span.attributes["authz.rule"] == "same-issuer"
    assert span.attributes["authz.mismatch.claim"] == "iss"
    assert span.attributes["http.response.status_code"] == 404
    assert span.events == [
        (
            "authz.binding_mismatch",
            {
                "authz.mismatch.claim": "iss",
                "authz.bound": rig.idp.issuer,
                "authz.presented": rig.other_idp.issuer,
            },
        )
    ]


@pytest.mark.parametrize(
    ("case", "reason", "status"),
    [("expired", "token_expired", 401), ("missing", "token_missing", 401), ("garbage", "token_invalid", 401)],
)
def test_token_failures(rig: Rig, case: str, reason: str, status: int) -> None:
    token = {"expired": rig.idp.token("alice", ttl=-600), "missing": None, "garbage": "not.a.jwt"}[case]
    path = unique_path()
    assert rig.client.status(method="GET", path=path, token=token) == status
    span = rig.span_for_path(path)
    assert_common(span, path, method="GET")
    assert span.attributes["authz.decision"] == "deny"
    assert span.attributes["authz.reason"] == reason
    assert span.attributes["http.response.status_code"] == status
    assert span.status_code == STATUS_UNSET  # a refused token is an answer, not an error
    assert "authz.policy" not in span.attributes


def test_audit_deny_is_an_allow_with_an_event(rig: Rig) -> None:
    path = unique_path()
    assert rig.client.status(path=path, token=rig.idp.token("alice"), headers={"x-audit": "1"}) == 200
    span = rig.span_for_path(path)
    assert_common(span, path)
    assert span.attributes["authz.decision"] == "allow"
    assert span.attributes["authz.reason"] == "allowed"
    assert span.events == [
        (
            "authz.audit_deny",
            {
                "authz.policy": "audit-example",
                "authz.rule": "no-audit-header",
                "authz.reason": "audit_example",
                "http.response.status_code": 403,
            },
        )
    ]


def test_policy_error_sets_error_status_with_the_exception(rig: Rig) -> None:
    path = unique_path()
    token = rig.idp.token("alice")
    assert rig.client.status(path=path, token=token, headers={"x-break": "1"}) == 403
    span = rig.span_for_path(path)
    assert_common(span, path)
    assert span.attributes["authz.reason"] == "policy_error"
    assert span.attributes["authz.policy"] == "broken-at-runtime"
    assert span.attributes["http.response.status_code"] == 403
    assert span.status_code == STATUS_ERROR
    assert span.raw.status.message
    exceptions = [attrs for name, attrs in span.events if name == "exception"]
    assert len(exceptions) == 1 and exceptions[0]["exception.message"]
    assert token.encode() not in span.raw.SerializeToString()


def test_a_bad_pattern_from_the_request_never_reaches_the_span(rig: Rig) -> None:
    """RE2's error quotes the pattern unquoted; the span keeps only the kind of error."""
    path = unique_path()
    headers = {"x-name": "abc", "x-pattern": "s3cretPATTERN("}
    assert rig.client.status(path=path, token=rig.idp.token("alice"), headers=headers) == 403
    span = rig.span_for_path(path)
    assert span.attributes["authz.reason"] == "policy_error"
    assert span.attributes["authz.policy"] == "pattern-from-the-request"
    (exception,) = [attrs for name, attrs in span.events if name == "exception"]
    assert "invalid regular expression" in str(exception["exception.message"])
    assert b"s3cretPATTERN" not in span.raw.SerializeToString()


def test_invalid_request_still_names_method_and_path(rig: Rig) -> None:
    path = unique_path()
    body = tools_call("get_weather")
    # The Mcp-Method header disagrees with the body: the request itself is refused.
    token = rig.idp.token("alice")
    assert rig.client.status(path=path, token=token, body=body, headers={"mcp-method": "ping"}) == 400
    span = rig.span_for_path(path)
    assert_common(span, path)
    assert span.attributes["authz.reason"] == "mcp_header_mismatch"
    assert span.attributes["http.response.status_code"] == 400


def test_parent_from_grpc_metadata_wins_over_headers(rig: Rig) -> None:
    meta_trace, meta_span = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    header_trace, header_span = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    path = unique_path()
    headers = {"traceparent": traceparent(header_trace, header_span)}
    rig.client.check(
        check_request(path=path, token=rig.idp.token("alice"), headers=headers),
        metadata=[("traceparent", traceparent(meta_trace, meta_span)), ("tracestate", "envoy=1")],
    )
    span = rig.span_for_path(path)
    assert span.trace_id == meta_trace
    assert span.parent_span_id == meta_span
    assert span.raw.trace_state == "envoy=1"


def test_parent_from_request_headers_without_metadata(rig: Rig) -> None:
    trace_id, parent = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    path = unique_path()
    headers = {"traceparent": traceparent(trace_id, parent)}
    rig.client.check(check_request(path=path, token=rig.idp.token("alice"), headers=headers))
    span = rig.span_for_path(path)
    assert span.trace_id == trace_id
    assert span.parent_span_id == parent


def test_new_root_without_any_trace_context(rig: Rig) -> None:
    path = unique_path()
    rig.client.check(check_request(path=path, token=rig.idp.token("alice")))
    span = rig.span_for_path(path)
    assert span.parent_span_id == ""
    assert len(span.trace_id) == 32 and span.trace_id != "0" * 32


def test_jwks_fetch_is_a_child_of_the_check_span(rig: Rig) -> None:
    rig.idp.rotate()  # a token signed with a key the gateway has not seen: it fetches the JWKS
    trace_id = uuid.uuid4().hex
    path = unique_path()
    response = rig.client.check(
        check_request(path=path, token=rig.idp.token("alice")),
        metadata=[("traceparent", traceparent(trace_id, uuid.uuid4().hex[:16]))],
    )
    assert http_status(response) == 200
    check_span = rig.span_for_path(path)
    fetch = rig.receiver.wait_for_span(lambda s: s.trace_id == trace_id, name="jwks.fetch")
    assert fetch.parent_span_id == check_span.span_id
    assert fetch.attributes["authz.issuer"] == rig.idp.issuer


def test_decision_log_lines_match_the_spans(rig: Rig) -> None:
    session = f"s-{uuid.uuid4()}"
    token = rig.idp.token("alice")
    deny_path = unique_path()
    assert rig.client.status(path=unique_path(), token=token, session_id=session) == 200
    intruder = rig.idp.token("eve")
    assert rig.client.status(method="DELETE", path=deny_path, token=intruder, session_id=session) == 404
    span = rig.span_for_path(deny_path)
    line = next(entry for entry in rig.decision_lines() if entry["path"] == deny_path)
    assert set(line) == {
        "time", "trace_id", "span_id", "decision", "reason", "policy", "rule", "status", "method", "path",
    }
    assert line["trace_id"] == span.trace_id and line["span_id"] == span.span_id
    assert line["decision"] == "deny" and line["reason"] == "subject_mismatch" and line["status"] == 404
    assert line["policy"] == "mcp-session-binding" and line["rule"] == "same-subject"
    assert line["method"] == "DELETE"
    log = rig.gateway.log_text()
    assert token not in log and session not in log and "eve" not in log


def test_metrics_reach_the_receiver(rig: Rig) -> None:
    path = unique_path()
    assert rig.client.status(path=path, token=None) == 401

    def token_missing_count() -> float:
        points = rig.receiver.metric_points("authz_checks", service="authz-gateway")
        values = [p.as_double or p.as_int for attrs, p in points if attrs.get("reason") == "token_missing"]
        return values[-1] if values else 0

    wait_until(lambda: token_missing_count() >= 1, timeout=10, what="authz_checks{reason=token_missing}")
    durations = rig.receiver.metric_points("authz_check_duration", service="authz-gateway")
    assert durations and durations[-1][1].count >= 1
    assert durations[-1][1].explicit_bounds[0] == pytest.approx(0.0001)
    assert rig.receiver.metric_points("authz_sessions_live", service="authz-gateway")


def test_nothing_secret_in_anything_exported(rig: Rig) -> None:
    token = rig.idp.token("secret-subject-x")
    session = f"secret-session-{uuid.uuid4()}"
    path, intruder_path = unique_path(), unique_path()
    assert rig.client.status(path=path, token=token, session_id=session) == 200
    assert rig.client.status(path=intruder_path, token=rig.idp.token("intruder"), session_id=session) == 404
    rig.span_for_path(path)
    rig.span_for_path(intruder_path)
    exported = rig.receiver.all_bytes()
    for secret in (token, token.split(".")[2], session, "secret-subject-x"):
        assert secret.encode() not in exported
        assert secret not in rig.gateway.log_text()


def test_unsampled_parent_means_no_span(rig: Rig) -> None:
    dropped, kept = unique_path(), unique_path()
    token = rig.idp.token("alice")
    unsampled = [("traceparent", f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-00")]
    assert http_status(rig.client.check(check_request(path=dropped, token=token), metadata=unsampled)) == 200
    sampled_trace = uuid.uuid4().hex
    sampled = [("traceparent", f"00-{sampled_trace}-{uuid.uuid4().hex[:16]}-01")]
    rig.client.check(check_request(path=kept, token=token), metadata=sampled)
    assert rig.span_for_path(kept).trace_id == sampled_trace
    # Spans leave in order: once the later one arrived, the earlier one would have too.
    assert not [s for s in rig.receiver.spans(name=SPAN_NAME) if s.attributes.get("url.path") == dropped]
    line = next(entry for entry in rig.decision_lines() if entry["path"] == dropped)
    assert line["trace_id"] == unsampled[0][1][3:35]  # the decision log still names the trace
