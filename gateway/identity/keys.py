"""Signing keys of the trusted issuers: a JWKS from a file, a URI, or OIDC discovery.

Remote key sets are fetched over HTTP with timeouts and kept when the endpoint fails.
An unknown `kid` triggers at most one refetch per cooldown, so a flood of made-up kids
cannot storm the identity provider.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import jwt

from gateway.observe import NO_OBSERVER, Observer

log = logging.getLogger(__name__)

_KEY_TYPE_OF_ALG = {
    "RS256": "RSA", "RS384": "RSA", "RS512": "RSA",
    "PS256": "RSA", "PS384": "RSA", "PS512": "RSA",
    "ES256": "EC", "ES384": "EC", "ES512": "EC",
    "EdDSA": "OKP",
}
_CURVE_OF_ALG = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}


class JwksError(Exception):
    """A JWKS that cannot be used."""


@dataclass(frozen=True, slots=True)
class SigningKey:
    kid: str | None
    kty: str
    crv: str | None
    alg: str | None
    key: Any

    def fits(self, alg: str) -> bool:
        """Whether a token with header `alg` may be checked with this key (no algorithm confusion)."""
        if _KEY_TYPE_OF_ALG.get(alg) != self.kty:
            return False
        if self.alg and self.alg != alg:
            return False
        return not (self.kty == "EC" and self.crv != _CURVE_OF_ALG.get(alg))


@dataclass(frozen=True, slots=True)
class KeySet:
    by_kid: dict[str, SigningKey]
    without_kid: tuple[SigningKey, ...]

    def find(self, kid: str | None, alg: str) -> SigningKey | None:
        if kid is not None:
            key = self.by_kid.get(kid)
            return key if key is not None and key.fits(alg) else None
        fitting = [k for k in (*self.by_kid.values(), *self.without_kid) if k.fits(alg)]
        return fitting[0] if len(fitting) == 1 else None

    def has_kid(self, kid: str | None) -> bool:
        return kid is None or kid in self.by_kid


EMPTY_KEYS = KeySet({}, ())


def parse_jwks(document: object) -> KeySet:
    """Parse a JWKS document. Symmetric ("oct") and unusable keys are skipped, never trusted."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise JwksError("not a JWKS: expected an object with a 'keys' list")
    by_kid: dict[str, SigningKey] = {}
    without_kid: list[SigningKey] = []
    for entry in document["keys"]:
        if not isinstance(entry, dict) or entry.get("kty") not in ("RSA", "EC", "OKP"):
            continue
        if entry.get("use", "sig") != "sig":
            continue
        try:
            pyjwk = jwt.PyJWK(entry)
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError) as exc:
            log.warning("skipping an unusable JWKS key (kid=%s): %s", entry.get("kid"), exc)
            continue
        kid = entry.get("kid")
        key = SigningKey(
            kid if isinstance(kid, str) else None,
            entry["kty"],
            entry.get("crv"),
            entry.get("alg"),
            pyjwk.key,
        )
        if key.kid is None:
            without_kid.append(key)
        else:
            by_kid[key.kid] = key
    return KeySet(by_kid, tuple(without_kid))


class KeySource(Protocol):
    def current(self) -> KeySet: ...

    def refresh_for_unknown_kid(self) -> KeySet: ...


class StaticKeys:
    """Keys from a JWKS file, read once at start."""

    def __init__(self, path: Path) -> None:
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise JwksError(f"{path}: cannot read the JWKS: {exc}") from None
        try:
            self._keys = parse_jwks(document)
        except JwksError as exc:
            raise JwksError(f"{path}: {exc}") from None

    def current(self) -> KeySet:
        return self._keys

    def refresh_for_unknown_kid(self) -> KeySet:
        return self._keys


def http_get_json(url: str, timeout: float) -> Any:
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read(1024 * 1024))


# A busy gateway refreshes a remote key set in the background once it is this fraction of
# `jwks_refresh` old, so that its checks never wait for the refresh that judging needs at 100%.
EARLY_REFRESH = 0.8


