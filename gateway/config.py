"""The configuration file: YAML in, typed and validated dataclasses out.

Every error names the file and the dotted key, and is raised before anything serves.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

from gateway.yaml_reader import Kind, YamlError, load, locate, wrong_type

DEFAULT_LISTEN = "127.0.0.1:9191"
DEFAULT_ALGORITHMS = ("RS256", "ES256", "EdDSA")
ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
# Accepted JOSE `typ` headers (RFC 8725 §3.11, RFC 9068 §4); "" stands for a token without `typ`.
DEFAULT_TOKEN_TYPES = ("", "JWT", "at+jwt")
# A media type name as `typ` may carry it (RFC 7515 §4.1.9): "subtype" or "type/subtype", no parameters.
_TOKEN_TYPE = re.compile(r"[A-Za-z0-9!#$&^_.+-]+(/[A-Za-z0-9!#$&^_.+-]+)?")
# A DPoP proof (RFC 9449) is never an access token, whatever the configuration says.
DPOP_PROOF_TYPE = "application/dpop+jwt"
# RFC 9449 §4.3: asymmetric algorithms only; these are what the proof's `alg` may be by default.
DEFAULT_DPOP_ALGORITHMS = ("ES256", "RS256", "PS256", "EdDSA")
_MIN_NONCE_KEY_BYTES = 32


def token_type_key(typ: str) -> str:
    """A `typ` value in the form it is compared in: lower case, with the `application/` prefix that
    RFC 7515 §4.1.9 says a value without a "/" implies ("at+jwt" and "application/AT+JWT" are equal)."""
    typ = typ.lower()
    return typ if "/" in typ else "application/" + typ


class ConfigError(Exception):
    """A configuration problem, already phrased for the operator (file and key included).

    `keys` is the path of the key at fault (empty when none is), so that a file's error can be
    located `file:line:col` once the file's nodes are at hand (`load_config`)."""

    def __init__(
        self, message: str, keys: tuple[str, ...] = (), detail: str = "", on_key: bool = False
    ) -> None:
        super().__init__(message)
        self.keys = keys
        self.detail = detail or message
        self.on_key = on_key


@dataclass(frozen=True, slots=True)
class IssuerConfig:
    issuer: str
    audiences: tuple[str, ...]
    algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS
    jwks_file: Path | None = None
    jwks_uri: str | None = None
    discovery: bool = False
    token_types: tuple[str, ...] = DEFAULT_TOKEN_TYPES


@dataclass(frozen=True, slots=True)
class DpopConfig:
    """DPoP proofs (RFC 9449). A token whose `cnf.jkt` is set is always verified with a proof;
    these keys only tune it."""

    algorithms: tuple[str, ...] = DEFAULT_DPOP_ALGORITHMS
    max_age: float = 60.0  # a proof's iat may be this old (plus auth.leeway)
    max_proof_bytes: int = 8 * 1024
    max_jti_length: int = 256
    required: bool = False  # true: plain Bearer tokens are refused altogether
    public_url: str | None = None  # the external base of htu when TLS ends in front of Envoy
    nonce: bool = False  # RFC 9449 §8 server nonces, derived from nonce_key and the time
    nonce_key: str | None = field(default=None, repr=False)
    nonce_lifetime: float = 300.0


@dataclass(frozen=True, slots=True)
class AuthConfig:
    issuers: tuple[IssuerConfig, ...] = ()
    leeway: float = 30.0
    allow_anonymous: bool = False
    resource_metadata: str | None = None
    realm: str = "authz-gateway"
    token_cache_size: int = 10_000
    max_token_bytes: int = 16 * 1024
    max_token_lifetime: float = 24 * 3600.0
    jwks_refresh: float = 300.0
    jwks_cooldown: float = 30.0
    jwks_timeout: float = 2.0
    upstream_headers: bool = True
    dpop: DpopConfig = field(default_factory=DpopConfig)


