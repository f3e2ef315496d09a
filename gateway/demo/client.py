"""The client side of the demo, built on the official MCP SDK's streamable-HTTP client.

The SDK takes any `httpx2.Auth`: this one sends whichever access token is current, so an
OAuth refresh is one assignment and the same MCP session carries on. It can also stamp a
W3C `traceparent`, so every request of one step lands in one trace (Envoy continues it,
and the gateway's Check span joins it), which is how the demo finds its decisions.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

SESSION_HEADER = "mcp-session-id"


class BearerAuth(httpx2.Auth):
    """`Authorization: Bearer <current token>` on every request; assign `.token` to switch."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.trace_id: str | None = None

    def auth_flow(self, request: httpx2.Request) -> Generator[httpx2.Request, httpx2.Response, None]:
        request.headers["Authorization"] = f"Bearer {self.token}"
        if self.trace_id:
            request.headers["traceparent"] = f"00-{self.trace_id}-{secrets.token_hex(8)}-01"
        yield request


def new_trace_id() -> str:
    return secrets.token_hex(16)


def fingerprint(secret: str) -> str:
    """A short, one-way name for a token or session id: safe to print, stable to compare."""
    return hashlib.sha256(secret.encode()).hexdigest()[:8]


@dataclass
class SentRequests:
    """What the client actually sent: (HTTP method, Mcp-Session-Id or None) per request."""

    items: list[tuple[str, str | None]] = field(default_factory=list)

    async def hook(self, request: httpx2.Request) -> None:
        self.items.append((request.method, request.headers.get(SESSION_HEADER)))

    def session_ids(self) -> list[str]:
        return [sid for _, sid in self.items if sid]


@asynccontextmanager
async def mcp_session(
    url: str,
    auth: BearerAuth,
    sent: SentRequests | None = None,
    timeout: float = 10.0,
    on_response: Callable[[httpx2.Response], Awaitable[None]] | None = None,
) -> AsyncIterator[Client]:
    """A handshake-era (`initialize`, Mcp-Session-Id) MCP session through `url`; `on_response`
    sees each response before the client reads it (and before its next request)."""
    hooks: dict[str, list[Callable[..., Awaitable[None]]]] = {}
    if sent is not None:
        hooks["request"] = [sent.hook]
    if on_response is not None:
        hooks["response"] = [on_response]
    async with (
        httpx2.AsyncClient(auth=auth, timeout=timeout, event_hooks=hooks) as http,
        Client(
            streamable_http_client(url, http_client=http), mode="legacy", read_timeout_seconds=timeout
        ) as client,
    ):
        yield client
