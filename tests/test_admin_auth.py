"""The admin API is never served unauthenticated: mTLS client certificates from admin.client_ca,
or bearer tokens of admin.token_issuer carrying admin.token_scope (both, when both are set).

Real gRPC on loopback, real keys and certificates (a CA made here with `cryptography`), real
tokens from the test issuer; the `authz-gateway sessions` CLI as a user runs it.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.admin import admin_access, serve_admin
from gateway.adminpb import admin_pb2, admin_pb2_grpc
from gateway.config import ConfigError, config_from_mapping
from gateway.session import open_store
from gateway.session.operations import show_session
from gateway.session.record import new_record, owner_key
from gateway.session.store import SessionStore, StoreSettings
from tests.support.issuer import TestIssuer
from tests.support.processes import REPO

SCOPE = "authz-gateway:admin"
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


# ---------------------------------------------------------------- certificates


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name | None = None,
    issuer_key: ec.EllipticCurvePrivateKey | None = None,
    *,
    ca: bool = False,
    server: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer or _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return path


def _write_cert(path: Path, certificate: x509.Certificate) -> Path:
    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return path


@dataclass(frozen=True)
class Pki:
    ca: Path  # the admin CA: signs the server's certificate and the operators'
    server_cert: Path
    server_key: Path
    client_cert: Path  # CN=ops-operator, from the admin CA
    client_key: Path
    rogue_cert: Path  # CN=ops-operator too, from another CA
    rogue_key: Path

    def read(self, name: str) -> bytes:
        return Path(getattr(self, name)).read_bytes()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca_key, rogue_ca_key = _key(), _key()
    ca = _certificate("authz-gateway admin CA", ca_key, ca=True)
    rogue_ca = _certificate("another CA", rogue_ca_key, ca=True)
    server_key, client_key, rogue_key = _key(), _key(), _key()
    return Pki(
        ca=_write_cert(d / "ca.pem", ca),
        server_cert=_write_cert(
            d / "server.pem", _certificate("localhost", server_key, ca.subject, ca_key, server=True)
        ),
        server_key=_write_key(d / "server-key.pem", server_key),
        client_cert=_write_cert(
            d / "client.pem", _certificate("ops-operator", client_key, ca.subject, ca_key)
        ),
        client_key=_write_key(d / "client-key.pem", client_key),
        rogue_cert=_write_cert(
            d / "rogue.pem", _certificate("ops-operator", rogue_key, rogue_ca.subject, rogue_ca_key)
        ),
        rogue_key=_write_key(d / "rogue-key.pem", rogue_key),
    )


# ---------------------------------------------------------------- issuers and an admin API


@pytest.fixture(scope="module")
def idp() -> TestIssuer:
    return TestIssuer(serve=False, name="idp")


@pytest.fixture(scope="module")
def other_idp() -> TestIssuer:
    """Trusted for the gateway's traffic, not for the admin API."""
    return TestIssuer(serve=False, name="other-idp")


@pytest.fixture(scope="module")
def issuers(tmp_path_factory: pytest.TempPathFactory, idp: TestIssuer, other_idp: TestIssuer) -> list[Any]:
    d = tmp_path_factory.mktemp("jwks")
    return [
        idp.issuer_config(jwks_file=idp.write_jwks(d / "idp.json")),
        other_idp.issuer_config(jwks_file=other_idp.write_jwks(d / "other.json")),
    ]


class AdminApi:
    """The admin API as `serve` starts it (gateway/admin.py), in this process, on a memory store."""

    def __init__(self, admin: dict[str, Any], issuers: list[Any]) -> None:
        config = config_from_mapping(
            {"auth": {"issuers": issuers}, "admin": {"listen": "127.0.0.1:0", **admin}}, "test.yaml"
        )
        access = admin_access(config)
        assert access is not None
        settings = StoreSettings(3600.0, 3600.0, 1000, "t:", 1.0)
        self.store: SessionStore = open_store("memory://", settings)
        self.server, self.port = serve_admin(config, self.store, access)
        self.address = f"127.0.0.1:{self.port}"
        self._channels: list[grpc.Channel] = []

    def new_session(self, subject: str = "alice") -> str:
        session = f"s-{uuid.uuid4()}"
        now = time.time()
        bound, owner = {"iss": "i", "sub": subject}, owner_key("i", subject)
        record = new_record(anonymous=False, bound=bound, owner=owner, now=now)
        assert self.store.create(session, record, now, 10).created
        return session

    def state(self, session: str) -> str:
        info = show_session(self.store, session, time.time())
        assert info is not None
        return info.state

    def stub(self, credentials: grpc.ChannelCredentials | None = None) -> Any:
        if credentials is None:
            channel = grpc.insecure_channel(self.address)
        else:
            channel = grpc.secure_channel(self.address, credentials)
        self._channels.append(channel)
        return admin_pb2_grpc.SessionAdminStub(channel)

    def close(self) -> None:
        for channel in self._channels:
            channel.close()
        self.server.stop(0).wait()
        self.store.close()


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def revoke(stub: Any, session: str, metadata: Any = None) -> Any:
    return stub.RevokeSession(admin_pb2.RevokeSessionRequest(id=session), timeout=5, metadata=metadata)


