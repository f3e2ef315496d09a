"""Who is asking, with the proof that they hold the token: the Authorization scheme (Bearer or
DPoP), the DPoP proof (gateway.identity.dpop) and the client certificate (RFC 8705 §3).

A token that names a key (`cnf.jkt`) is honoured only with the DPoP scheme and a proof from
that key; a token that names a certificate (`cnf["x5t#S256"]`) only over a connection with
that certificate. Neither needs configuration: the token says what it is bound to.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import unquote

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from gateway import decision
from gateway.config import DpopConfig
from gateway.identity.dpop import (
    DpopRequired,
    MalformedDpopRequest,
    ProofKeyMismatch,
    ProofUriMismatch,
    ProofVerifier,
    b64url,
    request_uri,
)
from gateway.identity.verifier import Identity, TokenRejected, TokenVerifier

_CERTIFICATE_CACHE_SIZE = 4096
_MAX_CERTIFICATE_BYTES = 64 * 1024
_URI_CACHE_SIZE = 4096
_MAX_REMEMBERED_LINE = 512


@dataclass(frozen=True, slots=True)
class Presentation:
    """What the request shows besides its headers: the request line as Envoy saw it, and the
    TLS peer's certificate (Envoy's `source.certificate`, a URL-encoded PEM; "" without one)."""

    method: str = ""
    scheme: str = ""
    host: str = ""
    path: str = ""
    client_certificate: str = ""


_NOT_KNOWN = object()


class CertificateThumbprints:
    """base64url(SHA-256(DER)) of a URL-encoded PEM certificate, remembered by its text (a
    client's connection sends the same certificate on every request)."""

    def __init__(self) -> None:
        self._known: dict[bytes, str | None] = {}
        self._lock = threading.Lock()

    def __call__(self, encoded_pem: str) -> str | None:
        if not encoded_pem or len(encoded_pem) > _MAX_CERTIFICATE_BYTES:
            return None
        # Keyed by a digest, so that the cache holds 32 bytes per certificate, not its text.
        digest = hashlib.sha256(encoded_pem.encode("utf-8", "surrogatepass")).digest()
        # One read: another thread may evict the entry between a membership test and a lookup.
        known = self._known.get(digest, _NOT_KNOWN)
        if known is not _NOT_KNOWN:
            return known  # type: ignore[return-value]
        thumbprint = _thumbprint(encoded_pem)
        with self._lock:
            if len(self._known) >= _CERTIFICATE_CACHE_SIZE:
                self._known.pop(next(iter(self._known)), None)
            self._known[digest] = thumbprint
        return thumbprint


def _thumbprint(encoded_pem: str) -> str | None:
    if not encoded_pem or len(encoded_pem) > _MAX_CERTIFICATE_BYTES:
        return None
    try:
        # The peer's own certificate comes first; a chain may follow it.
        certificate = x509.load_pem_x509_certificate(unquote(encoded_pem, errors="strict").encode("ascii"))
    except (ValueError, UnicodeError):
        return None
    return b64url(hashlib.sha256(certificate.public_bytes(Encoding.DER)).digest())


class SenderCheck:
    """The identify step: the token verified, then the proof of possession it calls for."""

    def __init__(
        self, verifier: TokenVerifier, dpop: DpopConfig, proofs: ProofVerifier, allow_anonymous: bool
    ) -> None:
        self._verifier = verifier
        self._dpop = dpop
        self._proofs = proofs
        self._allow_anonymous = allow_anonymous
        self._thumbprints = CertificateThumbprints()
        self._uris: dict[tuple[str, str, str], str] = {}  # the request side of htu, by request line

    @property
    def proofs(self) -> ProofVerifier:
        return self._proofs

    def authenticate(
        self, headers: Mapping[str, str], presented: Presentation, now: float, admitted: bool = False
    ) -> Identity | None:
        """The verified identity, or None for an allowed anonymous request. Raises TokenRejected
        (a DpopRejected for a DPoP failure) otherwise.

        `admitted`: the request already passed Check, which verified its proof of possession
        (the response path, gateway/extproc.py). The token is verified again (a cache hit), the
        proof is not: its jti is used up, it may have aged past max_age during a slow call, and
        ext_proc is not sent the client certificate."""
        value = headers.get("authorization")
        if value is None:
            if self._allow_anonymous:
                return None
            raise TokenRejected(decision.TOKEN_MISSING, "no bearer token")
        scheme, _, token = value.strip().partition(" ")
        scheme, token = scheme.lower(), token.strip()
        if scheme == "bearer" and token:
            identity = self._verifier.verify(token, now)
            if identity.jkt:
                raise DpopRequired("a token bound to a key (cnf.jkt) needs the DPoP scheme and a proof")
            if self._dpop.required:
                raise DpopRequired("auth.dpop.required: Bearer tokens are not accepted")
        elif scheme == "dpop" and token:
            proof = self._one_proof(headers)
            identity = self._verifier.verify(token, now)
            if not identity.jkt:
                raise ProofKeyMismatch("a DPoP token must be bound to a key (cnf.jkt), and this one is not")
            if not admitted:
                uri = self._request_uri(presented)
                self._proofs.verify(
                    proof, method=presented.method, uri=uri, access_token=token, bound_jkt=identity.jkt,
                    now=now,
                )
        else:
            # Credentials that are not usable are refused, never taken for an anonymous request.
            message = "the Authorization header is not a Bearer or DPoP token"
            raise TokenRejected(decision.TOKEN_INVALID, message)
        if identity.x5t and not admitted:
            presented_x5t = self._thumbprints(presented.client_certificate)
            bound = identity.x5t.encode("utf-8", "surrogatepass")
            if presented_x5t is None or not hmac.compare_digest(presented_x5t.encode(), bound):
                raise TokenRejected(
                    decision.CERTIFICATE_MISMATCH,
                    "the token is bound to a client certificate (cnf x5t#S256) the connection lacks",
                )
        return identity

    def _request_uri(self, presented: Presentation) -> str:
        line = (presented.scheme, presented.host, presented.path)
        uri = self._uris.get(line)
        if uri is None:
            try:
                uri = request_uri(presented.scheme, presented.host, presented.path, self._dpop.public_url)
            except ValueError:
                raise ProofUriMismatch("the request URI cannot be built from the request") from None
            if len(presented.host) + len(presented.path) <= _MAX_REMEMBERED_LINE:  # small, whatever is sent
                if len(self._uris) >= _URI_CACHE_SIZE:
                    self._uris.clear()
                self._uris[line] = uri
        return uri

    def _one_proof(self, headers: Mapping[str, str]) -> str:
        proof = headers.get("dpop")
        if proof is None:
            raise MalformedDpopRequest("the DPoP scheme without a DPoP header")
        if len(proof) > self._dpop.max_proof_bytes:
            raise MalformedDpopRequest("the DPoP proof exceeds auth.dpop.max_proof_bytes")
        proof = proof.strip()
        # Repeated headers arrive comma-joined, and a JWS never holds a comma: two proofs.
        if "," in proof or not proof:
            raise MalformedDpopRequest("not exactly one DPoP header")
        return proof
