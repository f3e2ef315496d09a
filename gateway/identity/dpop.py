"""DPoP proofs (RFC 9449): the proof of possession that a token bound to a key (`cnf.jkt`) must
come with, checked per request.

Every check of RFC 9449 §4.3 fails with an exception of its own, each naming the check
(`failure`: typ, alg, jwk, signature, htm, htu, iat, jti, ath, jkt, nonce) and the reason code
(DESIGN.md §4). Messages never quote the proof or the token. Time is passed in; the replay
cache that makes a `jti` single-use across replicas is handed in as an interface
(`ReplayCache`) and implemented beside the session store (gateway/session/replay.py).

The proof's header (typ, alg, jwk) is the same for every proof a client sends, so the key it
yields is remembered by a digest of the header's bytes: a repeated header costs no JSON parse, key
construction or thumbprint. The signature is verified per proof; nothing about a proof's
payload is ever cached.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import SplitResult, urlsplit

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from jwt.algorithms import get_default_algorithms
from jwt.exceptions import InvalidKeyError, PyJWKError

from gateway import decision
from gateway.config import DpopConfig
from gateway.identity.verifier import TokenRejected

DPOP_TYPE = "dpop+jwt"
MIN_RSA_BITS = 2048
MAX_RSA_BITS = 8192
_HEADER_CACHE_SIZE = 10_000
_MAX_REMEMBERED_URI = 512
_B64URL = re.compile(r"[A-Za-z0-9_-]*")
_TO_STANDARD_ALPHABET = str.maketrans("-_", "+/")
_CURVES_OF_ALG = {
    "ES256": ("EC", frozenset({"P-256"})),
    "ES384": ("EC", frozenset({"P-384"})),
    "ES512": ("EC", frozenset({"P-521"})),
    "EdDSA": ("OKP", frozenset({"Ed25519", "Ed448"})),
}
# RFC 7638 §3.2: the members of each key type that its thumbprint covers, in lexicographic order.
_THUMBPRINT_MEMBERS = {"EC": ("crv", "kty", "x", "y"), "RSA": ("e", "kty", "n"), "OKP": ("crv", "kty", "x")}
# Members that only a private key has (RFC 7518 §6.2.2, §6.3.2; RFC 8037 §2), and a symmetric key's `k`.
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
_DEFAULT_PORTS = {"http": 80, "https": 443}
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_PERCENT = re.compile(r"%([0-9A-Fa-f]{2})")
_ALGORITHMS = get_default_algorithms()
# ECDSA with its hash, and the byte length of r and of s (RFC 7518 §3.4).
_ECDSA = {
    "ES256": (ec.ECDSA(hashes.SHA256()), 32),
    "ES384": (ec.ECDSA(hashes.SHA384()), 48),
    "ES512": (ec.ECDSA(hashes.SHA512()), 66),
}


# ---------------------------------------------------------------------------- exceptions


class DpopRejected(TokenRejected):
    """A DPoP failure: `reason` is a dpop_* code, `failure` the check that failed."""

    failure = ""
    default_reason = decision.DPOP_PROOF_INVALID

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(reason or self.default_reason, message)


_NOT_REMEMBERED = object()


class InvalidProofType(DpopRejected):
    """Not a JWS compact JWT, or its `typ` is not dpop+jwt."""

    failure = "typ"


class InvalidProofAlgorithm(DpopRejected):
    failure = "alg"


class InvalidProofKey(DpopRejected):
    """The `jwk` header is missing, private, of an unsupported type or curve, or too weak."""

    failure = "jwk"


class InvalidProofSignature(DpopRejected):
    failure = "signature"


class ProofMethodMismatch(DpopRejected):
    failure = "htm"


class ProofUriMismatch(DpopRejected):
    failure = "htu"


class ProofTimeInvalid(DpopRejected):
    failure = "iat"


class InvalidProofId(DpopRejected):
    """The `jti` is missing, not a string, or too long."""

    failure = "jti"


class ProofReplayed(DpopRejected):
    failure = "jti"
    default_reason = decision.DPOP_PROOF_REPLAYED


class AccessTokenHashMismatch(DpopRejected):
    """The `ath` is missing or is not base64url(SHA-256(token))."""

    failure = "ath"


class ProofKeyMismatch(DpopRejected):
    """The token names no key (`cnf.jkt`), or another key than the proof's."""

    failure = "jkt"
    default_reason = decision.DPOP_KEY_MISMATCH