class RemoteKeys:
    """Keys from a `jwks_uri`, or found by OIDC discovery.

    A key set older than `refresh_every` is refreshed before it is used to judge a token (the
    caller waits at most `timeout`), so a key the issuer has withdrawn stops verifying on the
    first check after an idle period. From `EARLY_REFRESH` of that age on, checks start the
    refresh in the background and do not wait. After a failed attempt, the keys in hand are
    used until `cooldown` has passed. Concurrent checks share one fetch.
    """

    def __init__(
        self,
        issuer: str,
        *,
        jwks_uri: str | None,
        discovery: bool,
        timeout: float,
        refresh_every: float,
        cooldown: float,
        clock: Callable[[], float] = time.monotonic,
        fetch: Callable[[str, float], Any] = http_get_json,
        observer: Observer = NO_OBSERVER,
    ) -> None:
        self.issuer = issuer
        self._observer = observer
        self._jwks_uri = jwks_uri
        self._discovery = discovery
        self._timeout = timeout
        self._refresh_every = refresh_every
        self._refresh_early = refresh_every * EARLY_REFRESH
        self._cooldown = cooldown
        self._clock = clock
        self._fetch = fetch
        self._keys = EMPTY_KEYS
        self._fetched_at: float | None = None
        self._last_attempt = -float("inf")
        self._lock = threading.Lock()  # held for the whole of a fetch
        self._refresh_lock = threading.Lock()  # held only to start a refresh thread
        self._refresh: threading.Thread | None = None
        self._overran: threading.Thread | None = None  # a refresh that outlasted a check's wait

    @property
    def loaded(self) -> bool:
        return self._fetched_at is not None

    def _resolve_uri(self) -> str:
        if self._jwks_uri:
            return self._jwks_uri
        config = self._fetch(self.issuer.rstrip("/") + "/.well-known/openid-configuration", self._timeout)
        uri = config.get("jwks_uri") if isinstance(config, dict) else None
        if not isinstance(uri, str):
            raise JwksError("OIDC discovery document has no jwks_uri")
        if config.get("issuer") != self.issuer:
            raise JwksError("OIDC discovery document names another issuer")
        self._jwks_uri = uri
        return uri

    def fetch_now(self, *, only_if_due: bool = False) -> bool:
        """One fetch attempt; keeps the old keys on failure. Returns whether it succeeded."""
        with self._lock:
            if only_if_due and self._clock() - self._last_attempt < self._cooldown:
                return False  # a concurrent check fetched while this one waited for the lock
            self._last_attempt = self._clock()
            attributes = {"issuer": self.issuer}
            with self._observer.operation("jwks.fetch", {"authz.issuer": self.issuer}) as fetch:
                try:
                    keys = parse_jwks(self._fetch(self._resolve_uri(), self._timeout))
                except Exception as exc:
                    fetch.failed(exc)
                    self._observer.count("authz_jwks_refreshes", {**attributes, "result": "failure"})
                    log.warning("JWKS fetch for %s failed: %s", self.issuer, exc)
                    return False
            self._keys = keys
            self._fetched_at = self._clock()
            self._observer.count("authz_jwks_refreshes", {**attributes, "result": "success"})
            return True

    def current(self) -> KeySet:
        fetched_at = self._fetched_at
        if fetched_at is not None:
            age = self._clock() - fetched_at
            if age > self._refresh_early:
                refresh = self._start_refresh(self._refresh_early)
                if refresh is not None and age > self._refresh_every and refresh is not self._overran:
                    # Stale: judge with what the issuer publishes now, not with what it did.
                    refresh.join(self._timeout)
                    if refresh.is_alive():
                        # Counted as a failed attempt: later checks use the keys in hand, not wait.
                        self._overran = refresh
        return self._keys

    def _start_refresh(self, older_than: float) -> threading.Thread | None:
        """The refresh in progress, or one started now if the keys are still older than
        `older_than` and the cooldown allows; None if no refresh runs."""
        with self._refresh_lock:
            refresh = self._refresh
            if refresh is not None and refresh.is_alive():
                return refresh
            fetched_at = self._fetched_at
            if fetched_at is not None and self._clock() - fetched_at <= older_than:
                return None  # another check refreshed them while this one waited for the lock
            if self._clock() - self._last_attempt < self._cooldown:
                return None  # an attempt failed a moment ago: use the keys in hand
            refresh = threading.Thread(
                target=self.fetch_now, kwargs={"only_if_due": True}, name="jwks-refresh", daemon=True
            )
            refresh.start()
            self._refresh = refresh
            return refresh

    def refresh_for_unknown_kid(self) -> KeySet:
        # Before any keys arrived, a check waits on the lock for the fetch in flight (the start-up
        # fetch) rather than judge with none; with no fetch in flight, the cooldown still holds.
        if self._fetched_at is None or self._clock() - self._last_attempt >= self._cooldown:
            self.fetch_now(only_if_due=True)
        return self._keys
