"""Bearer-token verification: who is asking, or why the token is refused.

The issuer is found from the unverified `iss`, then the token is checked with that
issuer's keys (chosen by `kid`) and allowed algorithms. Time is passed in, never read,
so every rule here can be tested with plain values. Verified tokens are cached by a
hash of their bytes until `exp`: a repeated token costs no signature check.
"""

from __future__ import annotations

import hashlib
import math
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import jwt

from gateway import decision
from gateway.config import ASYMMETRIC_ALGORITHMS, DPOP_PROOF_TYPE, AuthConfig, IssuerConfig, token_type_key
from gateway.identity.keys import KeySet, KeySource, RemoteKeys, StaticKeys
from gateway.observe import NO_OBSERVER, Observer
from gateway.text import safe_text, safe_value


@dataclass(frozen=True, slots=True)
class Identity:
    claims: Mapping[str, Any]
    issuer: str
    subject: str
    scopes: tuple[str, ...]
    expires_at: float
    # The `auth` map policies see, built once per verified token.
    auth_map: Mapping[str, Any] = field(default_factory=dict)
    # The token's confirmation (RFC 7800 `cnf`): the thumbprint of the key a DPoP proof must be
    # signed with (RFC 9449 `jkt`), and of the client certificate (RFC 8705 `x5t#S256`); "" if none.
    jkt: str = ""
    x5t: str = ""


ANONYMOUS_AUTH_MAP: Mapping[str, Any] = {
    "authenticated": False,
    "issuer": "",
    "subject": "",
    "scopes": [],
    "confirmation": "",
    "jkt": "",
    "x5t": "",
}


def auth_map_for(issuer: str, subject: str, scopes: tuple[str, ...], jkt: str, x5t: str) -> dict[str, Any]:
    """The `auth` variable of a verified token. `confirmation` says how the sender proved it holds
    the token: "dpop" (a proof signed by the key `jkt`), "mtls" (the certificate `x5t`), or ""."""
    return {
        "authenticated": True,
        "issuer": issuer,
        "subject": subject,
        "scopes": list(scopes),
        "confirmation": "dpop" if jkt else "mtls" if x5t else "",
        "jkt": jkt,
        "x5t": x5t,
    }


_MAX_THUMBPRINT = 128


def confirmation_of(claims: Mapping[str, Any]) -> tuple[str, str]:
    """(cnf.jkt, cnf["x5t#S256"]) of verified claims, "" where absent. A `cnf` that is not an
    object, or a thumbprint that is not a short non-empty string, refuses the token."""
    cnf = claims.get("cnf")
    if cnf is None:
        return "", ""
    if not isinstance(cnf, dict):
        raise TokenRejected(decision.TOKEN_INVALID, "the cnf claim is not a JSON object")
    # A binding the gateway cannot check (RFC 7800's jwk, kid or jku, a SHA-1 x5t, an empty cnf)
    # refuses the token: taken as unbound, a sender-constrained token would pass as a bearer one.
    if not cnf or any(member not in ("jkt", "x5t#S256") for member in cnf):
        raise TokenRejected(
            decision.TOKEN_INVALID, "the cnf claim names a binding other than jkt or x5t#S256"
        )
    found = []
    for member in ("jkt", "x5t#S256"):
        value = cnf.get(member, "")
        if member in cnf and (not isinstance(value, str) or not 0 < len(value) <= _MAX_THUMBPRINT):
            raise TokenRejected(decision.TOKEN_INVALID, f"the cnf claim's {member} is not a thumbprint")
        found.append(value)
    return found[0], found[1]