class NonceRequired(DpopRejected):
    """The proof carries no nonce, or a stale one; `nonce` is the one to use (DPoP-Nonce)."""

    failure = "nonce"
    default_reason = decision.DPOP_NONCE_REQUIRED

    def __init__(self, message: str, nonce: str) -> None:
        super().__init__(message)
        self.nonce = nonce


class DpopRequired(DpopRejected):
    """A key-bound token, or `auth.dpop.required`, without the DPoP scheme."""

    default_reason = decision.DPOP_REQUIRED


class MalformedDpopRequest(DpopRejected):
    """Not one usable DPoP header: none, several, or over auth.dpop.max_proof_bytes."""

    failure = "typ"


# ---------------------------------------------------------------------------- pure helpers


def b64url_decode(text: str) -> bytes:
    """Strict base64url without padding (RFC 7515 §2); ValueError otherwise."""
    if not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        raise ValueError("not base64url")
    try:
        # The alphabet is checked above: one C call, without base64.urlsafe_b64decode's layers.
        return binascii.a2b_base64(text.translate(_TO_STANDARD_ALPHABET) + "=" * (-len(text) % 4))
    except binascii.Error:
        raise ValueError("not base64url") from None


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def access_token_hash(token: str) -> str:
    """`ath` (RFC 9449 §4.2): base64url(SHA-256(the ASCII token))."""
    return b64url(hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest())


def jwk_thumbprint(jwk: Mapping[str, Any]) -> str:
    """The RFC 7638 SHA-256 thumbprint of a public JWK (EC, RSA or OKP), base64url.

    Raises ValueError for another key type or a required member that is not a string."""
    members = _THUMBPRINT_MEMBERS.get(jwk.get("kty"))  # type: ignore[arg-type]
    if members is None:
        raise ValueError("unsupported key type")
    values = {name: jwk.get(name) for name in members}
    if not all(isinstance(v, str) for v in values.values()):
        raise ValueError("a required key member is missing or not a string")
    canonical = json.dumps(values, separators=(",", ":"), sort_keys=True, ensure_ascii=False)
    return b64url(hashlib.sha256(canonical.encode("utf-8")).digest())


