"""Test and example signing keys: generate them, publish them as a JWKS, sign tokens.

Used by `authz-gateway token`, the demo, the examples and the tests. Nothing here is
on the check path.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


@dataclass(frozen=True)
class SigningKeyPair:
    kid: str
    alg: str
    private_key: PrivateKey

    @classmethod
    def generate(cls, alg: str = "RS256", kid: str | None = None) -> SigningKeyPair:
        key: PrivateKey
        if alg.startswith(("RS", "PS")):
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        elif alg == "ES256":
            key = ec.generate_private_key(ec.SECP256R1())
        elif alg == "ES384":
            key = ec.generate_private_key(ec.SECP384R1())
        elif alg == "EdDSA":
            key = ed25519.Ed25519PrivateKey.generate()
        else:
            raise ValueError(f"unsupported algorithm {alg}")
        return cls(kid or uuid.uuid4().hex[:12], alg, key)

    @classmethod
    def from_pem(cls, path: Path, alg: str, kid: str) -> SigningKeyPair:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey):
            raise ValueError(f"{path}: unsupported key type")
        return cls(kid, alg, key)

    def private_pem(self) -> bytes:
        return self.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def public_jwk(self) -> dict[str, Any]:
        public = self.private_key.public_key()
        if isinstance(public, rsa.RSAPublicKey):
            jwk = json.loads(RSAAlgorithm.to_jwk(public))
        elif isinstance(public, ec.EllipticCurvePublicKey):
            jwk = json.loads(ECAlgorithm.to_jwk(public))
        else:
            jwk = json.loads(OKPAlgorithm.to_jwk(public))
        jwk.update({"kid": self.kid, "alg": self.alg, "use": "sig"})
        return dict(jwk)

    def sign(self, claims: Mapping[str, Any], headers: Mapping[str, Any] | None = None) -> str:
        return jwt.encode(
            dict(claims), self.private_key, algorithm=self.alg, headers={"kid": self.kid, **(headers or {})}
        )


def jwks(*keys: SigningKeyPair) -> dict[str, Any]:
    return {"keys": [k.public_jwk() for k in keys]}


def claims_for(
    *,
    issuer: str,
    audience: str,
    subject: str,
    ttl: float = 3600,
    scope: str | None = None,
    now: float | None = None,
    **extra: Any,
) -> dict[str, Any]:
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {
        "iss": issuer,
        "aud": audience,
        "sub": subject,
        "iat": issued,
        "exp": issued + int(ttl),
        "jti": uuid.uuid4().hex,
    }
    if scope is not None:
        claims["scope"] = scope
    claims.update(extra)
    return claims