class TokenRejected(Exception):
    """The token cannot be trusted. `reason` is a code from DESIGN.md §4; the message names no secret."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def bearer_token(headers: Mapping[str, str]) -> str | None:
    """The token of an `Authorization: Bearer …` header (the scheme is case-insensitive)."""
    value = headers.get("authorization")
    if value is None:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    token = token.strip()
    return token or None


def authenticate(
    headers: Mapping[str, str], verifier: TokenVerifier, allow_anonymous: bool, now: float
) -> Identity | None:
    """Who is asking: the verified identity, or None for an allowed anonymous request.
    Raises TokenRejected otherwise."""
    token = bearer_token(headers)
    if token is not None:
        return verifier.verify(token, now)
    if "authorization" in headers:
        # Credentials that are not a usable Bearer token are refused, never taken for an
        # anonymous request (the upstream would still receive them).
        raise TokenRejected(decision.TOKEN_INVALID, "the Authorization header is not a Bearer token")
    if allow_anonymous:
        return None
    raise TokenRejected(decision.TOKEN_MISSING, "no bearer token")


def _scopes(claims: Mapping[str, Any]) -> tuple[str, ...]:
    raw = claims.get("scope", claims.get("scp", ()))
    if isinstance(raw, str):
        return tuple(raw.split())
    if isinstance(raw, list):
        return tuple(s for s in raw if isinstance(s, str))
    return ()


def _number(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TokenRejected(decision.TOKEN_INVALID, f"the {name} claim is not a finite number")
    try:
        number = float(value)  # an int beyond the float range overflows
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise TokenRejected(decision.TOKEN_INVALID, f"the {name} claim is not a finite number")
    return number


# Algorithm names safe to repeat in a message (the rest of the header is the token's, not ours).
_NAMED_ALGORITHMS = ASYMMETRIC_ALGORITHMS | {"HS256", "HS384", "HS512", "none", "None", "NONE"}
_MAX_NAMED_CLAIM = 64
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _unsafe_claim(claims: Mapping[str, Any]) -> str | None:
    """The top-level claim holding (in its name, its value, or anywhere nested in them) a string
    that no CEL engine may see (gateway.text), or None if all are safe."""
    for name, value in claims.items():
        if not (safe_text(name) and safe_value(value)):
            return name
    return None


def _unsafe_claim_message(name: str) -> str:
    problem = "holds a NUL or a lone surrogate (U+D800..U+DFFF)"
    if safe_text(name) and len(name) <= _MAX_NAMED_CLAIM:
        return f"the claim {name!r} {problem}"
    return f"a claim {problem}"


# identity, issuer, kid, the key set that verified it, and the window [valid_from,
# valid_until] in which its time claims pass (leeway included), so a cache hit is two
# comparisons.
_CacheEntry = tuple[Identity, str, str | None, KeySet, float, float]


@dataclass(slots=True)
class _Issuer:
    config: IssuerConfig
    keys: KeySource
    # token_type_key() of each accepted typ; None stands for a token without typ.
    token_types: frozenset[str | None] = frozenset()


def _accepted_token_types(config: IssuerConfig) -> frozenset[str | None]:
    keys = {token_type_key(t) if t else None for t in config.token_types}
    keys.discard(DPOP_PROOF_TYPE)  # a DPoP proof is never an access token, even if configured
    return frozenset(keys)


class TokenVerifier:
    """Verifies bearer JWTs. The jku, x5u and jwk headers are never used: only configured keys count."""

    def __init__(
        self,
        auth: AuthConfig,
        key_sources: Mapping[str, KeySource] | None = None,
        observer: Observer = NO_OBSERVER,
    ) -> None:
        self._auth = auth
        self._issuers: dict[str, _Issuer] = {}
        for issuer in auth.issuers:
            source = (key_sources or {}).get(issuer.issuer) or key_source_for(issuer, auth, observer)
            self._issuers[issuer.issuer] = _Issuer(issuer, source, _accepted_token_types(issuer))
        self._cache: dict[bytes, _CacheEntry] = {}
        self._cache_size = auth.token_cache_size
        self._cache_lock = threading.Lock()

    @property
    def key_sources(self) -> list[KeySource]:
        return [i.keys for i in self._issuers.values()]

    def verify(self, token: str, now: float) -> Identity:
        if len(token) > self._auth.max_token_bytes:
            raise TokenRejected(decision.TOKEN_INVALID, "the token is too large")
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        cached = self._cache.get(digest)
        if cached is not None:
            identity, issuer, kid, verified_with, valid_from, valid_until = cached
            keys = self._issuers[issuer].keys.current()
            # A key removed from the JWKS revokes the tokens it signed, cached or not. A token
            # without a kid cannot be traced to its key: it is re-verified when the key set changes.
            if keys is verified_with or (kid is not None and keys.has_kid(kid)):
                if not valid_from <= now <= valid_until:
                    self._check_times(identity.claims, now)  # raises the precise reason
                    self._check_lifetime(identity.claims, identity.expires_at, now)
                return identity
            self._cache.pop(digest, None)
        identity, kid, verified_with = self._verify_uncached(token, now)
        valid_from, valid_until = self._validity(identity.claims)
        self._remember(digest, (identity, identity.issuer, kid, verified_with, valid_from, valid_until))
        return identity

    def owner_of(self, token: str) -> tuple[str, str] | None:
        """The (issuer, subject) of a token verified earlier and still cached, not checked again:
        for sharing out capacity by identity, never for a decision."""
        cached = self._cache.get(hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest())
        return None if cached is None else (cached[0].issuer, cached[0].subject)

    def _validity(self, claims: Mapping[str, Any]) -> tuple[float, float]:
        """The times at which _check_times and _check_lifetime pass, as one closed interval."""
        leeway = self._auth.leeway
        iat = _number(claims, "iat")
        starts = [t - leeway for t in (_number(claims, "nbf"), iat) if t is not None]
        exp = _number(claims, "exp")
        assert exp is not None  # _verify_uncached required it
        if iat is None:  # the lifetime is then measured from now
            starts.append(exp - leeway - self._auth.max_token_lifetime)
        return max(starts, default=-float("inf")), exp + leeway

    def _remember(self, digest: bytes, entry: _CacheEntry) -> None:
        if self._cache_size <= 0:
            return
        with self._cache_lock:
            while len(self._cache) >= self._cache_size:
                # Oldest first: dicts keep insertion order.
                self._cache.pop(next(iter(self._cache)), None)
            self._cache[digest] = entry

    def _verify_uncached(self, token: str, now: float) -> tuple[Identity, str | None, KeySet]:
        if token.count(".") != 2:
            raise TokenRejected(decision.TOKEN_INVALID, "a JWT has three dot-separated segments")
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError as exc:
            raise TokenRejected(decision.TOKEN_INVALID, f"malformed token: {type(exc).__name__}") from None
        if not isinstance(unverified, dict):
            raise TokenRejected(decision.TOKEN_INVALID, "the claims are not a JSON object")
        alg = header.get("alg")
        issuer_name = unverified.get("iss")
        if not isinstance(issuer_name, str) or issuer_name not in self._issuers:
            raise TokenRejected(decision.ISSUER_UNTRUSTED, "the token's issuer is not trusted")
        issuer = self._issuers[issuer_name]
        if not isinstance(alg, str) or alg not in issuer.config.algorithms:
            known = isinstance(alg, str) and alg in _NAMED_ALGORITHMS
            named = f"algorithm {alg!r}" if known else "the token's algorithm"
            raise TokenRejected(decision.TOKEN_INVALID, f"{named} is not allowed")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise TokenRejected(decision.TOKEN_INVALID, "the kid header is not a string")
        if kid is not None and not safe_text(kid):
            raise TokenRejected(decision.TOKEN_INVALID, "the kid header holds a NUL or a lone surrogate")
        typ = header.get("typ")
        if "typ" in header and not isinstance(typ, str):  # "typ": null is not the same as no typ
            raise TokenRejected(decision.TOKEN_INVALID, "the typ header is not a string")
        if (token_type_key(typ) if typ is not None else None) not in issuer.token_types:
            raise TokenRejected(decision.TOKEN_INVALID, "the token's typ is not accepted")
        keys = issuer.keys.current()
        key = keys.find(kid, alg)
        if key is None:
            keys = issuer.keys.refresh_for_unknown_kid()
            key = keys.find(kid, alg)
        if key is None:
            raise TokenRejected(decision.TOKEN_INVALID, "no trusted key fits the token's kid and alg")
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[alg],
                options={
                    "verify_exp": False,  # checked below against the passed-in time
                    "verify_nbf": False,
                    "verify_iat": False,
                    "verify_aud": False,
                    "verify_iss": False,
                },
            )
        except jwt.InvalidSignatureError:
            raise TokenRejected(decision.TOKEN_INVALID, "the signature does not verify") from None
        except jwt.PyJWTError as exc:
            raise TokenRejected(decision.TOKEN_INVALID, f"invalid token: {type(exc).__name__}") from None
        unsafe = _unsafe_claim(claims)
        if unsafe is not None:
            raise TokenRejected(decision.TOKEN_INVALID, _unsafe_claim_message(unsafe))
        expires_at = self._check_times(claims, now)
        self._check_lifetime(claims, expires_at, now)
        aud = claims.get("aud")
        audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
        if not any(a in issuer.config.audiences for a in audiences if isinstance(a, str)):
            raise TokenRejected(decision.AUDIENCE_MISMATCH, "the token is not meant for this audience")
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise TokenRejected(decision.TOKEN_INVALID, "sub must be a non-empty string")
        if _CONTROL.search(subject):
            # It goes upstream as the x-authz-subject header, where CR/LF would split it.
            raise TokenRejected(decision.TOKEN_INVALID, "sub holds control characters")
        scopes = _scopes(claims)
        jkt, x5t = confirmation_of(claims)
        auth_map = auth_map_for(issuer_name, subject, scopes, jkt, x5t)
        identity = Identity(claims, issuer_name, subject, scopes, expires_at, auth_map, jkt, x5t)
        return identity, kid, keys

    def _check_lifetime(self, claims: Mapping[str, Any], exp: float, now: float) -> None:
        """exp - iat, or exp - now without iat (the issuer's clock may then run `leeway` ahead), must
        not exceed auth.max_token_lifetime. Checked once per token: a cache hit is a token that passed."""
        iat = _number(claims, "iat")
        lifetime = exp - iat if iat is not None else exp - now - self._auth.leeway
        if lifetime > self._auth.max_token_lifetime:
            raise TokenRejected(
                decision.TOKEN_INVALID, "the token's lifetime exceeds auth.max_token_lifetime"
            )

    def _check_times(self, claims: Mapping[str, Any], now: float) -> float:
        leeway = self._auth.leeway
        exp = _number(claims, "exp")
        if exp is None:
            raise TokenRejected(decision.TOKEN_INVALID, "the token has no exp")
        if now > exp + leeway:
            raise TokenRejected(decision.TOKEN_EXPIRED, "the token has expired")
        nbf = _number(claims, "nbf")
        if nbf is not None and now + leeway < nbf:
            raise TokenRejected(decision.TOKEN_INVALID, "the token is not valid yet (nbf)")
        iat = _number(claims, "iat")
        if iat is not None and now + leeway < iat:
            raise TokenRejected(decision.TOKEN_INVALID, "the token was issued in the future (iat)")
        return exp


def key_source_for(issuer: IssuerConfig, auth: AuthConfig, observer: Observer = NO_OBSERVER) -> KeySource:
    if issuer.jwks_file is not None:
        return StaticKeys(issuer.jwks_file)
    return RemoteKeys(
        issuer.issuer,
        jwks_uri=issuer.jwks_uri,
        discovery=issuer.discovery,
        timeout=auth.jwks_timeout,
        refresh_every=auth.jwks_refresh,
        cooldown=auth.jwks_cooldown,
        observer=observer,
    )
