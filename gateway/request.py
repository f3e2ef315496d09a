"""Envoy's CheckRequest turned into plain, typed request data.

Nothing here trusts the input: a request without HTTP attributes, oversized or non-UTF-8
headers, or a malformed MCP body yields a RequestError with a reason code, never a crash.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from gateway import decision
from gateway.mcp import (
    NOT_MCP,
    McpCall,
    McpHeaderMismatch,
    Unparseable,
    UnsafeText,
    mcp_view,
    media_type,
)
from gateway.text import CREDENTIAL_HEADERS, safe_text

PARTIAL_BODY_HEADER = "x-envoy-auth-partial-body"
_REQUEST_FIELDS = frozenset({"method", "path", "query", "host", "scheme", "headers", "body", "id"})


class RequestError(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(slots=True)
class RequestContext:
    method: str
    path: str
    headers: dict[str, str]
    query: dict[str, str] = field(default_factory=dict)
    # A parameter given twice: servers disagree on which value counts (first or last), so a
    # policy that reads the query must not judge it (see check.py).
    query_repeated: bool = False
    host: str = ""
    scheme: str = ""
    body: str = ""
    id: str = ""
    body_partial: bool = False
    # Envoy sent the body in the text field, where it has replaced every byte that is not
    # UTF-8 with "!": only the `raw_body` of `pack_as_bytes: true` is exactly what the
    # server receives.
    body_is_text: bool = False
    # The body's bytes are not UTF-8 (then `body` is empty): refused where a policy reads it.
    body_undecodable: bool = False
    source_address: str = ""
    source_principal: str = ""
    # The TLS peer's certificate as Envoy sends it (URL-encoded PEM, with
    # include_peer_certificate: true); "" without one. For certificate-bound tokens (RFC 8705).
    client_certificate: str = ""
    context_extensions: dict[str, str] = field(default_factory=dict)
    # None: not parsed yet. The body is parsed on first use, as most checks never need it;
    # a RequestError: it cannot be judged, and every use refuses the request.
    parsed_mcp: tuple[McpCall, ...] | RequestError | None = None

    @property
    def mcp_calls(self) -> tuple[McpCall, ...]:
        """Every call the request makes (a batch has several); at least one element.

        Raises RequestError when the body cannot be read exactly as a server would.
        """
        if self.parsed_mcp is None:
            self.parsed_mcp = _judged_calls(self)
        if isinstance(self.parsed_mcp, RequestError):
            raise self.parsed_mcp
        return self.parsed_mcp

    @property
    def mcp(self) -> McpCall:
        return self.mcp_calls[0]

    def mcp_for_telemetry(self) -> McpCall:
        """The first call for a span's attributes; NOT_MCP when the body cannot be judged."""
        try:
            return self.mcp
        except RequestError:
            return NOT_MCP

    def body_refusal(self, reads_mcp: bool) -> RequestError | None:
        """Why a policy that reads the body (`reads_mcp`: and the MCP view) cannot judge this
        request: cut short by Envoy, or not readable exactly as a server would read it."""
        if self.body_partial:
            return RequestError(decision.REQUEST_BODY_PARTIAL, "Envoy sent only part of the body")
        if not reads_mcp:
            return _body_problem(self)
        try:
            self.mcp_calls  # noqa: B018 - parsed now (its body checks included), so a refusal comes first
        except RequestError as exc:
            return exc
        return None

    def request_map(self, fields: frozenset[str] | None = None) -> dict[str, Any]:
        """The `request` variable that policies see; only `fields` when given.

        Its headers leave out `authorization` and `dpop` (the DPoP proof): policies read the
        verified `claims` and `auth` instead, and a CEL error message can then never echo them.
        """
        if fields is None:
            fields = _REQUEST_FIELDS
        result: dict[str, Any] = {}
        if "method" in fields:
            result["method"] = self.method
        if "path" in fields:
            result["path"] = self.path
        if "query" in fields:
            result["query"] = self.query
        if "host" in fields:
            result["host"] = self.host
        if "scheme" in fields:
            result["scheme"] = self.scheme
        if "headers" in fields:
            headers = self.headers
            if "authorization" in headers or "dpop" in headers:
                headers = {k: v for k, v in headers.items() if k not in CREDENTIAL_HEADERS}
            result["headers"] = headers
        if "body" in fields:
            result["body"] = self.body
        if "id" in fields:
            result["id"] = self.id
        return result