def refused(call: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as failure:
        call()
    return failure.value.code()


@pytest.fixture
def bearer_api(issuers: list[Any], idp: TestIssuer) -> Iterator[AdminApi]:
    """Bearer tokens, in clear on loopback."""
    api = AdminApi({"token_issuer": idp.issuer}, issuers)
    yield api
    api.close()


@pytest.fixture
def mtls_api(issuers: list[Any], pki: Pki) -> Iterator[AdminApi]:
    api = AdminApi(
        {"tls_cert": str(pki.server_cert), "tls_key": str(pki.server_key), "client_ca": str(pki.ca)}, issuers
    )
    yield api
    api.close()


# ---------------------------------------------------------------- bearer tokens


def test_an_unauthenticated_revoke_is_refused_and_an_authenticated_one_done(
    bearer_api: AdminApi, idp: TestIssuer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    session = bearer_api.new_session()
    stub = bearer_api.stub()
    assert refused(lambda: revoke(stub, session)) == UNAUTHENTICATED
    basic = (("authorization", "Basic b3BzOm9wcw=="),)
    assert refused(lambda: revoke(stub, session, basic)) == UNAUTHENTICATED
    assert bearer_api.state(session) == "live"

    token = idp.token("ops-bot", scope=f"openid {SCOPE}")
    assert revoke(stub, session, bearer(token)).previous_state == "live"
    assert bearer_api.state(session) == "revoked"
    # One INFO line names who revoked; no line carries the token or the session id.
    revokes = [r.getMessage() for r in caplog.records if "admin: revoked" in r.getMessage()]
    caller = f"token of iss={idp.issuer} sub=ops-bot"
    assert revokes == [f"admin: revoked a session (state before: live), asked by {caller}"]
    assert token not in caplog.text and session not in caplog.text


def test_every_method_needs_the_token(bearer_api: AdminApi, idp: TestIssuer) -> None:
    stub = bearer_api.stub()
    calls = {
        "ListSessions": admin_pb2.ListSessionsRequest(),
        "GetSession": admin_pb2.GetSessionRequest(id="s-1"),
        "RevokeSession": admin_pb2.RevokeSessionRequest(id="s-1"),
        "RevokeSubject": admin_pb2.RevokeSubjectRequest(issuer="i", subject="alice"),
    }
    for method, request in calls.items():
        assert refused(lambda m=method, r=request: getattr(stub, m)(r, timeout=5)) == UNAUTHENTICATED, method
    session = bearer_api.new_session("alice")
    token = bearer(idp.token("ops", scope=SCOPE))
    reply = stub.RevokeSubject(calls["RevokeSubject"], timeout=5, metadata=token)
    assert reply.revoked == 1 and bearer_api.state(session) == "revoked"


def test_tokens_that_do_not_make_an_administrator(
    bearer_api: AdminApi, idp: TestIssuer, other_idp: TestIssuer
) -> None:
    session = bearer_api.new_session()
    stub = bearer_api.stub()
    without_scope = idp.token("alice", scope="openid tools:call")
    assert refused(lambda: revoke(stub, session, bearer(without_scope))) == grpc.StatusCode.PERMISSION_DENIED
    refusals = {
        "expired": idp.token("ops", scope=SCOPE, ttl=60, now=time.time() - 3600),
        "another issuer's (trusted for traffic, not for admin)": other_idp.token("ops", scope=SCOPE),
        "another audience": idp.token("ops", scope=SCOPE, audience="https://elsewhere.example.test"),
        "signed by an unknown key": idp.token("ops", scope=SCOPE, key=TestIssuer(serve=False).key),
        "not a JWT": "not-a-jwt",
    }
    for what, token in refusals.items():
        assert refused(lambda t=token: revoke(stub, session, bearer(t))) == UNAUTHENTICATED, what
    assert bearer_api.state(session) == "live"


# ---------------------------------------------------------------- mTLS


def _tls(
    pki: Pki, cert: str | None = "client_cert", key: str | None = "client_key"
) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=pki.read("ca"),
        private_key=pki.read(key) if key else None,
        certificate_chain=pki.read(cert) if cert else None,
    )


def test_mtls_a_certificate_from_the_ca_revokes(
    mtls_api: AdminApi, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    session = mtls_api.new_session()
    for attempt in (
        mtls_api.stub(_tls(pki, "rogue_cert", "rogue_key")),  # the same name, from another CA
        mtls_api.stub(_tls(pki, None, None)),  # TLS, but no client certificate
        mtls_api.stub(),  # plaintext
    ):
        # The TLS handshake fails: the call never reaches the API.
        assert refused(lambda s=attempt: revoke(s, session)) == grpc.StatusCode.UNAVAILABLE
    assert mtls_api.state(session) == "live"

    assert revoke(mtls_api.stub(_tls(pki)), session).previous_state == "live"
    assert mtls_api.state(session) == "revoked"
    assert "asked by client certificate CN=ops-operator" in caplog.text


def test_mtls_and_bearer_together_need_both(issuers: list[Any], pki: Pki, idp: TestIssuer) -> None:
    api = AdminApi(
        {
            "tls_cert": str(pki.server_cert),
            "tls_key": str(pki.server_key),
            "client_ca": str(pki.ca),
            "token_issuer": idp.issuer,
        },
        issuers,
    )
    try:
        session = api.new_session()
        with_cert = api.stub(_tls(pki))
        assert refused(lambda: revoke(with_cert, session)) == UNAUTHENTICATED
        without_cert = api.stub(_tls(pki, None, None))
        token = bearer(idp.token("ops", scope=SCOPE))
        assert refused(lambda: revoke(without_cert, session, token)) == grpc.StatusCode.UNAVAILABLE
        assert api.state(session) == "live"
        assert revoke(with_cert, session, token).previous_state == "live"
    finally:
        api.close()


# ---------------------------------------------------------------- the CLI


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "gateway", "sessions", *args]
    environment = {k: v for k, v in os.environ.items() if k != "AUTHZ_ADMIN_TOKEN"}
    environment.update(env or {})
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=REPO, env=environment)


