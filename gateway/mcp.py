"""The MCP view of a request: which JSON-RPC method, and which tool, prompt or resource.

It reads the JSON-RPC body when Envoy forwards one, and the `Mcp-Method` / `Mcp-Name`
headers that MCP 2026-07-28 clients send on session-less requests. A body that is not
JSON-RPC leaves the view empty; that is not an error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class McpCall:
    method: str = ""
    name: str = ""
    protocol_version: str = ""

    def as_cel(self) -> dict[str, str]:
        return {"method": self.method, "name": self.name, "protocol_version": self.protocol_version}


NOT_MCP = McpCall()


class McpHeaderMismatch(ValueError):
    """The Mcp-Method or Mcp-Name header says something other than the body."""


def _call_from_message(message: Any, protocol_version: str) -> McpCall | None:
    if not isinstance(message, dict) or message.get("jsonrpc") != "2.0":
        return None
    method = message.get("method")
    if not isinstance(method, str):
        # A JSON-RPC response or error sent by a client: no method to authorize.
        return McpCall(protocol_version=protocol_version)
    params = message.get("params")
    name = ""
    if isinstance(params, dict):
        # What the server acts on: resources are named by uri (a `name` beside it is ignored
        # by the SDKs, so it must not be what a policy sees); tools and prompts by name.
        if method.startswith("resources/"):
            candidate = params.get("uri", "")
        else:
            candidate = params.get("name", params.get("uri", ""))
        name = candidate if isinstance(candidate, str) else ""
        if method == "initialize" and not protocol_version:
            version = params.get("protocolVersion", "")
            protocol_version = version if isinstance(version, str) else ""
    return McpCall(method, name, protocol_version)


def parse_body(body: str, protocol_version: str) -> tuple[McpCall, ...]:
    """The calls in a JSON-RPC body: one, several for a batch, none when it is not JSON-RPC."""
    stripped = body.lstrip()
    if not stripped or stripped[0] not in "[{":
        return ()
    try:
        # Duplicate keys resolve last-wins here, as in the MCP SDKs' parsers (pydantic/jiter,
        # JSON.parse), so both sides read the same method and name.
        message = json.loads(stripped)
    except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
        return ()
    if not isinstance(message, list):
        call = _call_from_message(message, protocol_version)
        return () if call is None else (call,)
    # In a batch, an element that is not JSON-RPC must not hide the others: each valid call
    # is judged, and the invalid ones count as calls that are not MCP.
    calls = tuple(_call_from_message(item, protocol_version) or NOT_MCP for item in message)
    return calls if any(call is not NOT_MCP for call in calls) else ()


def mcp_view(headers: dict[str, str], body: str) -> tuple[McpCall, ...]:
    """Every call the request makes; at least one element (NOT_MCP when it is not MCP)."""
    protocol_version = headers.get("mcp-protocol-version", "")
    header_method = headers.get("mcp-method")
    header_name = headers.get("mcp-name")
    calls = parse_body(body, protocol_version) if body else ()
    if calls:
        if header_method is not None or header_name is not None:
            if len(calls) != 1:
                raise McpHeaderMismatch("Mcp-Method/Mcp-Name headers on a batch")
            call = calls[0]
            if header_method is not None and header_method != call.method:
                raise McpHeaderMismatch("Mcp-Method header differs from the body")
            if header_name is not None and header_name != call.name:
                raise McpHeaderMismatch("Mcp-Name header differs from the body")
        return calls
    if header_method is not None:
        return (McpCall(header_method, header_name or "", protocol_version),)
    if protocol_version:
        return (McpCall(protocol_version=protocol_version),)
    return (NOT_MCP,)
