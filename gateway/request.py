"""Envoy's CheckRequest turned into plain, typed request data.

Nothing here trusts the input: a request without HTTP attributes, oversized or non-UTF-8
headers, or a malformed MCP body yields a RequestError with a reason code, never a crash.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from gateway import decision
from gateway.mcp import McpCall, McpHeaderMismatch, mcp_view

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
    source_address: str = ""
    source_principal: str = ""
    context_extensions: dict[str, str] = field(default_factory=dict)
    # None: not parsed yet. The body is parsed on first use, as most checks never need it.
    parsed_mcp: tuple[McpCall, ...] | None = None

    @property
    def mcp_calls(self) -> tuple[McpCall, ...]:
        """Every call the request makes (a batch has several); at least one element."""
        if self.parsed_mcp is None:
            self.parsed_mcp = mcp_view(self.headers, self.body)
        return self.parsed_mcp

    @property
    def mcp(self) -> McpCall:
        return self.mcp_calls[0]

    def request_map(self, fields: frozenset[str] | None = None) -> dict[str, Any]:
        """The `request` variable that policies see; only `fields` when given.

        Its headers leave out `authorization`: policies read the verified `claims` and
        `auth` instead, and a CEL error message can then never echo the token.
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
            if "authorization" in headers:
                headers = {k: v for k, v in headers.items() if k != "authorization"}
            result["headers"] = headers
        if "body" in fields:
            result["body"] = self.body
        if "id" in fields:
            result["id"] = self.id
        return result


_SECRET_HEADERS = ("authorization", "mcp-session-id", "cookie")


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
    for entry in http.header_map.headers:
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


def _body(http: Any, max_bytes: int) -> str:
    if http.raw_body:
        if len(http.raw_body) > max_bytes:
            raise RequestError(decision.REQUEST_INVALID, f"body exceeds {max_bytes} bytes")
        try:
            return str(http.raw_body.decode("utf-8"))
        except UnicodeDecodeError:
            raise RequestError(decision.REQUEST_INVALID, "the request body is not UTF-8") from None
    body = str(http.body)
    if len(body) > max_bytes:
        raise RequestError(decision.REQUEST_INVALID, f"body exceeds {max_bytes} bytes")
    return body


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
    body = _body(http, max_bytes)
    path, _, query_string = (http.path or headers.get(":path", "/")).partition("?")
    query: dict[str, str] = {}
    query_repeated = False
    if query_string:
        pairs = parse_qsl(query_string, keep_blank_values=True)
        query = dict(pairs)
        query_repeated = len(query) != len(pairs)
    mcp_calls = None
    if "mcp-method" in headers or "mcp-name" in headers:
        # Headers that must agree with the body are checked now, so a mismatch always denies.
        try:
            mcp_calls = mcp_view(headers, body)
        except McpHeaderMismatch as exc:
            raise RequestError(decision.MCP_HEADER_MISMATCH, str(exc)) from None
    return RequestContext(
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
        source_address=attributes.source.address.socket_address.address,
        source_principal=attributes.source.principal,
        context_extensions=dict(attributes.context_extensions),
        parsed_mcp=mcp_calls,
    )
