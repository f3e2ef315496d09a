"""Sender-constrained tokens through a real Envoy and the gateway process.

- examples/envoy/envoy.yaml with examples/policies/dpop-binding: a DPoP client's session, a
  refresh mid-session that keeps it, a replayed proof, a stolen token and session id used with
  another key, and both WWW-Authenticate challenges surviving Envoy as separate header lines.
- examples/envoy/envoy-mtls.yaml with certificates made here: a certificate-bound token passes
  with its certificate, not with another one; without one, Envoy refuses the connection.
"""

from __future__ import annotations

import datetime
import http.client
import ipaddress
import json
import re
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.support.dpop_client import DpopKey
from tests.support.issuer import TestIssuer
from tests.support.processes import (
    EnvoyProcess,
    GatewayProcess,
    RecordingUpstream,
    free_port,
    start_envoy,
    wait_for_port,
)

REPO = Path(__file__).resolve().parent.parent
RESOURCE_METADATA = "https://mcp.example.test/.well-known/oauth-protected-resource"
SESSION_NOT_FOUND = b'{"jsonrpc":"2.0","id":null,"error":{"code":-32600,"message":"Session not found"}}'


@dataclass
class Reply:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def values(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name]


def _send(connection: http.client.HTTPConnection, method: str, path: str, headers: dict[str, str]) -> Reply:
    try:
        connection.request(method, path, body=b"{}", headers={"content-type": "application/json", **headers})
        response = connection.getresponse()
        return Reply(response.status, response.getheaders(), response.read())
    finally:
        connection.close()


@dataclass
class DpopStack:
    idp: TestIssuer
    gateway: GatewayProcess
    envoy: EnvoyProcess
    upstream: RecordingUpstream
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    def request(self, headers: dict[str, str], method: str = "POST") -> Reply:
        return _send(http.client.HTTPConnection("127.0.0.1", self.port, timeout=10), method, "/mcp", headers)


@pytest.fixture(scope="module")
def dpop_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DpopStack]:
    work = tmp_path_factory.mktemp("dpop-e2e")
    idp = TestIssuer("ES256", serve=False)
    jwks = idp.write_jwks(work / "jwks.json")
    config = {
        "auth": {"issuers": [idp.issuer_config(jwks_file=jwks)], "resource_metadata": RESOURCE_METADATA},
        "policies": str(REPO / "examples" / "policies" / "dpop-binding"),
    }
    upstream = RecordingUpstream()
    gateway = GatewayProcess(config, work)
    try:
        envoy, port = start_envoy(
            work, [gateway.port], upstream.port, extra={"port_value: 4317": f"port_value: {free_port()}"}
        )
    except Exception:
        gateway.stop()
        upstream.stop()
        raise
    yield DpopStack(idp, gateway, envoy, upstream, port)
    envoy.stop()
    gateway.stop()
    upstream.stop()


def test_both_challenges_survive_envoy_as_separate_values(dpop_stack: DpopStack) -> None:
    reply = dpop_stack.request({})
    assert reply.status == 401
    assert reply.values("www-authenticate") == [
        f'Bearer realm="authz-gateway", resource_metadata="{RESOURCE_METADATA}"',
        'DPoP realm="authz-gateway", algs="ES256 RS256 PS256 EdDSA"',
    ]
    key = DpopKey("ES256")
    token = dpop_stack.idp.token("alice", cnf={"jkt": key.jkt})
    wrong_method = key.proof("GET", dpop_stack.url, token)
    bad = dpop_stack.request({"authorization": f"DPoP {token}", "dpop": wrong_method})
    assert bad.status == 401
    assert bad.values("www-authenticate") == [
        f'Bearer realm="authz-gateway", error="invalid_token", resource_metadata="{RESOURCE_METADATA}"',
        'DPoP realm="authz-gateway", error="invalid_dpop_proof", algs="ES256 RS256 PS256 EdDSA"',
    ]
    assert json.loads(bad.body) == {"error": "invalid_dpop_proof"}


