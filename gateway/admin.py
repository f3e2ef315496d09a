"""The admin API of a serving gateway (gateway/session/admin_api.py), with its authentication.

`admin.listen` is never served unauthenticated (the config refuses it): every call is checked
by one or both of

- mTLS: `tls_cert` + `tls_key` are the server's certificate and key, `client_ca` the CA whose
  certificates clients must present. A client without one fails the TLS handshake.
- bearer: a token in the `authorization: Bearer …` metadata, verified by the gateway's own
  rules for `token_issuer` (one of auth.issuers: its keys, algorithms, audiences, exp, nbf,
  lifetime, typ) and carrying the scope `token_scope`. Over TLS when `tls_cert` is set; in
  clear only on a loopback `listen`.

When both are configured, a call needs both: gRPC Python's TLS server either requires a
client certificate or never asks for one, so "either" cannot be offered, and both is stricter.
A call without valid credentials gets UNAUTHENTICATED, a valid token without the scope
PERMISSION_DENIED. Tokens are never logged; a revoke's log line names the caller.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from gateway.config import AdminConfig, Config, ConfigError
from gateway.identity.verifier import TokenRejected, TokenVerifier, bearer_token
from gateway.session.admin_api import Authenticate, Refused, start_admin_server
from gateway.session.store import SessionStore

log = logging.getLogger(__name__)

_MAX_SUBJECT_CHARS = 200
_UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


@dataclass(frozen=True)
class AdminAccess:
    """What the admin API checks: TLS credentials for its port (None: plaintext) and a check per call."""

    credentials: grpc.ServerCredentials | None
    authenticate: Authenticate
    description: str  # for the start-up log line


class AdminAuthenticator:
    """Names the caller of one admin call, or raises Refused."""

    def __init__(
        self,
        admin: AdminConfig,
        verifier: TokenVerifier | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._mtls = admin.mtls
        self._issuer = admin.token_issuer
        self._scope = admin.token_scope
        self._verifier = verifier
        self._clock = clock

    def __call__(self, context: grpc.ServicerContext) -> str:
        callers = []
        if self._mtls:
            callers.append(self._certificate(context))
        if self._verifier is not None:
            callers.append(self._token(context, self._verifier))
        if not callers:  # unreachable from a config: refuse rather than serve unchecked
            raise Refused(_UNAUTHENTICATED, "no authentication is configured")
        return " and ".join(callers)

    @staticmethod
    def _certificate(context: grpc.ServicerContext) -> str:
        # The TLS handshake already required a certificate signed by client_ca; check it is there.
        # grpc-stubs types the values as bytes; they are lists of bytes.
        subjects: list[bytes] = list(context.auth_context().get("x509_subject") or [])  # type: ignore[arg-type]
        if not subjects:
            raise Refused(_UNAUTHENTICATED, "a client certificate is required")
        subject = subjects[0].decode("utf-8", "replace")
        subject = "".join(c if c.isprintable() else "?" for c in subject)[:_MAX_SUBJECT_CHARS]
        return f"client certificate {subject}"

    def _token(self, context: grpc.ServicerContext, verifier: TokenVerifier) -> str:
        values = [value for key, value in context.invocation_metadata() if key == "authorization"]
        if not values:
            raise Refused(_UNAUTHENTICATED, "a bearer token is required (authorization: Bearer <token>)")
        if len(values) > 1 or not isinstance(values[0], str):
            raise Refused(_UNAUTHENTICATED, "send one authorization metadata entry")
        token = bearer_token({"authorization": values[0]})
        if token is None:
            raise Refused(_UNAUTHENTICATED, "the authorization metadata is not a Bearer token")
        try:
            identity = verifier.verify(token, self._clock())
        except TokenRejected as exc:  # its message names no secret
            raise Refused(_UNAUTHENTICATED, f"token refused ({exc.reason}): {exc}") from None
        if identity.issuer != self._issuer:  # the verifier only knows token_issuer: a second fence
            raise Refused(_UNAUTHENTICATED, "the token's issuer is not admin.token_issuer")
        if self._scope not in identity.scopes:
            raise Refused(grpc.StatusCode.PERMISSION_DENIED, f"the token lacks the scope {self._scope}")
        return f"token of iss={identity.issuer} sub={identity.subject}"


def _error(config: Config, key: str, message: str) -> ConfigError:
    return ConfigError(f"{config.source or '<config>'}: admin.{key}: {message}")


def _read(config: Config, key: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise _error(config, key, f"cannot read {path}: {exc.strerror}") from None


def _certificates(config: Config, key: str, path: Path) -> tuple[bytes, list[x509.Certificate]]:
    pem = _read(config, key, path)
    try:
        certificates = x509.load_pem_x509_certificates(pem)
    except ValueError:
        certificates = []
    if not certificates:
        raise _error(config, key, f"{path} holds no PEM certificate")
    return pem, certificates


def _public(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def server_credentials(config: Config) -> grpc.ServerCredentials | None:
    """TLS (mTLS with client_ca) credentials for the admin port, the files checked first; None: plaintext."""
    admin = config.admin
    if admin.tls_cert is None or admin.tls_key is None:
        return None
    chain_pem, chain = _certificates(config, "tls_cert", admin.tls_cert)
    key_pem = _read(config, "tls_key", admin.tls_key)
    try:
        private_key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        # TypeError: an encrypted key (the gateway has no passphrase to give).
        problem = "an encrypted key" if isinstance(exc, TypeError) else "no PEM private key"
        raise _error(config, "tls_key", f"{admin.tls_key} holds {problem}") from None
    if _public(private_key.public_key()) != _public(chain[0].public_key()):
        raise _error(config, "tls_key", f"{admin.tls_key} is not the key of the certificate in tls_cert")
    if chain[0].not_valid_after_utc < datetime.datetime.now(datetime.UTC):
        log.warning("admin.tls_cert %s has expired: clients will refuse it", admin.tls_cert)
    client_ca = None
    if admin.client_ca is not None:
        client_ca, _ = _certificates(config, "client_ca", admin.client_ca)
    return grpc.ssl_server_credentials(
        [(key_pem, chain_pem)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def admin_access(config: Config) -> AdminAccess | None:
    """What `admin:` configures; None when admin.listen is unset. Raises ConfigError for
    unusable files (before anything serves)."""
    admin = config.admin
    if not admin.listen:
        return None
    if not (admin.mtls or admin.bearer):  # config.py refuses this; never serve unchecked anyway
        raise _error(config, "listen", "the admin API needs client_ca or token_issuer")
    credentials = server_credentials(config)
    verifier = None
    methods = []
    if admin.mtls:
        methods.append(f"client certificates signed by {admin.client_ca}")
    if admin.bearer:
        issuers = [i for i in config.auth.issuers if i.issuer == admin.token_issuer]
        if not issuers:
            raise _error(config, "token_issuer", f"{admin.token_issuer!r} is not one of auth.issuers")
        # A verifier of its own, knowing only token_issuer: another issuer's token is untrusted here.
        verifier = TokenVerifier(replace(config.auth, issuers=(issuers[0],)))
        methods.append(f"bearer tokens of {admin.token_issuer} with scope {admin.token_scope}")
    return AdminAccess(credentials, AdminAuthenticator(admin, verifier), " and ".join(methods))


def serve_admin(
    config: Config, store: SessionStore, access: AdminAccess, handle_store: SessionStore | None = None
) -> tuple[grpc.Server, int]:
    """Serve the admin API on admin.listen with `access`; returns the server and its port."""
    assert config.admin.listen
    server, port = start_admin_server(
        config.admin.listen,
        store,
        config.session.max_id_length,
        credentials=access.credentials,
        authenticate=access.authenticate,
        handle_store=handle_store,
    )
    log.info("admin API requires %s", access.description)
    return server, port


def start_session_admin(
    config: Config, store: SessionStore, access: AdminAccess | None = None,
    handle_store: SessionStore | None = None,
) -> grpc.Server | None:
    """The admin API of a serving gateway, when `admin.listen` is set; else None. Pass
    `access` (from admin_access) to have the files checked before the gateway starts."""
    access = access or admin_access(config)
    if access is None:
        return None
    return serve_admin(config, store, access, handle_store)[0]
