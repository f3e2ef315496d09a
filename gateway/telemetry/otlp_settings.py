"""Where and how one signal is exported over OTLP, from the standard OTEL_EXPORTER_OTLP_* variables.

Read as the OTel Python SDK's own exporters read them, with the same defaults, except for the
endpoint:

- PROTOCOL: `grpc` (default) or `http/protobuf`.
- ENDPOINT: the signal's (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is used as it is; else the
  general one, to which HTTP adds `/v1/traces` or `/v1/metrics`. No default in effect: setup.py
  exports a signal only once one of the two is set (docs/telemetry.md: nothing is exported until
  an OTLP endpoint is set).
- gRPC TLS: on for an `https` endpoint; otherwise off when `…_INSECURE` (the signal's, else
  the general) is `true`, on when it is set to anything else, and when unset, off exactly for
  an `http` endpoint. HTTP: TLS for `https` URLs.
- CERTIFICATE, CLIENT_KEY, CLIENT_CERTIFICATE: files for TLS (the signal's, else the general).
- HEADERS: `key=value,key2=value2`, URL-decoded, keys lower-cased (the signal's, else the general).
  An entry whose key is not a header token, or ends in `-bin` (gRPC binary metadata), or whose
  decoded value holds anything but printable ASCII (CR, LF, NUL, other controls, non-ASCII) is
  skipped with a warning that quotes no value: such a value would break the request, and the
  error could quote it.
- TIMEOUT: seconds per export, retries included (default 10).
- COMPRESSION: `gzip` or `none` (default).

An endpoint the exporters cannot use raises UnusableSettings (setup.py logs it as one error
line and leaves that signal off): for HTTP, anything but an http:// or https:// URL with a host
(the SDK's exporter refuses those too; `collector:4318` would otherwise read as the scheme
`collector`, i.e. plaintext to localhost:80); for gRPC, no host (the scheme is optional, as in
the SDK; `unix:`, `dns:` and the other gRPC target schemes pass as they are). `user:password@`
in an endpoint is not sent (a warning says so, without the password): credentials belong in
HEADERS.

Header values can hold credentials: nothing here logs them, and OtlpSettings leaves them out of
its repr.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import unquote, urlsplit, urlunsplit

log = logging.getLogger(__name__)

Signal = Literal["TRACES", "METRICS"]
GRPC, HTTP = "grpc", "http/protobuf"
DEFAULT_GRPC_ENDPOINT = "http://localhost:4317"
DEFAULT_HTTP_ENDPOINT = "http://localhost:4318"
DEFAULT_TIMEOUT_S = 10.0
HTTP_PATHS: dict[Signal, str] = {"TRACES": "v1/traces", "METRICS": "v1/metrics"}
GRPC_METHODS: dict[Signal, str] = {
    "TRACES": "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
    "METRICS": "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export",
}
_HEADER_SEPARATOR = re.compile(r"[ \t]*,[ \t]*")
_HEADER_KEY = re.compile(r"[!#$%&'*+\-.^_`|~0-9a-z]+")  # a token (RFC 9110), lower case
_HEADER_VALUE = re.compile(r"[\x20-\x7e]*")  # printable ASCII: what both HTTP/1.1 and gRPC carry
# gRPC targets that are not host:port (grpc/doc/naming.md).
_GRPC_TARGET_SCHEMES = ("dns:", "unix:", "unix-abstract:", "vsock:", "ipv4:", "ipv6:")


class UnusableSettings(ValueError):
    """An OTLP setting the exporters cannot work with; the message quotes no credential."""


@dataclass(frozen=True)
class OtlpSettings:
    signal: Signal
    protocol: str  # GRPC or HTTP
    # gRPC: the channel target (host:port); HTTP: the full URL of the signal's path.
    target: str
    tls: bool
    timeout_s: float
    headers: tuple[tuple[str, str], ...] = field(repr=False)
    compression: str | None = None  # "gzip" or None
    certificate: str | None = None
    client_key: str | None = field(default=None, repr=False)
    client_certificate: str | None = None

    @property
    def destination(self) -> str:
        """The endpoint for logs and errors: no userinfo, no query (both can hold secrets)."""
        if self.protocol == GRPC:
            return self.target.rpartition("@")[2]
        parts = urlsplit(self.target)
        return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"


def _get(env: Mapping[str, str], signal: Signal, name: str) -> str:
    """The signal's variable if set (non-empty), else the general one; "" when neither is."""
    found = env.get(f"OTEL_EXPORTER_OTLP_{signal}_{name}") or env.get(f"OTEL_EXPORTER_OTLP_{name}")
    return (found or "").strip()


def protocol(env: Mapping[str, str], signal: Signal) -> str:
    found = _get(env, signal, "PROTOCOL").lower() or GRPC
    if found not in (GRPC, HTTP):
        log.warning("telemetry: OTLP protocol %r is not supported, %s is used", found, GRPC)
        return GRPC
    return found