def test_the_upstream_gets_the_path_the_proof_was_judged_on(dpop_stack: DpopStack) -> None:
    """The gateway compares htu with the normalized path; the example config has Envoy forward
    that same path, so a proof for /mcp never lets the upstream see /x/../mcp or /%6dcp."""
    key = DpopKey("ES256")
    token = dpop_stack.idp.token("alice", cnf={"jkt": key.jkt})
    for sent in ("/x/../mcp", "/%6dcp", "//mcp"):
        before = len(dpop_stack.upstream.requests)
        headers = {"authorization": f"DPoP {token}", "dpop": key.proof("POST", dpop_stack.url, token)}
        connection = http.client.HTTPConnection("127.0.0.1", dpop_stack.port, timeout=10)
        reply = _send(connection, "POST", sent, headers)
        if reply.status == 200:
            assert dpop_stack.upstream.requests[-1]["path"] == "/mcp", sent
        else:
            assert len(dpop_stack.upstream.requests) == before, sent
    connection = http.client.HTTPConnection("127.0.0.1", dpop_stack.port, timeout=10)
    escaped = _send(connection, "POST", "/a%2Fmcp", {})
    assert escaped.status == 400  # an escaped slash is refused by Envoy, never judged


def test_a_dpop_session_keeps_across_a_refresh_and_refuses_replay_and_theft(dpop_stack: DpopStack) -> None:
    stack, url, session = dpop_stack, dpop_stack.url, {"mcp-session-id": "dpop-session-1"}
    key = DpopKey("ES256")
    first = stack.idp.token("alice", cnf={"jkt": key.jkt})
    before = len(stack.upstream.requests)

    def call(token: str, proof: str) -> Reply:
        return stack.request({"authorization": f"DPoP {token}", "dpop": proof, **session})

    assert call(first, key.proof("POST", url, first)).status == 200  # binds the session to alice + key
    # A refreshed token: new jti, new iat and exp, the same key (RFC 9449 §5).
    time.sleep(1.1)
    refreshed = stack.idp.token("alice", cnf={"jkt": key.jkt}, jti="refreshed")
    assert refreshed != first
    proof = key.proof("POST", url, refreshed)
    assert call(refreshed, proof).status == 200
    assert len(stack.upstream.requests) == before + 2
    assert stack.upstream.requests[-1]["headers"]["mcp-session-id"] == "dpop-session-1"

    # The same proof again: refused, never forwarded.
    replayed = call(refreshed, proof)
    assert replayed.status == 401 and json.loads(replayed.body) == {"error": "invalid_dpop_proof"}

    # The stolen token and session id with the thief's own key: the token's cnf.jkt refuses it.
    thief = DpopKey("ES256")
    stolen = call(refreshed, thief.proof("POST", url, refreshed))
    assert stolen.status == 401
    # A token of the same person bound to the thief's key (obtained elsewhere) with the stolen
    # session id: the policy's key binding answers the unknown-session 404.
    elsewhere = stack.idp.token("alice", cnf={"jkt": thief.jkt})
    hijack = call(elsewhere, thief.proof("POST", url, elsewhere))
    assert hijack.status == 404 and hijack.body == SESSION_NOT_FOUND
    # As a plain Bearer token, the key-bound token is dpop_required.
    bearer = stack.request({"authorization": f"Bearer {refreshed}", **session})
    assert bearer.status == 401
    assert len(stack.upstream.requests) == before + 2
    # The owner still holds the session.
    assert call(refreshed, key.proof("POST", url, refreshed)).status == 200