def _one_error_line(result: subprocess.CompletedProcess[str], expected: str) -> None:
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.splitlines()) == 1 and expected in result.stderr, result.stderr


def test_the_cli_with_a_token_file_and_without(
    bearer_api: AdminApi, idp: TestIssuer, tmp_path: Path
) -> None:
    session = bearer_api.new_session()
    without = cli("revoke", session, "--admin", bearer_api.address)
    _one_error_line(without, "authz-gateway: the admin API refused the credentials (UNAUTHENTICATED")
    assert bearer_api.state(session) == "live"

    token = idp.token("ops-bot", scope=SCOPE)
    token_file = tmp_path / "admin.token"
    token_file.write_text(token + "\n")
    done = cli("revoke", session, "--admin", bearer_api.address, "--admin-token-file", str(token_file))
    assert done.returncode == 0, done.stderr
    assert "revoked (was live)" in done.stdout and token not in done.stdout + done.stderr
    assert bearer_api.state(session) == "revoked"

    # The token may come from the environment; a token without the scope is refused in one line.
    listed = cli("list", "--admin", bearer_api.address, "--json", env={"AUTHZ_ADMIN_TOKEN": token})
    assert listed.returncode == 0 and session in listed.stdout, listed.stderr
    token_file.write_text(idp.token("ops-bot", scope="openid"))
    denied = cli("list", "--admin", bearer_api.address, "--admin-token-file", str(token_file))
    _one_error_line(denied, "authz-gateway: the admin API refused the credentials (PERMISSION_DENIED")
    # Never a token in clear to another host.
    remote = cli("list", "--admin", "192.0.2.1:9292", "--admin-token-file", str(token_file))
    _one_error_line(remote, "authz-gateway: a token is only sent in clear to a loopback address")


