"""Inputs that a review showed could get through, or leak, and must not any more.

Each test goes through the real gRPC Check of an in-process gateway (real keys, real
policies), except where a pure function is the whole story.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway import decision
from gateway.envoy_api.envoy.config.core.v3 import base_pb2
from gateway.mcp import McpCall, Unparseable, parse_body
from gateway.policy.loader import PolicyLoadError, load_policy_set
from tests.support.checks import check_request
from tests.support.inprocess import InProcessGateway
from tests.support.issuer import TestIssuer


@pytest.fixture
def idp() -> Iterator[TestIssuer]:
    issuer = TestIssuer(serve=False)
    yield issuer
    issuer.stop()


def _gateway(
    idp: TestIssuer, tmp_path: Path, policies: dict[str, str] | None = None, **settings: object
) -> InProcessGateway:
    config: dict[str, object] = {
        "auth": {"issuers": [idp.issuer_config(jwks_file=idp.write_jwks(tmp_path / "jwks.json"))]},
        **settings,
    }
    if policies is not None:
        directory = tmp_path / "policies"
        directory.mkdir()
        for name, text in policies.items():
            (directory / name).write_text(text)
        config["policies"] = str(directory)
    return InProcessGateway(config, tmp_path)


@pytest.fixture
def gw(idp: TestIssuer, tmp_path: Path) -> Iterator[InProcessGateway]:
    gateway = _gateway(idp, tmp_path)
    yield gateway
    gateway.stop()


def test_a_repeated_session_header_cannot_slip_past_the_binding(
    gw: InProcessGateway, idp: TestIssuer
) -> None:
    alice, mallory = idp.token("alice"), idp.token("mallory")
    assert gw.client.status(token=alice, session_id="victim-sid") == 200
    # Envoy joins a repeated header with commas; an upstream may read only the first value.
    request = check_request(token=mallory)
    http = request.attributes.request.http
    for value in (b"victim-sid", b"x"):
        http.header_map.headers.append(base_pb2.HeaderValue(key="mcp-session-id", raw_value=value))
    assert gw.client.check(request).denied_response.status.code == 400
    assert gw.last.reason == decision.SESSION_ID_INVALID
    assert gw.client.status(token=mallory, session_id="victim-sid,x") == 400
    assert gw.client.status(token=alice, session_id="victim-sid") == 200


def test_credentials_that_are_not_a_bearer_token_are_refused(idp: TestIssuer, tmp_path: Path) -> None:
    config = {
        "auth": {
            "issuers": [idp.issuer_config(jwks_file=idp.write_jwks(tmp_path / "jwks.json"))],
            "allow_anonymous": True,
        }
    }
    gateway = InProcessGateway(config, tmp_path)
    try:
        assert gateway.client.status() == 200  # anonymous is allowed here
        for value in ("Basic YWxpY2U6cHc=", "Bearer", "DPoP", "Token abc"):
            assert gateway.client.status(headers={"authorization": value}) == 401
            assert gateway.last.reason == decision.TOKEN_INVALID
        # The DPoP scheme without its proof (tests/test_dpop.py has the rest).
        assert gateway.client.status(headers={"authorization": "DPoP abc"}) == 401
        assert gateway.last.reason == decision.DPOP_PROOF_INVALID
    finally:
        gateway.stop()


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_time_claims_must_be_finite(gw: InProcessGateway, idp: TestIssuer, claim: str, value: float) -> None:
    assert gw.client.status(token=idp.token("alice", **{claim: value})) == 401
    assert gw.last.reason == decision.TOKEN_INVALID


QUERY_POLICY = """
name: tenant
rules:
  - name: acme-only
    allow: '!has(request.query.tenant) || request.query.tenant == "acme"'
    deny: { status: 403, reason: wrong_tenant }
"""


def test_a_repeated_query_parameter_is_refused_when_a_policy_reads_the_query(
    idp: TestIssuer, tmp_path: Path
) -> None:
    gateway = _gateway(idp, tmp_path, {"tenant.yaml": QUERY_POLICY})
    try:
        token = idp.token("alice")
        assert gateway.client.status(token=token, path="/x?tenant=acme") == 200
        assert gateway.client.status(token=token, path="/x?tenant=evil") == 403
        assert gateway.client.status(token=token, path="/x?tenant=acme&tenant=evil") == 400
        assert gateway.last.reason == decision.REQUEST_INVALID
    finally:
        gateway.stop()


def test_a_repeated_query_parameter_passes_when_no_policy_reads_the_query(
    gw: InProcessGateway, idp: TestIssuer
) -> None:
    assert gw.client.status(token=idp.token("alice"), path="/x?tag=a&tag=b") == 200


TOOLS_POLICY = """
name: tools
when: mcp.method == "tools/call" || mcp.method.startsWith("resources/")
rules:
  - name: safe-only
    allow: mcp.name in ["echo", "docs://public"]
    deny: { status: 403, reason: forbidden_target }