def test_a_server_nonce_reaches_the_client_through_envoy(tmp_path: Path) -> None:
    idp = TestIssuer("ES256", serve=False)
    jwks = idp.write_jwks(tmp_path / "jwks.json")
    auth = {"issuers": [idp.issuer_config(jwks_file=jwks)], "dpop": {"nonce": True, "nonce_key": "s" * 48}}
    upstream = RecordingUpstream()
    gateway = GatewayProcess({"auth": auth}, tmp_path)
    envoy: EnvoyProcess | None = None
    try:
        envoy, port = start_envoy(
            tmp_path, [gateway.port], upstream.port, extra={"port_value: 4317": f"port_value: {free_port()}"}
        )
        stack = DpopStack(idp, gateway, envoy, upstream, port)
        key = DpopKey("ES256")
        token = idp.token("alice", cnf={"jkt": key.jkt})
        first = stack.request({"authorization": f"DPoP {token}", "dpop": key.proof("POST", stack.url, token)})
        assert first.status == 401 and json.loads(first.body) == {"error": "use_dpop_nonce"}
        (nonce,) = first.values("dpop-nonce")
        assert 'error="use_dpop_nonce"' in first.values("www-authenticate")[1]
        proof = key.proof("POST", stack.url, token, nonce=nonce)
        assert stack.request({"authorization": f"DPoP {token}", "dpop": proof}).status == 200
        assert "s" * 48 not in gateway.log_text()
    finally:
        if envoy is not None:
            envoy.stop()
        gateway.stop()
        upstream.stop()


def test_spans_name_the_failed_check_and_never_hold_the_proof_or_token(tmp_path: Path) -> None:
    from tests.support.checks import CheckClient, check_request
    from tests.support.otlp import OtlpReceiver

    receiver = OtlpReceiver()
    idp = TestIssuer("ES256", serve=False)
    jwks = idp.write_jwks(tmp_path / "jwks.json")
    gateway = GatewayProcess(
        {"auth": {"issuers": [idp.issuer_config(jwks_file=jwks)]}}, tmp_path, env=receiver.exporter_env()
    )
    client = CheckClient(gateway.address)
    try:
        key = DpopKey("ES256")
        token = idp.token("alice", cnf={"jkt": key.jkt})
        url = "http://mcp.example.test/mcp"
        proofs = {"htm": key.proof("GET", url, token), "ath": key.proof("POST", url, None)}
        good = key.proof("POST", url, token)
        sent = [*proofs.values(), good, good]  # the last one is a replay
        for proof in sent:
            headers = {"authorization": f"DPoP {token}", "dpop": proof}
            client.check(check_request(host="mcp.example.test", headers=headers))
        for failure in ("htm", "ath", "jti"):
            span = receiver.wait_for_span(lambda s, f=failure: s.attributes.get("authz.dpop.failure") == f)
            assert span.attributes["http.response.status_code"] == 401
        replayed = receiver.wait_for_span(lambda s: s.attributes.get("authz.dpop.failure") == "jti")
        assert replayed.attributes["authz.reason"] == "dpop_proof_replayed"
        exported = receiver.all_bytes()
        for secret in (token, *sent, token.split(".")[2], good.split(".")[2]):
            assert secret.encode() not in exported
            assert secret not in gateway.log_text()
    finally:
        client.close()
        gateway.stop()
        receiver.stop()


# ---------------------------------------------------------------------------- mTLS


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(
    subject: str,
    key: Any,
    issuer: tuple[x509.Certificate, Any] | None,
    *,
    ca: bool = False,
    server: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer[0].subject if issuer else _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    elif not ca:
        client_auth = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])
        builder = builder.add_extension(client_auth, critical=False)
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256())


def _write(path: Path, certificate: x509.Certificate, key: Any | None = None) -> tuple[Path, Path | None]:
    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    if key is None:
        return path, None
    key_path = path.with_suffix(".key")
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return path, key_path


def _x5t_s256(certificate: x509.Certificate) -> str:
    import base64
    import hashlib

    der = certificate.public_bytes(serialization.Encoding.DER)
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()