def test_the_cli_with_a_client_certificate(mtls_api: AdminApi, pki: Pki) -> None:
    session = mtls_api.new_session()
    tls = ["--admin", mtls_api.address, "--admin-ca", str(pki.ca), "--admin-cert", str(pki.client_cert)]
    done = cli("revoke", session, *tls, "--admin-key", str(pki.client_key))
    assert done.returncode == 0 and "revoked (was live)" in done.stdout, done.stderr
    assert mtls_api.state(session) == "revoked"


# ---------------------------------------------------------------- configuration


def _config(admin: dict[str, Any], issuers: list[Any]) -> None:
    config_from_mapping({"auth": {"issuers": issuers}, "admin": admin}, "conf.yaml")


def test_admin_configurations_that_would_be_unprotected_are_refused(
    issuers: list[Any], idp: TestIssuer, pki: Pki
) -> None:
    tls = {"tls_cert": str(pki.server_cert), "tls_key": str(pki.server_key)}
    cases: list[tuple[dict[str, Any], str]] = [
        ({"listen": ":9292"}, r"admin\.listen: the admin API needs authentication: set client_ca"),
        ({"listen": ":9292", **tls}, r"admin\.listen: the admin API needs authentication"),
        (
            {"listen": "0.0.0.0:9292", "token_issuer": idp.issuer},
            r"admin\.token_issuer: bearer tokens without TLS only on a loopback address",
        ),
        (
            {"listen": "admin.internal:9292", "token_issuer": idp.issuer},
            r"admin\.token_issuer: bearer tokens without TLS only on a loopback address",
        ),
        (
            {"listen": ":9292", "token_issuer": "https://unknown.example.test"},
            r"admin\.token_issuer: 'https://unknown\.example\.test' is not one of auth\.issuers",
        ),
        ({"listen": ":9292", "client_ca": str(pki.ca)}, r"admin\.client_ca: needs tls_cert and tls_key"),
        (
            {"listen": ":9292", "tls_cert": str(pki.server_cert), "client_ca": str(pki.ca)},
            r"admin: set both tls_cert and tls_key",
        ),
        (
            {"listen": ":9292", "client_ca": str(pki.ca), **tls, "token_scope": "admin"},
            r"admin\.token_scope: has no effect without token_issuer",
        ),
        (
            {"listen": ":9292", "token_issuer": idp.issuer, "token_scope": "a b"},
            r"admin\.token_scope: must be one scope",
        ),
        ({"listen": ":9292", "client_ca": "missing.pem", **tls}, r"admin\.client_ca: file not found"),
    ]
    for admin, message in cases:
        with pytest.raises(ConfigError, match=message):
            _config(admin, issuers)
    # Accepted: bearer in clear on loopback, bearer over TLS anywhere, mTLS anywhere.
    for listen in (":9292", "127.0.0.1:9292", "[::1]:9292", "localhost:9292"):
        _config({"listen": listen, "token_issuer": idp.issuer}, issuers)
    _config({"listen": "0.0.0.0:9292", "token_issuer": idp.issuer, **tls}, issuers)
    _config({"listen": "0.0.0.0:9292", "client_ca": str(pki.ca), **tls}, issuers)


def test_unusable_admin_settings_stop_serve_with_one_line(
    tmp_path: Path, pki: Pki, issuers: list[Any]
) -> None:
    # A key that is not the certificate's: found when `serve` starts, before anything serves.
    tls = {"tls_cert": str(pki.server_cert), "tls_key": str(pki.client_key), "client_ca": str(pki.ca)}
    mismatched = config_from_mapping({"auth": {"issuers": issuers}, "admin": {"listen": ":0", **tls}})
    with pytest.raises(ConfigError, match=r"admin\.tls_key: .* is not the key of the certificate"):
        admin_access(mismatched)
    # No authentication configured: `serve` stops with one line, exit 2.
    path = tmp_path / "gateway.yaml"
    config = {"listen": "127.0.0.1:0", "auth": {"issuers": issuers}, "admin": {"listen": ":0"}}
    path.write_text(yaml.safe_dump(config))
    argv = [sys.executable, "-m", "gateway", "serve", "--config", str(path)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if not line[:4].isdigit()]
    assert len(errors) == 1 and "admin.listen: the admin API needs authentication" in errors[0], result.stderr