def _body_problem(context: RequestContext) -> RequestError | None:
    headers = context.headers
    body = context.body
    if not body and not context.body_undecodable:
        declared = headers.get("content-length", "0").strip()
        if declared not in ("", "0") or "transfer-encoding" in headers:
            # Envoy was not configured to send the body (with_request_body), or sent none.
            return RequestError(decision.REQUEST_UNPARSEABLE, "the request has a body, and Envoy sent none")
        return None
    encoding = headers.get("content-encoding", "").strip().lower()
    if encoding not in ("", "identity"):
        return RequestError(decision.REQUEST_UNPARSEABLE, "the body is encoded (Content-Encoding)")
    _, charset = media_type(headers)
    if charset is not None and charset not in ("utf-8", "utf8"):
        return RequestError(decision.REQUEST_UNPARSEABLE, "the body's charset is not UTF-8")
    if context.body_undecodable:
        return RequestError(decision.REQUEST_UNPARSEABLE, "the body is not UTF-8")
    if body[0] == "\ufeff":
        return RequestError(decision.REQUEST_UNPARSEABLE, "the body starts with a byte order mark")
    if context.body_is_text and "!" in body:
        message = "Envoy sent the body as text, where '!' may stand for bytes that are not UTF-8"
        return RequestError(decision.REQUEST_UNPARSEABLE, message + " (set with_request_body.pack_as_bytes)")
    if not safe_text(body):
        return RequestError(decision.REQUEST_INVALID, "the body holds a NUL")
    return None


def _judged_calls(context: RequestContext) -> tuple[McpCall, ...] | RequestError:
    problem = _body_problem(context)
    if problem is not None:
        return problem
    try:
        return mcp_view(context.headers, context.body)
    except Unparseable as exc:
        return RequestError(decision.REQUEST_UNPARSEABLE, str(exc))
    except UnsafeText as exc:
        return RequestError(decision.REQUEST_INVALID, str(exc))
    except McpHeaderMismatch as exc:
        return RequestError(decision.MCP_HEADER_MISMATCH, str(exc))


def judge_mcp(check_request: Any, max_bytes: int = 64 * 1024) -> tuple[McpCall, ...]:
    """The calls the gateway judges in a CheckRequest, for a policy that reads the MCP view;
    raises RequestError with the reason it would refuse the request."""
    return from_check_request(check_request, max_bytes).mcp_calls


_SECRET_HEADERS = ("authorization", "dpop", "mcp-session-id", "cookie")


def redact_secrets(text: str, context: RequestContext | None) -> str:
    """`text` without the request's own secrets (its token, session id, cookies), for telemetry."""
    if context is None:
        return text
    for header in _SECRET_HEADERS:
        value = context.headers.get(header)
        if value:
            text = text.replace(value, "[redacted]")
            token = value.partition(" ")[2].strip()
            if len(token) >= 8:
                text = text.replace(token, "[redacted]")
    return text


def _header_dict(http: Any, max_bytes: int) -> dict[str, str]:
    headers: dict[str, str] = dict(http.headers)
    names = "".join(headers)
    if names != names.lower():
        # Envoy sends lower-case names; other callers may not.
        headers = {key.lower(): value for key, value in headers.items()}
    total = len(names) + sum(map(len, headers.values()))
    # Envoy sends header_map instead of headers when encode_raw_headers is on.
    return _add_entries(headers, http.header_map.headers, total, max_bytes)


def _add_entries(headers: dict[str, str], entries: Any, total: int, max_bytes: int) -> dict[str, str]:
    """`headers` with Envoy's HeaderValue entries added (lower-case names, repeats joined)."""
    for entry in entries:
        raw = entry.raw_value if entry.raw_value else entry.value.encode()
        try:
            value = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError(decision.REQUEST_INVALID, "a header value is not UTF-8") from None
        total += len(entry.key) + len(value)
        key = entry.key.lower()
        # Repeated headers arrive as separate entries; join them as HTTP does.
        headers[key] = f"{headers[key]},{value}" if key in headers else value
    if total > max_bytes:
        raise RequestError(decision.REQUEST_INVALID, f"headers exceed {max_bytes} bytes")
    return headers