@dataclass(frozen=True, slots=True)
class SessionConfig:
    ttl: float = 24 * 3600.0
    idle_timeout: float = 3600.0
    max_per_identity: int = 100
    max_id_length: int = 256
    key_prefix: str = "authz:session:"
    store_timeout: float = 0.25
    max_sessions: int = 1_000_000
    # When a session id is bound: `first_use` (the first request that presents it) or `response`
    # (the upstream's response that issues it, seen through Envoy's ext_proc; docs/sessions.md).
    bind_on: str = "first_use"


@dataclass(frozen=True, slots=True)
class HandlesConfig:
    """Handles (MCP 2026-07-28): kept in the session store's backend, in a key space of their own."""

    # How long a handle lives (a kind's own `ttl` may be shorter, never longer).
    ttl: float = 24 * 3600.0
    # How long past its ttl an expired handle is still kept, refused to everyone (its owner
    # too) whatever the kind's `unknown` says; after it the value is forgotten. The config file's
    # default is its `ttl` (`_handles`); built in code, it is this fixed day unless given.
    expired_retention: float = 24 * 3600.0
    max_id_length: int = 256
    key_prefix: str = "authz:handle:"
    # The largest response (or SSE event) read for a handle; a larger one is refused (502).
    max_response_bytes: int = 1024 * 1024
    # Live handles one identity may hold: a caller minting without end cannot fill the store.
    max_per_identity: int = 10_000

BIND_ON_FIRST_USE = "first_use"
BIND_ON_RESPONSE = "response"

# What the official MCP Python SDK (mcp 2.3, streamable HTTP) answers, with HTTP 404, for a
# session id it does not know: a JSON-RPC error without a request id. The gateway's session
# refusals default to these exact bytes, so that through Envoy a session that belongs to someone
# else cannot be told from one that never existed (the MCP server answers that one itself).
MCP_SDK_SESSION_NOT_FOUND_BODY = (
    '{"jsonrpc":"2.0","id":null,"error":{"code":-32600,"message":"Session not found"}}'
)
MAX_RESPONSE_BODY_BYTES = 4096
# RFC 9110 media type: type "/" subtype, then optional parameters.
_MEDIA_TYPE = re.compile(r"[A-Za-z0-9!#$&^_.+-]+/[A-Za-z0-9!#$&^_.+-]+( *; *[ -~]*)?")


@dataclass(frozen=True, slots=True)
class FixedResponse:
    """A response the gateway always answers with the same bytes."""

    content_type: str
    body: str


@dataclass(frozen=True, slots=True)
class ResponsesConfig:
    # Every 404 the gateway sends for a session (ended, expired, legacy, or bound to another
    # identity). Match it to what your MCP server answers for an unknown Mcp-Session-Id.
    session_not_found: FixedResponse = field(
        default_factory=lambda: FixedResponse("application/json", MCP_SDK_SESSION_NOT_FOUND_BODY)
    )


@dataclass(frozen=True, slots=True)
class TelemetryConfig:
    metrics_listen: str | None = None
    record_subject: bool = False
    subject_hash_key: str | None = None
    decision_log: bool = False
    # false: the plain OTel SDK throughout, none of the hooks in gateway/telemetry/fast_path.py
    fast_path: bool = True


DEFAULT_ADMIN_SCOPE = "authz-gateway:admin"


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """The admin API (gateway/admin.py). When `listen` is set, every call is authenticated:
    by a client certificate signed by `client_ca` (mTLS), by a bearer token of `token_issuer`
    carrying `token_scope`, or, when both are configured, by both."""

    listen: str | None = None
    tls_cert: Path | None = None  # the admin server's certificate chain (PEM)
    tls_key: Path | None = None  # its private key (PEM)
    client_ca: Path | None = None  # mTLS: clients present a certificate signed by this CA (PEM)
    token_issuer: str | None = None  # bearer: one of auth.issuers[].issuer
    token_scope: str = DEFAULT_ADMIN_SCOPE

    @property
    def mtls(self) -> bool:
        return self.client_ca is not None

    @property
    def bearer(self) -> bool:
        return self.token_issuer is not None


