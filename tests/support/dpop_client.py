"""A DPoP client's key, signing proofs with joserfc: a JOSE library other than the gateway's
(PyJWT and cryptography), so a proof that passes is not one library agreeing with itself."""

from __future__ import annotations

import base64
import hashlib
import json
import time
import uuid
import warnings
from typing import Any

from joserfc import jwk, jws

ALL_ALGORITHMS = ["ES256", "ES384", "ES512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "EdDSA"]


def ath_of(token: str) -> str:
    """base64url(SHA-256(token)), computed here independently of gateway.identity.dpop."""
    return base64.urlsafe_b64encode(hashlib.sha256(token.encode("ascii")).digest()).rstrip(b"=").decode()


class DpopKey:
    """One client key pair and the proofs it signs."""

    def __init__(self, alg: str = "ES256", *, rsa_bits: int = 2048, curve: str | None = None) -> None:
        self.alg = alg
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # joserfc warns about RSA < 2048, which some tests want
            if alg.startswith(("RS", "PS")):
                self.key: Any = jwk.RSAKey.generate_key(rsa_bits, auto_kid=False)
            elif alg == "EdDSA":
                self.key = jwk.OKPKey.generate_key(curve or "Ed25519", auto_kid=False)
            else:
                default = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}[alg]
                self.key = jwk.ECKey.generate_key(curve or default, auto_kid=False)

    @property
    def public_jwk(self) -> dict[str, Any]:
        return dict(self.key.as_dict(private=False))

    @property
    def jkt(self) -> str:
        """The RFC 7638 thumbprint, as joserfc computes it."""
        return str(self.key.thumbprint())

    def proof(
        self,
        method: str,
        url: str,
        token: str | None = None,
        *,
        iat: float | None = None,
        jti: str | None = None,
        nonce: str | None = None,
        header: dict[str, Any] | None = None,
        claims: dict[str, Any] | None = None,
        omit: tuple[str, ...] = (),
        raw_payload: str | None = None,
    ) -> str:
        protected: dict[str, Any] = {"typ": "dpop+jwt", "alg": self.alg, "jwk": self.public_jwk}
        protected.update(header or {})
        payload: dict[str, Any] = {
            "jti": jti if jti is not None else uuid.uuid4().hex,
            "htm": method,
            "htu": url,
            "iat": int(time.time() if iat is None else iat),
        }
        if token is not None:
            payload["ath"] = ath_of(token)
        if nonce is not None:
            payload["nonce"] = nonce
        payload.update(claims or {})
        for name in omit:
            payload.pop(name, None)
            protected.pop(name, None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            body = raw_payload or json.dumps(payload)
            return str(jws.serialize_compact(protected, body, self.key, algorithms=ALL_ALGORITHMS))