def parse_headers(text: str) -> tuple[tuple[str, str], ...]:
    """`key=value` pairs separated by commas, URL-decoded; a malformed entry is skipped (and
    not quoted in the warning: it may hold a credential)."""
    headers: dict[str, str] = {}
    for entry in _HEADER_SEPARATOR.split(text.strip()):
        if not entry:
            continue
        name, equals, value = entry.partition("=")
        name = unquote(name).strip().lower()
        if not equals or not _HEADER_KEY.fullmatch(name):
            log.warning(
                "telemetry: an OTEL_EXPORTER_OTLP_*HEADERS entry is not key=value with a header "
                "name as key; ignored"
            )
            continue
        if name.endswith("-bin"):
            log.warning("telemetry: OTLP header %s ignored: binary (-bin) headers are not supported", name)
            continue
        decoded = unquote(value).strip()
        if not _HEADER_VALUE.fullmatch(decoded):
            log.warning(
                "telemetry: OTLP header %s ignored: its value holds a character a header cannot "
                "carry (only printable ASCII can be sent)",
                name,
            )
            continue
        headers[name] = decoded
    return tuple(headers.items())


def _timeout(env: Mapping[str, str], signal: Signal) -> float:
    raw = _get(env, signal, "TIMEOUT")
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        log.warning("telemetry: OTLP timeout %r is not seconds > 0; %ss used", raw, DEFAULT_TIMEOUT_S)
        return DEFAULT_TIMEOUT_S
    return value


def _compression(env: Mapping[str, str], signal: Signal) -> str | None:
    raw = _get(env, signal, "COMPRESSION").lower()
    if raw in ("", "none"):
        return None
    if raw != "gzip":
        log.warning("telemetry: OTLP compression %r is not supported (gzip or none); none is used", raw)
        return None
    return raw


def _grpc_tls(env: Mapping[str, str], signal: Signal, scheme: str) -> bool:
    if scheme == "https":
        return True
    insecure = (env.get(f"OTEL_EXPORTER_OTLP_{signal}_INSECURE") or env.get("OTEL_EXPORTER_OTLP_INSECURE"))
    if insecure is not None and insecure.strip():
        return insecure.strip().lower() != "true"
    return scheme != "http"


def _without_userinfo(netloc: str, signal: Signal) -> str:
    if "@" not in netloc:
        return netloc
    log.warning(
        "telemetry: the OTLP %s endpoint's user:password@ is ignored, not sent; credentials "
        "belong in OTEL_EXPORTER_OTLP_HEADERS",
        signal.lower(),
    )
    return netloc.rpartition("@")[2]


def _http_target(target: str, signal: Signal) -> str:
    parts = urlsplit(target)
    try:
        port_ok = parts.port is None or parts.port > 0
    except ValueError:
        port_ok = False
    if parts.scheme not in ("http", "https") or not parts.hostname or not port_ok:
        # The scheme alone is quoted: the rest of the URL may hold a password.
        read_as = "" if parts.scheme in ("http", "https") else f" (it reads as scheme {parts.scheme[:20]!r})"
        raise UnusableSettings(
            f"the OTLP http/protobuf endpoint for {signal.lower()} is not an http:// or https:// "
            f"URL with a host and a valid port{read_as}"
        )
    netloc = _without_userinfo(parts.netloc, signal)
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))


def _grpc_target(target: str, signal: Signal) -> str:
    if target.startswith(_GRPC_TARGET_SCHEMES):
        return target
    target = _without_userinfo(target, signal)
    parts = urlsplit(f"//{target}")
    try:
        port_ok = parts.port is None or parts.port > 0
    except ValueError:
        port_ok = False
    if parts.netloc != target or not parts.hostname or not port_ok:
        raise UnusableSettings(
            f"the OTLP grpc endpoint for {signal.lower()} does not name a host "
            "(host:port, or a URL with one)"
        )
    return target


def settings(env: Mapping[str, str], signal: Signal) -> OtlpSettings:
    """How `signal` is exported, as the OTEL_* variables in env say; UnusableSettings for an
    endpoint the exporters cannot use."""
    chosen = protocol(env, signal)
    signal_endpoint = (env.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT") or "").strip()
    general_endpoint = (env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or "").strip()
    if chosen == HTTP:
        if signal_endpoint:
            target = signal_endpoint
        else:
            base = general_endpoint or DEFAULT_HTTP_ENDPOINT
            target = f"{base.removesuffix('/')}/{HTTP_PATHS[signal]}"
        target = _http_target(target, signal)
        tls = urlsplit(target).scheme == "https"
    else:
        endpoint = signal_endpoint or general_endpoint or DEFAULT_GRPC_ENDPOINT
        parts = urlsplit(endpoint)
        # A URL's host:port; anything else (host:port alone) is the target as it is.
        target = _grpc_target(parts.netloc if parts.netloc else endpoint, signal)
        tls = _grpc_tls(env, signal, parts.scheme)
    return OtlpSettings(
        signal=signal,
        protocol=chosen,
        target=target,
        tls=tls,
        timeout_s=_timeout(env, signal),
        headers=parse_headers(_get(env, signal, "HEADERS")),
        compression=_compression(env, signal),
        certificate=_get(env, signal, "CERTIFICATE") or None,
        client_key=_get(env, signal, "CLIENT_KEY") or None,
        client_certificate=_get(env, signal, "CLIENT_CERTIFICATE") or None,
    )