def _normalize_percent(text: str) -> str:
    """RFC 3986 §6.2.2.1-2: %-escapes in upper case, escapes of unreserved characters decoded."""

    def fix(match: re.Match[str]) -> str:
        byte = int(match.group(1), 16)
        return chr(byte) if byte in _UNRESERVED else "%" + match.group(1).upper()

    return _PERCENT.sub(fix, text)


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4."""
    output: list[str] = []
    for segment in path.split("/")[1:] if path.startswith("/") else path.split("/"):
        if segment == "..":
            if output:
                output.pop()
        elif segment != ".":
            output.append(segment)
    normalized = "/" + "/".join(output)
    if path.endswith(("/.", "/..")) and not normalized.endswith("/"):
        normalized += "/"
    return normalized


def normalize_uri(uri: str) -> str:
    """An http(s) URI without query and fragment, RFC 3986 §6.2.2 normalized: scheme and host
    in lower case, the scheme's default port left out, an empty path as "/", %-escapes
    normalized, dot segments removed. ValueError for anything else (another scheme, user
    information, a port that is not a number, no host)."""
    parts: SplitResult = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise ValueError("not an http(s) URI")
    if "@" in parts.netloc:
        raise ValueError("user information in the URI")
    host = parts.hostname
    if not host:
        raise ValueError("no host")
    port = parts.port  # ValueError when not a number or out of range
    if "[" in parts.netloc:
        host = f"[{host}]"
    authority = host if port is None or port == _DEFAULT_PORTS[scheme] else f"{host}:{port}"
    path = _remove_dot_segments(_normalize_percent(parts.path or "/"))
    return f"{scheme}://{authority}{path}"


def request_uri(scheme: str, host: str, path: str, public_url: str | None) -> str:
    """The URI a client addressed, as htu must name it: from Envoy's scheme, host (:authority)
    and path, or `public_url` and the path when TLS ends in front of Envoy. Normalized; the
    query is not part of it. ValueError when it cannot be built."""
    path = path.partition("?")[0].partition("#")[0] or "/"
    if public_url is not None:
        return normalize_uri(public_url.rstrip("/") + path)
    return normalize_uri(f"{scheme or 'http'}://{host}{path}")


# ---------------------------------------------------------------------------- nonces


class NonceSource:
    """RFC 9449 §8 server nonces that any replica can check without shared state: the nonce of
    a time window is an HMAC of the window's number under the configured key. The nonce of the
    current window and of the one before it are accepted."""

    def __init__(self, key: str, lifetime: float) -> None:
        self._key = key.encode()
        self._lifetime = lifetime

    def __repr__(self) -> str:  # the key stays out of any log or traceback
        return "NonceSource(key=[redacted])"

    def _for_window(self, window: int) -> str:
        return b64url(hmac.new(self._key, str(window).encode(), hashlib.sha256).digest()[:24])

    def current(self, now: float) -> str:
        return self._for_window(math.floor(now / self._lifetime))

    def accepts(self, nonce: object, now: float) -> bool:
        if not isinstance(nonce, str) or len(nonce) > 64:
            return False
        window = math.floor(now / self._lifetime)
        presented = nonce.encode("utf-8", "surrogatepass")
        return any(hmac.compare_digest(presented, self._for_window(w).encode()) for w in (window, window - 1))


# ---------------------------------------------------------------------------- replay cache


class ReplayCache(Protocol):
    """Single use of a proof's `jti`, across every replica that shares the store."""

    def first_use(self, key: str, expires_at: float, now: float) -> bool:
        """Record `key` until `expires_at` and return True, or False when it is recorded
        already. Atomic. Raises the store's StoreUnavailable when it cannot tell (fail closed)."""
        ...


# ---------------------------------------------------------------------------- the verifier


@dataclass(frozen=True, slots=True)
class ProofKey:
    """What a proof header yields: its algorithm, the public key, and the key's thumbprint."""

    alg: str
    key: Any
    jkt: str


def _proof_key(header_segment: str, algorithms: frozenset[str]) -> ProofKey:
    try:
        header = json.loads(b64url_decode(header_segment))
    except (ValueError, RecursionError):  # RecursionError: JSON nested deeper than the parser goes
        raise InvalidProofType("the proof header is not base64url JSON") from None
    if not isinstance(header, dict):
        raise InvalidProofType("the proof header is not a JSON object")
    if header.get("typ") != DPOP_TYPE:
        raise InvalidProofType("the proof's typ is not dpop+jwt")
    if "crit" in header:
        raise InvalidProofType("the proof has critical header parameters this gateway does not understand")
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in algorithms or alg not in _ALGORITHMS:
        raise InvalidProofAlgorithm("the proof's alg is not an allowed asymmetric algorithm")
    jwk = header.get("jwk")
    if not isinstance(jwk, dict):
        raise InvalidProofKey("the proof has no jwk header")
    if _PRIVATE_MEMBERS & jwk.keys():
        raise InvalidProofKey("the proof's jwk holds private key material")
    kty = jwk.get("kty")
    if alg.startswith(("RS", "PS")):
        if kty != "RSA":
            raise InvalidProofKey("the proof's jwk does not fit its alg")
    else:
        expected_kty, curves = _CURVES_OF_ALG[alg]
        crv = jwk.get("crv")
        if kty != expected_kty or not isinstance(crv, str) or crv not in curves:
            raise InvalidProofKey("the proof's jwk type or curve is not supported for its alg")
    try:
        key = _ALGORITHMS[alg].from_jwk(jwk)
        jkt = jwk_thumbprint(jwk)
    except (InvalidKeyError, PyJWKError, ValueError, TypeError, KeyError, OverflowError):
        raise InvalidProofKey("the proof's jwk is not a usable public key") from None
    if kty == "RSA" and not MIN_RSA_BITS <= key.key_size <= MAX_RSA_BITS:
        # Longer keys prove nothing more and make every verification slower (a cheap way to load us).
        raise InvalidProofKey(f"the proof's RSA key is not {MIN_RSA_BITS} to {MAX_RSA_BITS} bits long")
    if kty == "RSA" and key.public_numbers().e.bit_length() > 32:
        # A huge public exponent makes one verification cost tens of milliseconds.
        raise InvalidProofKey("the proof's RSA public exponent is larger than 32 bits")
    return ProofKey(alg, key, jkt)


