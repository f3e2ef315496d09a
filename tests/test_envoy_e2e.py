"""End to end through a real Envoy (examples/envoy/envoy.yaml), the gateway process and an upstream.

Envoy, the gateway, the upstream and the JWKS issuer each run on a free loopback port.
"""

from __future__ import annotations

import http.client
import json
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from gateway.example_keys import SigningKeyPair, claims_for
from tests.support.checks import CheckClient, check_request, http_status
from tests.support.issuer import AUDIENCE, TestIssuer
from tests.support.processes import (
    EnvoyProcess,
    GatewayProcess,
    RecordingUpstream,
    free_port,
    start_envoy,
)

RESOURCE_METADATA = "https://mcp.example.test/.well-known/oauth-protected-resource"


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    challenges: list[str] = field(default_factory=list)  # every WWW-Authenticate value

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Stack:
    idp: TestIssuer
    gateway: GatewayProcess
    envoy: EnvoyProcess
    upstream: RecordingUpstream
    port: int

    def request(
        self,
        method: str = "GET",
        path: str = "/mcp",
        *,
        token: str | None = None,
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
    ) -> Reply:
        all_headers = dict(headers or {})
        if token is not None:
            all_headers["Authorization"] = f"Bearer {token}"
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            connection.request(method, path, body=body, headers=all_headers)
            response = connection.getresponse()
            pairs = response.getheaders()
            challenges = [v for k, v in pairs if k.lower() == "www-authenticate"]
            return Reply(response.status, {k.lower(): v for k, v in pairs}, response.read(), challenges)
        finally:
            connection.close()


def _start_stack(tmp_path: Path, auth: dict[str, Any], idp: TestIssuer) -> Stack:
    upstream = RecordingUpstream()
    gateway = GatewayProcess({"auth": auth}, tmp_path)
    try:
        # The example's tracer exports to :4317; point it at a port of this test's own.
        envoy, port = start_envoy(
            tmp_path, [gateway.port], upstream.port, extra={"port_value: 4317": f"port_value: {free_port()}"}
        )
    except Exception:
        gateway.stop()
        upstream.stop()
        raise
    return Stack(idp, gateway, envoy, upstream, port)


def _stop_stack(stack: Stack) -> None:
    stack.envoy.stop()
    stack.gateway.stop()
    stack.upstream.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    idp = TestIssuer("RS256")
    auth = {"issuers": [idp.issuer_config()], "resource_metadata": RESOURCE_METADATA}
    running = _start_stack(tmp_path_factory.mktemp("e2e"), auth, idp)
    yield running
    _stop_stack(running)
    idp.stop()


def test_no_token_is_401_with_the_bearer_challenge(stack: Stack) -> None:
    before = len(stack.upstream.requests)
    reply = stack.request()
    assert reply.status == 401
    # Two values (the DPoP challenge beside the Bearer one); `headers` keeps the last of each name.
    assert reply.headers["www-authenticate"] == 'DPoP realm="authz-gateway", algs="ES256 RS256 PS256 EdDSA"'
    assert reply.challenges == [
        f'Bearer realm="authz-gateway", resource_metadata="{RESOURCE_METADATA}"',
        'DPoP realm="authz-gateway", algs="ES256 RS256 PS256 EdDSA"',
    ]
    assert reply.json() == {"error": "unauthorized"}
    assert reply.headers["content-type"] == "application/json"
    assert len(stack.upstream.requests) == before  # never reached the upstream


def test_a_valid_token_reaches_the_upstream_with_the_verified_subject(stack: Stack) -> None:
    reply = stack.request(token=stack.idp.token("alice"), path="/mcp?x=1")
    assert reply.status == 200
    assert reply.json() == {"ok": True, "path": "/mcp?x=1"}
    seen = stack.upstream.requests[-1]
    headers = {k.lower(): v for k, v in seen["headers"].items()}
    assert headers["x-authz-subject"] == "alice"
    assert headers["x-authz-issuer"] == stack.idp.issuer


def test_client_forged_identity_headers_are_replaced(stack: Stack) -> None:
    forged = {"X-Authz-Subject": "mallory", "x-authz-issuer": "https://evil.example.test"}
    reply = stack.request(token=stack.idp.token("alice"), headers=forged)
    assert reply.status == 200
    seen = stack.upstream.requests[-1]["headers"]
    subject = [v for k, v in seen.items() if k.lower() == "x-authz-subject"]
    issuer = [v for k, v in seen.items() if k.lower() == "x-authz-issuer"]
    assert subject == ["alice"]
    assert issuer == [stack.idp.issuer]