@dataclass(frozen=True, slots=True)
class Config:
    listen: str = DEFAULT_LISTEN
    policies: Path | None = None
    store: str = "memory://"
    engine: str = "cel"
    workers: int = 1
    max_request_bytes: int = 64 * 1024
    max_process_streams: int = 256
    shutdown_grace: float = 10.0
    reload_debounce: float = 0.3
    # A policy set without a single enforcing policy protects nothing: refused unless this says so.
    allow_no_enforcing_policy: bool = False
    auth: AuthConfig = field(default_factory=AuthConfig)
    session: SessionConfig = field(default_factory=SessionConfig)
    handles: HandlesConfig = field(default_factory=HandlesConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    responses: ResponsesConfig = field(default_factory=ResponsesConfig)
    source: Path | None = None

    def with_overrides(self, **changes: Any) -> Config:
        present = {k: v for k, v in changes.items() if v is not None}
        return replace(self, **present)


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: object) -> float:
    """'30s', '250ms', '1h', '24h', or a bare number of seconds."""
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ValueError(f"not a duration: {value!r} (use e.g. 250ms, 30s, 5m, 1h)")
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if seconds < 0:
        raise ValueError(f"a duration cannot be negative: {value!r}")
    return seconds


def parse_hostport(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not (0 <= int(port) <= 65535):
        raise ValueError(f"not HOST:PORT: {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


class _Reader:
    """Walks one mapping of the config, remembering the dotted path for error messages.

    The values are plain data (a file's, built by gateway.yaml_reader, or a mapping handed to
    config_from_mapping), checked with the type phrases the other YAML readers use.
    """

    def __init__(self, source: str, path: str, data: object) -> None:
        self.source = source
        self.path = path
        if data is None:
            data = {}
        if wrong := wrong_type(data, "mapping"):
            raise self.error(wrong)
        self.data: Mapping[str, Any] = cast(Mapping[str, Any], data)
        self.seen: set[str] = set()

    def error(self, message: str, key: str | None = None, on_key: bool = False) -> ConfigError:
        keys = tuple(p for p in (*self.path.split("."), key) if p)
        detail = f"{'.'.join(keys[:-1] if on_key else keys) or '(top level)'}: {message}"
        return ConfigError(f"{self.source}: {detail}", keys, detail, on_key)

    def get(self, key: str, default: Any = None) -> Any:
        self.seen.add(key)
        return self.data.get(key, default)

    def has(self, key: str) -> bool:
        return key in self.data

    def typed(self, key: str, default: Any, kind: Kind, minimum: int | None = None) -> Any:
        """The value at `key`, which must be of `kind` (gateway.yaml_reader.wrong_type)."""
        value = self.get(key, default)
        if wrong := wrong_type(value, kind, minimum):
            raise self.error(wrong, key)
        return value

    def string(self, key: str, default: str | None = None) -> str | None:
        value = self.get(key, default)
        if value is not None and (wrong := wrong_type(value, "string")):
            raise self.error(wrong, key)
        return cast(str | None, value)

    def boolean(self, key: str, default: bool) -> bool:
        return cast(bool, self.typed(key, default, "boolean"))

    def integer(self, key: str, default: int, minimum: int = 0) -> int:
        return cast(int, self.typed(key, default, "integer", minimum))

    def duration(self, key: str, default: float) -> float:
        if not self.has(key):
            self.seen.add(key)
            return default
        try:
            return parse_duration(self.get(key))
        except ValueError as exc:
            raise self.error(str(exc), key) from None

    def strings(self, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = self.get(key, list(default))
        if isinstance(value, str):
            value = [value]
        if wrong := wrong_type(value, "strings"):
            raise self.error(wrong, key)
        return tuple(value)

    def child(self, key: str) -> _Reader:
        return _Reader(self.source, ".".join(p for p in (self.path, key) if p), self.get(key))

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.seen)
        if unknown:
            raise self.error(f"unknown key {unknown[0]!r}", unknown[0], on_key=True)


def _issuer(reader: _Reader, base: Path) -> IssuerConfig:
    issuer = reader.string("issuer")
    if not issuer:
        raise reader.error("is required", "issuer")
    audiences = reader.strings("audiences", ())
    if not audiences:
        raise reader.error("must name at least one audience", "audiences")
    algorithms = reader.strings("algorithms", DEFAULT_ALGORITHMS)
    for alg in algorithms:
        if alg not in ASYMMETRIC_ALGORITHMS:
            raise reader.error(
                f"algorithm {alg!r} is not allowed "
                f"(asymmetric only: {', '.join(sorted(ASYMMETRIC_ALGORITHMS))})",
                "algorithms",
            )
    token_types = reader.strings("token_types", DEFAULT_TOKEN_TYPES)
    if not token_types:
        raise reader.error('must name at least one type ("" for a token without typ)', "token_types")
    for typ in token_types:
        if typ and not _TOKEN_TYPE.fullmatch(typ):
            raise reader.error(f"not a media type: {typ!r}", "token_types")
        if typ and token_type_key(typ) == DPOP_PROOF_TYPE:
            raise reader.error(f"{typ!r} is a DPoP proof, never an access token", "token_types")
    jwks_file_raw = reader.string("jwks_file")
    jwks_uri = reader.string("jwks_uri")
    discovery = reader.boolean("discovery", False)
    sources = sum(bool(x) for x in (jwks_file_raw, jwks_uri, discovery))
    if sources != 1:
        raise reader.error("set exactly one of jwks_file, jwks_uri or discovery: true")
    jwks_file = None
    if jwks_file_raw:
        jwks_file = (base / jwks_file_raw).resolve()
        if not jwks_file.is_file():
            raise reader.error(f"JWKS file not found: {jwks_file}", "jwks_file")
    reader.finish()
    return IssuerConfig(issuer, audiences, algorithms, jwks_file, jwks_uri, discovery, token_types)


def _auth(reader: _Reader, base: Path) -> AuthConfig:
    defaults = AuthConfig()
    raw_issuers = reader.typed("issuers", [], "list")
    issuers = tuple(
        _issuer(_Reader(reader.source, f"{reader.path}.issuers[{i}]", item), base)
        for i, item in enumerate(raw_issuers)
    )
    names = [i.issuer for i in issuers]
    if len(set(names)) != len(names):
        raise reader.error("the same issuer is configured twice", "issuers")
    auth = AuthConfig(
        issuers=issuers,
        leeway=reader.duration("leeway", defaults.leeway),
        allow_anonymous=reader.boolean("allow_anonymous", defaults.allow_anonymous),
        resource_metadata=reader.string("resource_metadata"),
        realm=reader.string("realm", defaults.realm) or defaults.realm,
        token_cache_size=reader.integer("token_cache_size", defaults.token_cache_size),
        max_token_bytes=reader.integer("max_token_bytes", defaults.max_token_bytes, 1),
        max_token_lifetime=reader.duration("max_token_lifetime", defaults.max_token_lifetime),
        jwks_refresh=reader.duration("jwks_refresh", defaults.jwks_refresh),
        jwks_cooldown=reader.duration("jwks_cooldown", defaults.jwks_cooldown),
        jwks_timeout=reader.duration("jwks_timeout", defaults.jwks_timeout),
        upstream_headers=reader.boolean("upstream_headers", defaults.upstream_headers),
        dpop=_dpop(reader.child("dpop")),
    )
    for key in ("leeway", "max_token_lifetime", "jwks_refresh", "jwks_cooldown", "jwks_timeout"):
        if not math.isfinite(getattr(auth, key)):  # YAML .inf and .nan are floats too
            raise reader.error("must be a finite duration", key)
    if auth.max_token_lifetime <= 0:
        raise reader.error("must be longer than 0s", "max_token_lifetime")
    reader.finish()
    return auth


def _dpop(reader: _Reader) -> DpopConfig:
    d = DpopConfig()
    algorithms = reader.strings("algorithms", d.algorithms)
    if not algorithms:
        raise reader.error("must name at least one algorithm", "algorithms")
    for alg in algorithms:
        if alg not in ASYMMETRIC_ALGORITHMS:
            raise reader.error(
                f"algorithm {alg!r} is not allowed "
                f"(asymmetric only: {', '.join(sorted(ASYMMETRIC_ALGORITHMS))})",
                "algorithms",
            )
    public_url = reader.string("public_url")
    dpop = DpopConfig(
        algorithms=algorithms,
        max_age=reader.duration("max_age", d.max_age),
        max_proof_bytes=reader.integer("max_proof_bytes", d.max_proof_bytes, 256),
        max_jti_length=reader.integer("max_jti_length", d.max_jti_length, 16),
        required=reader.boolean("required", d.required),
        public_url=public_url or None,
        nonce=reader.boolean("nonce", d.nonce),
        nonce_key=reader.string("nonce_key") or None,
        nonce_lifetime=reader.duration("nonce_lifetime", d.nonce_lifetime),
    )
    for key in ("max_age", "nonce_lifetime"):
        value = getattr(dpop, key)
        if not math.isfinite(value) or value <= 0:
            raise reader.error("must be a finite duration longer than 0s", key)
    if dpop.public_url is not None:
        parts = urlsplit(dpop.public_url)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
            raise reader.error("must be an http(s) URL without query or fragment, e.g. https://mcp.example.com",
                               "public_url")
        if parts.username is not None or parts.password is not None:
            raise reader.error("must not carry user information", "public_url")
        try:
            parts.port  # noqa: B018 - raises on a port that is not a number
        except ValueError:
            raise reader.error("has a port that is not a number", "public_url") from None
    if dpop.nonce and (dpop.nonce_key is None or len(dpop.nonce_key.encode()) < _MIN_NONCE_KEY_BYTES):
        # The key is never echoed: only its required length is.
        raise reader.error(
            f"nonce: true needs nonce_key, a secret of at least {_MIN_NONCE_KEY_BYTES} bytes shared by every "
            "replica", "nonce_key",
        )
    if dpop.nonce_key is not None and not dpop.nonce:
        raise reader.error("has no effect without nonce: true", "nonce_key")
    reader.finish()
    return dpop


def _session(reader: _Reader) -> SessionConfig:
    d = SessionConfig()
    session = SessionConfig(
        ttl=reader.duration("ttl", d.ttl),
        idle_timeout=reader.duration("idle_timeout", d.idle_timeout),
        max_per_identity=reader.integer("max_per_identity", d.max_per_identity, 1),
        max_id_length=reader.integer("max_id_length", d.max_id_length, 1),
        key_prefix=reader.string("key_prefix", d.key_prefix) or d.key_prefix,
        store_timeout=reader.duration("store_timeout", d.store_timeout),
        max_sessions=reader.integer("max_sessions", d.max_sessions, 1),
        bind_on=reader.string("bind_on", d.bind_on) or "",
    )
    # ttl 0 would drop a terminated session's tombstone at once (under first_use anyone could bind
    # the id again), store_timeout 0 would fail every store call: each must be longer than 0s.
    for key in ("ttl", "idle_timeout", "store_timeout"):
        value = getattr(session, key)
        if not math.isfinite(value) or value <= 0:
            raise reader.error("must be a finite duration longer than 0s", key)
    if session.bind_on not in (BIND_ON_FIRST_USE, BIND_ON_RESPONSE):
        raise reader.error(f"must be {BIND_ON_FIRST_USE} or {BIND_ON_RESPONSE}", "bind_on")
    reader.finish()
    return session


def _handles(reader: _Reader) -> HandlesConfig:
    d = HandlesConfig()
    ttl = reader.duration("ttl", d.ttl)
    handles = HandlesConfig(
        ttl=ttl,
        expired_retention=reader.duration("expired_retention", ttl),
        max_id_length=reader.integer("max_id_length", d.max_id_length, 1),
        key_prefix=reader.string("key_prefix", d.key_prefix) or d.key_prefix,
        max_response_bytes=reader.integer("max_response_bytes", d.max_response_bytes, 1024),
        max_per_identity=reader.integer("max_per_identity", d.max_per_identity, 1),
    )
    if not math.isfinite(handles.ttl) or handles.ttl <= 0:
        raise reader.error("must be a finite duration longer than 0s", "ttl")
    if not math.isfinite(handles.expired_retention):  # parse_duration refuses negative ones
        raise reader.error("must be finite", "expired_retention")
    reader.finish()
    return handles


def _telemetry(reader: _Reader) -> TelemetryConfig:
    telemetry = TelemetryConfig(
        metrics_listen=reader.string("metrics_listen"),
        record_subject=reader.boolean("record_subject", False),
        subject_hash_key=reader.string("subject_hash_key"),
        decision_log=reader.boolean("decision_log", False),
        fast_path=reader.boolean("fast_path", True),
    )
    if telemetry.metrics_listen:
        try:
            parse_hostport(telemetry.metrics_listen)
        except ValueError as exc:
            raise reader.error(str(exc), "metrics_listen") from None
    reader.finish()
    return telemetry


def _fixed_response(reader: _Reader, default: FixedResponse) -> FixedResponse:
    content_type = reader.string("content_type", default.content_type)
    body = reader.string("body", default.body)
    if content_type is None:
        raise reader.error("must be a string", "content_type")
    if body is None:
        raise reader.error("must be a string (use '' for an empty body)", "body")
    if not _MEDIA_TYPE.fullmatch(content_type) or content_type != content_type.strip():
        raise reader.error(f"not a media type for a content-type header: {content_type!r}", "content_type")
    if len(body.encode("utf-8")) > MAX_RESPONSE_BODY_BYTES:
        raise reader.error(f"must be at most {MAX_RESPONSE_BODY_BYTES} bytes", "body")
    media_type = content_type.partition(";")[0].strip().lower()
    if media_type == "application/json" or media_type.endswith("+json"):
        try:
            json.loads(body)
        except ValueError as exc:
            raise reader.error(f"is not valid JSON, but content_type says it is: {exc}", "body") from None
    reader.finish()
    return FixedResponse(content_type, body)


def _responses(reader: _Reader) -> ResponsesConfig:
    d = ResponsesConfig()
    responses = ResponsesConfig(
        session_not_found=_fixed_response(reader.child("session_not_found"), d.session_not_found),
    )
    reader.finish()
    return responses


def is_loopback_listen(listen: str) -> bool:
    """Whether an admin.listen address stays on this host (":PORT" binds 127.0.0.1)."""
    host = listen.rpartition(":")[0].strip("[]")
    if not host or host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def _admin_file(reader: _Reader, base: Path, key: str) -> Path | None:
    raw = reader.string(key)
    if not raw:
        return None
    path = (base / raw).resolve()
    if not path.is_file():
        raise reader.error(f"file not found: {path}", key)
    return path


def _admin(reader: _Reader, base: Path) -> AdminConfig:
    listen = reader.string("listen")
    if listen:
        try:
            parse_hostport(listen)
        except ValueError as exc:
            raise reader.error(str(exc), "listen") from None
    token_scope = reader.string("token_scope", DEFAULT_ADMIN_SCOPE)
    admin = AdminConfig(
        listen=listen or None,
        tls_cert=_admin_file(reader, base, "tls_cert"),
        tls_key=_admin_file(reader, base, "tls_key"),
        client_ca=_admin_file(reader, base, "client_ca"),
        token_issuer=reader.string("token_issuer") or None,
        token_scope=token_scope or "",
    )
    if (admin.tls_cert is None) != (admin.tls_key is None):
        raise reader.error("set both tls_cert and tls_key (the admin server's certificate chain and key)")
    if admin.client_ca is not None and admin.tls_cert is None:
        raise reader.error("needs tls_cert and tls_key: client certificates are checked in TLS", "client_ca")
    if not admin.token_scope or any(c.isspace() for c in admin.token_scope):
        raise reader.error("must be one scope (not empty, no spaces)", "token_scope")
    if reader.has("token_scope") and not admin.bearer:
        raise reader.error("has no effect without token_issuer", "token_scope")
    if admin.listen and not (admin.mtls or admin.bearer):
        raise reader.error(
            "the admin API needs authentication: set client_ca (with tls_cert and tls_key) for client "
            "certificates, or token_issuer (one of auth.issuers) for bearer tokens with token_scope",
            "listen",
        )
    if admin.listen and admin.bearer and admin.tls_cert is None and not is_loopback_listen(admin.listen):
        raise reader.error(
            f"bearer tokens without TLS only on a loopback address, not {admin.listen}: a token sent in "
            "clear over a network is a secret leaked (set tls_cert and tls_key, or listen on 127.0.0.1)",
            "token_issuer",
        )
    reader.finish()
    return admin


def _check_admin_issuer(config: Config, top: _Reader) -> None:
    """admin.token_issuer must be a configured issuer: its tokens are verified with its keys."""
    issuer = config.admin.token_issuer
    known = [i.issuer for i in config.auth.issuers]
    if issuer is not None and issuer not in known:
        configured = ", ".join(repr(i) for i in known) or "none"
        raise top.child("admin").error(
            f"{issuer!r} is not one of auth.issuers (configured: {configured})", "token_issuer"
        )


def config_from_mapping(data: object, source: str = "<config>", base: Path | None = None) -> Config:
    base = base or Path.cwd()
    top = _Reader(source, "", data)
    d = Config()
    listen = top.string("listen", d.listen) or d.listen
    try:
        parse_hostport(listen)
    except ValueError as exc:
        raise top.error(str(exc), "listen") from None
    policies_raw = top.string("policies")
    engine = top.string("engine", d.engine) or d.engine
    if engine not in ("cel", "celpy"):
        raise top.error("must be 'cel' (cel-expr-python) or 'celpy' (cel-python)", "engine")
    config = Config(
        listen=listen,
        policies=(base / policies_raw).resolve() if policies_raw else None,
        store=top.string("store", d.store) or d.store,
        engine=engine,
        workers=top.integer("workers", d.workers, 1),
        max_request_bytes=top.integer("max_request_bytes", d.max_request_bytes, 1024),
        max_process_streams=top.integer("max_process_streams", d.max_process_streams, 1),
        shutdown_grace=top.duration("shutdown_grace", d.shutdown_grace),
        reload_debounce=top.duration("reload_debounce", d.reload_debounce),
        allow_no_enforcing_policy=top.boolean("allow_no_enforcing_policy", d.allow_no_enforcing_policy),
        auth=_auth(top.child("auth"), base),
        session=_session(top.child("session")),
        handles=_handles(top.child("handles")),
        telemetry=_telemetry(top.child("telemetry")),
        admin=_admin(top.child("admin"), base),
        responses=_responses(top.child("responses")),
        source=Path(source) if source != "<config>" else None,
    )
    # 0s is meaningful for both: no grace (in-flight checks are cancelled at once), and a reload on
    # the first quiet poll after a change. Only an endless wait is refused.
    for key in ("shutdown_grace", "reload_debounce"):
        if not math.isfinite(getattr(config, key)):
            raise top.error("must be a finite duration", key)
    _check_admin_issuer(config, top)
    _check_handle_prefix(config, top)
    top.finish()
    return config


def _check_handle_prefix(config: Config, top: _Reader) -> None:
    # A session id may hold ':', so one prefix inside the other would let a session id name a handle.
    sessions, handles = config.session.key_prefix, config.handles.key_prefix
    if sessions.startswith(handles) or handles.startswith(sessions):
        raise top.child("handles").error(f"must not overlap session.key_prefix {sessions!r}", "key_prefix")


def load_config(path: str | Path) -> Config:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror}") from None
    try:
        node, data = load(str(path), text)
    except YamlError as exc:
        raise ConfigError(str(exc)) from None
    try:
        return config_from_mapping(data, str(path), path.parent.resolve())
    except ConfigError as exc:
        if node is None:
            raise
        position = locate(str(path), node, exc.keys, exc.on_key)
        raise ConfigError(f"{position}: {exc.detail}", exc.keys, exc.detail, exc.on_key) from None