def _finite_number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)  # an int beyond the float range overflows
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _signature_verifies(key: ProofKey, signing_input: bytes, signature: bytes) -> bool:
    ecdsa = _ECDSA.get(key.alg)
    if ecdsa is None:
        try:
            return bool(_ALGORITHMS[key.alg].verify(signing_input, key.key, signature))
        except (ValueError, TypeError):
            return False
    # ES*, the common case, straight to cryptography: r || s (RFC 7518 §3.4) as DER.
    hash_algorithm, size = ecdsa
    if len(signature) != 2 * size:
        return False
    r, s = int.from_bytes(signature[:size], "big"), int.from_bytes(signature[size:], "big")
    der = encode_dss_signature(r, s)
    try:
        key.key.verify(der, signing_input, hash_algorithm)
    except InvalidSignature:
        return False
    return True


class ProofVerifier:
    """Checks a DPoP proof against the request and the access token it comes with (§4.3)."""

    def __init__(self, config: DpopConfig, leeway: float, replay: ReplayCache) -> None:
        self._config = config
        self._algorithms = frozenset(config.algorithms)
        self._leeway = leeway
        self._replay = replay
        self.nonces: NonceSource | None = None
        if config.nonce:
            if not config.nonce_key:
                raise ValueError("DPoP nonces need a nonce key")  # never silently off
            self.nonces = NonceSource(config.nonce_key, config.nonce_lifetime)
        self._keys: dict[bytes, ProofKey] = {}
        self._uris: dict[str, str | None] = {}
        self._keys_lock = threading.Lock()

    @property
    def algorithms(self) -> tuple[str, ...]:
        return self._config.algorithms

    def proof_key(self, header_segment: str) -> ProofKey:
        # Keyed by a digest: the cache holds 32 bytes per header, however large the header.
        digest = hashlib.sha256(header_segment.encode("utf-8", "surrogatepass")).digest()
        found = self._keys.get(digest)
        if found is None:
            found = _proof_key(header_segment, self._algorithms)
            with self._keys_lock:
                if len(self._keys) >= _HEADER_CACHE_SIZE:
                    self._keys.pop(next(iter(self._keys)), None)
                self._keys[digest] = found
        return found

    def _normalized(self, htu: str) -> str | None:
        """normalize_uri of a proof's htu, None when it is not one; remembered (a client signs
        the same few URIs over and over)."""
        # One read: another thread may evict the entry between a membership test and a lookup.
        remembered = self._uris.get(htu, _NOT_REMEMBERED)
        if remembered is not _NOT_REMEMBERED:
            return remembered  # type: ignore[return-value]
        try:
            normalized: str | None = normalize_uri(htu.partition("#")[0].partition("?")[0])
        except ValueError:
            normalized = None
        if len(htu) > _MAX_REMEMBERED_URI:  # not kept: the cache stays small whatever clients sign
            return normalized
        with self._keys_lock:
            if len(self._uris) >= _HEADER_CACHE_SIZE:
                self._uris.pop(next(iter(self._uris)), None)
            self._uris[htu] = normalized
        return normalized

    def verify(self, proof: str, *, method: str, uri: str, access_token: str, bound_jkt: str,
               now: float) -> ProofKey:
        """The proof's key when every check passes; raises a DpopRejected subclass otherwise.
        `uri` is the normalized request URI (request_uri); `bound_jkt` the token's cnf.jkt."""
        if len(proof) > self._config.max_proof_bytes:
            raise MalformedDpopRequest("the DPoP proof exceeds auth.dpop.max_proof_bytes")
        segments = proof.split(".")
        if len(segments) != 3:
            # A JWE has five segments; anything else is not a JWS compact JWT.
            raise InvalidProofType("the DPoP proof is not a JWS compact JWT")
        header_segment, payload_segment, signature_segment = segments
        key = self.proof_key(header_segment)
        try:
            signature = b64url_decode(signature_segment)
            payload_bytes = b64url_decode(payload_segment)
        except ValueError:
            raise InvalidProofSignature("the proof's payload or signature is not base64url") from None
        signing_input = f"{header_segment}.{payload_segment}".encode("ascii")
        if not _signature_verifies(key, signing_input, signature):
            raise InvalidProofSignature("the proof's signature does not verify with its jwk")
        try:
            claims = json.loads(payload_bytes.decode("utf-8"))
        except (ValueError, RecursionError):
            raise InvalidProofType("the proof's payload is not JSON") from None
        if not isinstance(claims, dict):
            raise InvalidProofType("the proof's payload is not a JSON object")
        self._check_claims(claims, key, method=method, uri=uri, access_token=access_token,
                           bound_jkt=bound_jkt, now=now)
        return key

    def _check_claims(self, claims: dict[str, Any], key: ProofKey, *, method: str, uri: str,
                      access_token: str, bound_jkt: str, now: float) -> None:
        if claims.get("htm") != method:
            raise ProofMethodMismatch("the proof's htm is not the request method")
        htu = claims.get("htu")
        if not isinstance(htu, str) or self._normalized(htu) != uri:
            raise ProofUriMismatch("the proof's htu is not the request URI")
        iat = _finite_number(claims.get("iat"))
        if iat is None:
            raise ProofTimeInvalid("the proof's iat is not a finite number")
        if iat > now + self._leeway:
            raise ProofTimeInvalid("the proof was issued in the future (iat)")
        if iat < now - self._config.max_age - self._leeway:
            raise ProofTimeInvalid("the proof is older than auth.dpop.max_age (iat)")
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti or len(jti) > self._config.max_jti_length:
            raise InvalidProofId("the proof's jti is missing, not a string, or over auth.dpop.max_jti_length")
        ath = claims.get("ath")
        if not isinstance(ath, str) or not hmac.compare_digest(
            ath.encode("utf-8", "surrogatepass"), access_token_hash(access_token).encode()
        ):
            raise AccessTokenHashMismatch("the proof's ath is missing or is not the hash of the access token")
        if not hmac.compare_digest(key.jkt.encode(), bound_jkt.encode("utf-8", "surrogatepass")):
            raise ProofKeyMismatch("the proof's key is not the key the token is bound to (cnf.jkt)")
        if self.nonces is not None and not self.nonces.accepts(claims.get("nonce"), now):
            raise NonceRequired("the proof carries no current server nonce", self.nonces.current(now))
        # Last: only a proof that passed everything else uses up its jti. Keyed by the key as well,
        # so that nobody can use up the jti of another client's proof.
        digest = hashlib.sha256(f"{key.jkt}\n{jti}".encode("utf-8", "surrogatepass")).hexdigest()
        # Long enough for a replica whose clock lags by up to the leeway: it still accepts the
        # proof's iat, so it must still find the jti.
        expires_at = max(iat, now) + self._config.max_age + 2 * self._leeway + 1.0
        if not self._replay.first_use(digest, max(expires_at, now + 1.0), now):
            raise ProofReplayed("the proof's jti was used before")