def test_an_mcp_post_with_a_body_and_a_session(stack: Stack) -> None:
    body = json.dumps(
        {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "echo"}}
    ).encode()
    headers = {"content-type": "application/json", "mcp-session-id": "e2e-session-1"}
    reply = stack.request("POST", token=stack.idp.token("alice"), headers=headers, body=body)
    assert reply.status == 200
    assert stack.upstream.requests[-1]["body"] == body  # the body Envoy buffered for the check still arrives
    # The same session presented by someone else: 404, and the upstream does not see it.
    before = len(stack.upstream.requests)
    reply = stack.request("POST", token=stack.idp.token("bob"), headers=headers, body=body)
    assert reply.status == 404
    assert len(stack.upstream.requests) == before
    # The owner still gets through.
    assert stack.request("POST", token=stack.idp.token("alice"), headers=headers, body=body).status == 200


def test_a_subject_with_line_breaks_never_injects_a_header_upstream(stack: Stack) -> None:
    # The verified sub goes upstream as x-authz-subject; CR/LF/NUL in it must not become a new
    # header. Envoy refuses such a header value from ext_authz, failing closed (503).
    before = len(stack.upstream.requests)
    for subject in ("alice\r\nx-injected: 1", "alice\nx-injected: 1", "al\x00ice"):
        reply = stack.request(token=stack.idp.token(subject))
        assert reply.status != 200
        assert b"x-injected" not in reply.body
    assert len(stack.upstream.requests) == before


def test_an_expired_token_is_401_invalid_token(stack: Stack) -> None:
    reply = stack.request(token=stack.idp.token("alice", ttl=-120))
    assert reply.status == 401
    assert reply.challenges[0] == (
        f'Bearer realm="authz-gateway", error="invalid_token", resource_metadata="{RESOURCE_METADATA}"'
    )
    assert reply.json() == {"error": "invalid_token"}


def test_an_untrusted_issuer_is_401(stack: Stack) -> None:
    stranger = TestIssuer("RS256", serve=False, name="stranger")
    reply = stack.request(token=stranger.token("alice"))
    assert reply.status == 401
    assert 'error="invalid_token"' in reply.headers["www-authenticate"]
    # Nor does a token naming the trusted issuer, signed by the stranger's key.
    forged = stranger.key.sign(claims_for(issuer=stack.idp.issuer, audience=AUDIENCE, subject="alice"))
    assert stack.request(token=forged).status == 401
    impostor = SigningKeyPair(stack.idp.key.kid, "RS256", stranger.key.private_key)
    assert (
        stack.request(
            token=impostor.sign(claims_for(issuer=stack.idp.issuer, audience=AUDIENCE, subject="alice"))
        ).status
        == 401
    )


def test_deny_bodies_never_echo_the_token(stack: Stack) -> None:
    token = stack.idp.token("alice", audience="https://elsewhere.test")
    reply = stack.request(token=token)
    assert reply.status == 401
    assert token.encode() not in reply.body
    assert all(token not in v for v in reply.headers.values())


def test_anonymous_allows_strip_forged_identity_headers_and_a_stopped_gateway_fails_closed(
    tmp_path: Path,
) -> None:
    idp = TestIssuer("ES256")
    stack = _start_stack(tmp_path, {"issuers": [idp.issuer_config()], "allow_anonymous": True}, idp)
    try:
        reply = stack.request(headers={"x-authz-subject": "mallory", "x-authz-issuer": "https://evil.test"})
        assert reply.status == 200
        seen = {k.lower() for k in stack.upstream.requests[-1]["headers"]}
        assert "x-authz-subject" not in seen and "x-authz-issuer" not in seen

        # Fail closed: the gateway is gone, Envoy answers status_on_error (503) itself.
        assert stack.gateway.stop() == 0
        before = len(stack.upstream.requests)
        reply = stack.request(token=idp.token("alice"))
        assert reply.status == 503
        assert stack.request().status == 503
        assert len(stack.upstream.requests) == before
    finally:
        _stop_stack(stack)
        idp.stop()


def test_sigterm_finishes_in_flight_checks_and_exits_0(tmp_path: Path) -> None:
    idp = TestIssuer("RS256")
    # No refetch cooldown, so a new kid makes the check fetch the (slow) JWKS while in flight.
    gateway = GatewayProcess({"auth": {"issuers": [idp.issuer_config()], "jwks_cooldown": "0s"}}, tmp_path)
    client = CheckClient(gateway.address)
    try:
        rotated = idp.rotate()
        idp.jwks_delay = 1.2
        results: list[int] = []
        checking = threading.Thread(
            target=lambda: results.append(
                http_status(client.check(check_request(token=idp.token(key=rotated))))
            )
        )
        started = time.monotonic()
        checking.start()
        time.sleep(0.4)  # the check is now waiting on the JWKS endpoint
        assert idp.jwks_requests == 2
        gateway.send(signal.SIGTERM)
        checking.join(10)
        assert results == [200]  # it finished, and was decided on the refetched key
        assert time.monotonic() - started >= 1.2
        gateway.proc.wait(15)
        assert gateway.proc.returncode == 0
        log = gateway.log_text()
        assert "finishing in-flight checks" in log and "stopped" in log
    finally:
        client.close()
        gateway.stop()
        idp.stop()