def _body(http: Any, max_bytes: int) -> tuple[str, bool, bool]:
    """The body; whether it came as text (bytes that are not UTF-8 replaced); whether its
    bytes are not UTF-8 (an encoded or binary body, judged only where a policy reads it)."""
    if http.raw_body:
        if len(http.raw_body) > max_bytes:
            raise RequestError(decision.REQUEST_INVALID, f"body exceeds {max_bytes} bytes")
        try:
            return str(http.raw_body.decode("utf-8")), False, False
        except UnicodeDecodeError:
            return "", False, True
    body = str(http.body)
    if len(body) > max_bytes:
        raise RequestError(decision.REQUEST_INVALID, f"body exceeds {max_bytes} bytes")
    return body, bool(body), False


def _query(query_string: str) -> tuple[dict[str, str], bool]:
    try:
        # Strict: a %-escape that is not UTF-8 would be read as U+FFFD here and as its bytes
        # by the server.
        pairs = parse_qsl(query_string, keep_blank_values=True, errors="strict")
    except UnicodeDecodeError:
        raise RequestError(decision.REQUEST_INVALID, "a query parameter is not UTF-8") from None
    query = dict(pairs)
    return query, len(query) != len(pairs)


def _refuse_unsafe_text(*texts: str) -> None:
    # The native CEL engine cuts a string at its first NUL: no such value may reach a policy.
    if not safe_text("".join(texts)):
        raise RequestError(decision.REQUEST_INVALID, "a request value holds a NUL or a lone surrogate")


def from_check_request(check_request: Any, max_bytes: int = 64 * 1024) -> RequestContext:
    """Build the request context from an `envoy.service.auth.v3.CheckRequest`."""
    if check_request is None or not check_request.HasField("attributes"):
        raise RequestError(decision.REQUEST_INVALID, "the CheckRequest has no attributes")
    attributes = check_request.attributes
    if not attributes.HasField("request") or not attributes.request.HasField("http"):
        raise RequestError(decision.REQUEST_INVALID, "the CheckRequest has no HTTP attributes")
    http = attributes.request.http
    if not http.method:
        raise RequestError(decision.REQUEST_INVALID, "the HTTP request has no method")
    headers = _header_dict(http, max_bytes)
    body, body_is_text, body_undecodable = _body(http, max_bytes)
    path, _, query_string = (http.path or headers.get(":path", "/")).partition("?")
    query: dict[str, str] = {}
    query_repeated = False
    if query_string:
        query, query_repeated = _query(query_string)
    extensions = dict(attributes.context_extensions)
    principal = attributes.source.principal
    address = attributes.source.address.socket_address.address
    # The body is checked where a policy reads it (RequestContext.body_refusal).
    _refuse_unsafe_text(
        http.method, path, http.host, http.scheme, http.id, principal, address,
        *headers, *headers.values(), *query, *query.values(), *extensions, *extensions.values(),
    )
    context = RequestContext(
        method=http.method.upper(),
        path=path,
        headers=headers,
        query=query,
        query_repeated=query_repeated,
        host=http.host,
        scheme=http.scheme,
        body=body,
        id=http.id,
        body_partial=headers.get(PARTIAL_BODY_HEADER, "").lower() == "true",
        body_is_text=body_is_text,
        body_undecodable=body_undecodable,
        source_address=address,
        source_principal=principal,
        client_certificate=attributes.source.certificate,
        context_extensions=extensions,
    )
    if "mcp-method" in headers or "mcp-name" in headers:
        # Headers that must agree with the body are checked now, so a mismatch always denies;
        # a body that cannot be judged refuses only where a policy reads it.
        judged = context.parsed_mcp = _judged_calls(context)
        if isinstance(judged, RequestError) and judged.reason == decision.MCP_HEADER_MISMATCH:
            raise judged
    return context


def from_header_map(header_map: Any, max_bytes: int = 64 * 1024) -> RequestContext:
    """Build the request context from Envoy's request HeaderMap (ext_proc's request headers).

    The response path sees headers only: the body is empty and the MCP view is NOT_MCP.
    """
    headers = _add_entries({}, header_map.headers, 0, max_bytes)
    method = headers.get(":method", "")
    if not method:
        raise RequestError(decision.REQUEST_INVALID, "the HTTP request has no method")
    path, _, query_string = headers.get(":path", "/").partition("?")
    query: dict[str, str] = {}
    query_repeated = False
    if query_string:
        query, query_repeated = _query(query_string)
    _refuse_unsafe_text(*headers, *headers.values(), *query, *query.values())
    return RequestContext(
        method=method.upper(),
        path=path,
        headers=headers,
        query=query,
        query_repeated=query_repeated,
        host=headers.get(":authority", ""),
        scheme=headers.get(":scheme", ""),
        parsed_mcp=(NOT_MCP,),
    )