"""


def _rpc(method: str, **params: object) -> dict[str, object]:
    return {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}


def test_mcp_calls_cannot_hide_from_a_policy(idp: TestIssuer, tmp_path: Path) -> None:
    gateway = _gateway(idp, tmp_path, {"tools.yaml": TOOLS_POLICY})
    try:
        token = idp.token("alice")

        def status(body: object) -> int:
            return gateway.client.status(token=token, body=json.dumps(body))

        assert status(_rpc("tools/call", name="echo")) == 200
        assert status(_rpc("tools/call", name="delete_all")) == 403
        # A batch element that is not JSON-RPC does not hide the others: the batch is refused.
        assert status([_rpc("tools/call", name="delete_all"), {"jsonrpc": "1.0"}]) == 400
        assert status([_rpc("tools/call", name="delete_all"), _rpc("ping")]) == 403
        # A resource is what its uri names, whatever `name` says beside it.
        assert status(_rpc("resources/read", uri="file:///etc/secret", name="docs://public")) == 403
        assert status(_rpc("resources/read", uri="docs://public")) == 200
    finally:
        gateway.stop()


def test_an_absurdly_nested_body_is_unparseable_and_crashes_nothing() -> None:
    json_headers = {"content-type": "application/json"}
    for body in ("[" * 100_000, "[" * 100_000 + "]" * 100_000, '{"a":' * 65 + "1" + "}" * 65):
        with pytest.raises(Unparseable):
            parse_body(json_headers, body, "")
    deep_but_bounded = '{"jsonrpc":"2.0","method":"ping","params":' + '{"a":' * 60 + "1" + "}" * 61
    assert parse_body(json_headers, deep_but_bounded, "") == (McpCall("ping"),)


def test_header_names_in_policies_must_be_lower_case() -> None:
    text = """
name: p
session:
  key: '"Mcp-Session-Id" in request.headers ? request.headers["Mcp-Session-Id"] : ""'
"""
    with pytest.raises(PolicyLoadError, match="lower-case"):
        load_policy_set([("p.yaml", text)])


@pytest.mark.parametrize("header", ["authorization", "dpop"])
def test_a_credential_is_never_a_session_id(header: str) -> None:
    """Neither the token nor a DPoP proof: CEL never sees them, so the direct read must not."""
    text = f"""
name: p
session:
  key: '"{header}" in request.headers ? request.headers["{header}"] : ""'
"""
    policies = load_policy_set([("p.yaml", text)])
    session = policies.policies[0].session
    assert session is not None and session.header is None  # CEL path: request.headers has neither


AUDIT_POLICY = """
name: tiers
mode: audit
when: claims.tier > 1
rules:
  - name: gold
    allow: claims.tier > 2
    deny: { status: 403, reason: tier_too_low }
"""


def test_an_audit_policy_that_fails_records_and_allows(idp: TestIssuer, tmp_path: Path) -> None:
    # An audit policy alone protects nothing: served only when the config says so.
    gateway = _gateway(idp, tmp_path, {"tiers.yaml": AUDIT_POLICY}, allow_no_enforcing_policy=True)
    try:
        assert gateway.client.status(token=idp.token("alice")) == 200  # no tier claim: `when` fails
        audited = gateway.last.audit_denies
        assert [(a.policy, a.reason) for a in audited] == [("tiers", decision.POLICY_ERROR)]
    finally:
        gateway.stop()


LOOKUP_POLICY = """
name: keys
rules:
  - name: known-key
    allow: claims[request.headers["x-api-key"]] == "x"
    deny: { status: 403, reason: nope }
"""


def test_a_cel_error_does_not_echo_request_values(idp: TestIssuer, tmp_path: Path) -> None:
    gateway = _gateway(idp, tmp_path, {"keys.yaml": LOOKUP_POLICY})
    try:
        secret = "sk_live_SECRET123"
        assert gateway.client.status(token=idp.token("alice"), headers={"x-api-key": secret}) == 403
        assert gateway.last.reason == decision.POLICY_ERROR
        assert gateway.last.error is not None
        assert secret not in gateway.last.error
        assert "[redacted]" in gateway.last.error
    finally:
        gateway.stop()