@dataclass
class MtlsStack:
    idp: TestIssuer
    port: int
    ca_file: Path
    clients: dict[str, tuple[Path, Path, x509.Certificate]]
    upstream: RecordingUpstream

    def request(self, token: str, client: str | None) -> Reply:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        if client is not None:
            cert_path, key_path, _ = self.clients[client]
            context.load_cert_chain(str(cert_path), str(key_path))
        connection = http.client.HTTPSConnection("127.0.0.1", self.port, timeout=10, context=context)
        return _send(connection, "POST", "/mcp", {"authorization": f"Bearer {token}"})


@pytest.fixture(scope="module")
def mtls_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MtlsStack]:
    work = tmp_path_factory.mktemp("mtls-e2e")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("test client and server CA", ca_key, None, ca=True)
    ca_file, _ = _write(work / "ca.pem", ca)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_pem, server_key_pem = _write(
        work / "server.pem", _certificate("127.0.0.1", server_key, (ca, ca_key), server=True), server_key
    )
    clients = {}
    for name in ("alice-laptop", "other-device"):
        key = ec.generate_private_key(ec.SECP256R1())
        certificate = _certificate(name, key, (ca, ca_key))
        cert_path, key_path = _write(work / f"{name}.pem", certificate, key)
        assert key_path is not None
        clients[name] = (cert_path, key_path, certificate)

    idp = TestIssuer("ES256", serve=False)
    jwks = idp.write_jwks(work / "jwks.json")
    upstream = RecordingUpstream()
    gateway = GatewayProcess({"auth": {"issuers": [idp.issuer_config(jwks_file=jwks)]}}, work)
    listener, admin = free_port(), free_port()
    text = (REPO / "examples" / "envoy" / "envoy-mtls.yaml").read_text()
    assert server_key_pem is not None
    for old, new in (
        ("/etc/envoy/tls/server-key.pem", str(server_key_pem)),
        ("/etc/envoy/tls/server.pem", str(server_pem)),
        ("/etc/envoy/tls/client-ca.pem", str(ca_file)),
    ):
        assert old in text
        text = text.replace(old, new)
    for old_port, new_port in ((10443, listener), (9902, admin), (9191, gateway.port), (8080, upstream.port)):
        text, count = re.subn(rf"port_value: {old_port}\b", f"port_value: {new_port}", text)
        assert count == 1, old_port
    envoy = EnvoyProcess(text, work, name="envoy-mtls")
    try:
        wait_for_port(admin, 30)
        wait_for_port(listener, 30)
    except TimeoutError:
        envoy.stop()
        gateway.stop()
        upstream.stop()
        raise RuntimeError(f"envoy did not start:\n{envoy.log_text()}") from None
    yield MtlsStack(idp, listener, ca_file, clients, upstream)
    envoy.stop()
    gateway.stop()
    upstream.stop()


def test_a_certificate_bound_token_passes_only_with_its_certificate(mtls_stack: MtlsStack) -> None:
    stack = mtls_stack
    bound_to = stack.clients["alice-laptop"][2]
    token = stack.idp.token("alice", cnf={"x5t#S256": _x5t_s256(bound_to)})
    before = len(stack.upstream.requests)

    assert stack.request(token, "alice-laptop").status == 200
    assert len(stack.upstream.requests) == before + 1

    other = stack.request(token, "other-device")  # signed by the same CA: Envoy accepts it
    assert other.status == 401
    assert json.loads(other.body) == {"error": "invalid_token"}
    assert len(stack.upstream.requests) == before + 1

    # Without a certificate the listener refuses the connection itself.
    with pytest.raises((ssl.SSLError, ConnectionError, http.client.RemoteDisconnected)):
        stack.request(token, None)
    assert len(stack.upstream.requests) == before + 1

    # A token not bound to a certificate passes with any certificate the listener accepts.
    assert stack.request(stack.idp.token("alice"), "other-device").status == 200
