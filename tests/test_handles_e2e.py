"""Handles through real Envoy: the drafts server (the official SDK's MCPServer), the SDK's
client in 2026-07-28 mode, two gateway replicas on one real redis-server, the example policy
examples/policies/handles.

What is real: Envoy, both gateway processes (`authz-gateway serve`), Redis, the JWKS, the
drafts server and the SDK client. What is not end to end yet: the gateway does not read
served responses in this build (the response path, Envoy external processing, is another
piece of work), so after `create_draft` the test binds the new draft id itself, with the
gateway's own minting code (`HandleBinder.mint`) on the replicas' Redis, exactly what the
response side stores. Everything after that (who may present it) is the served check.
"""

from __future__ import annotations

import http.client
import re
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx2
import pytest
import uvicorn
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from gateway.config import HandlesConfig
from gateway.demo.client import BearerAuth
from gateway.session.handles import HandleBinder, handle_store_settings
from gateway.session.redis_store import RedisStore
from tests.support.drafts_server import DraftsServer, asgi_app
from tests.support.issuer import TestIssuer
from tests.support.processes import (
    REPO,
    EnvoyProcess,
    GatewayProcess,
    RedisServer,
    envoy_config,
    free_port,
    wait_for_port,
)

POLICIES = REPO / "examples" / "policies" / "handles"
MODERN = "2026-07-28"


@dataclass
class Stack:
    idp: TestIssuer
    redis: RedisServer
    replicas: dict[int, GatewayProcess]
    drafts: DraftsServer
    url: str
    admin_port: int

    def served(self) -> dict[int, int]:
        """Checks answered by each replica, from Envoy's own per-host counters."""
        connection = http.client.HTTPConnection("127.0.0.1", self.admin_port, timeout=5)
        connection.request("GET", "/clusters")
        text = connection.getresponse().read().decode()
        connection.close()
        counts = {}
        for port in self.replicas:
            found = re.search(rf"^authz_gateway::127\.0\.0\.1:{port}::rq_total::(\d+)$", text, re.MULTILINE)
            counts[port] = int(found.group(1)) if found else 0
        return counts

    def mint(self, draft_id: str, subject: str) -> None:
        """What the response side stores when the server mints `draft_id` for `subject`."""
        handles = HandlesConfig()
        store = RedisStore(self.redis.url, handle_store_settings(handles, 0.5, 1000))
        try:
            bound = HandleBinder(store, handles).mint(
                "draft", draft_id, (self.idp.issuer, subject),
                lambda: {"iss": self.idp.issuer, "sub": subject}, time.time(),
            )
            assert not hasattr(bound, "reason"), bound
        finally:
            store.close()


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    idp = TestIssuer(serve=False)
    jwks = idp.write_jwks(tmp_path / "jwks.json")
    redis = RedisServer(tmp_path)
    drafts = DraftsServer()
    upstream_port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(asgi_app(drafts), host="127.0.0.1", port=upstream_port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for_port(upstream_port)
    config = {
        "store": redis.url,
        "policies": str(POLICIES),
        "auth": {"issuers": [idp.issuer_config(jwks_file=jwks)]},
    }
    replicas = [GatewayProcess(config, tmp_path, name=f"replica-{i}") for i in (1, 2)]
    listener_port, admin_port = free_port(), free_port()
    text = envoy_config(
        listener_port=listener_port, admin_port=admin_port,
        gateway_ports=[r.port for r in replicas], upstream_port=upstream_port,
    )
    envoy = EnvoyProcess(text, tmp_path)
    wait_for_port(admin_port, 30)
    wait_for_port(listener_port, 30)
    url = f"http://127.0.0.1:{listener_port}/mcp"
    yield Stack(idp, redis, {r.port: r for r in replicas}, drafts, url, admin_port)
    envoy.stop()
    for replica in replicas:
        assert replica.stop() == 0, replica.log_text()
    server.should_exit = True
    thread.join(10)
    redis.stop()


@asynccontextmanager
async def client(stack: Stack, auth: BearerAuth) -> AsyncIterator[Client]:
    async with (
        httpx2.AsyncClient(auth=auth, timeout=15) as http,
        Client(
            streamable_http_client(stack.url, http_client=http), mode=MODERN, read_timeout_seconds=15
        ) as mcp,
    ):
        yield mcp


async def refused(mcp: Client, tool: str, draft_id: str) -> str:
    """The SDK's ordinary error for a refused call (a JSON-RPC error carrying the call's id)."""
    with pytest.raises(MCPError) as caught:
        await mcp.call_tool(tool, {"draft_id": draft_id})
    return str(caught.value)


def test_a_draft_is_bound_to_its_creator_through_envoy_on_two_replicas(stack: Stack) -> None:
    alice = BearerAuth(stack.idp.token("alice"))
    bob = BearerAuth(stack.idp.token("bob"))

    async def story() -> None:
        async with client(stack, alice) as mcp:
            created = await mcp.call_tool("create_draft", {"title": "plans"})
            assert not created.is_error, created
            draft_id = str((created.structured_content or {})["draft_id"])
            # An SSE answer (a progress event, then the result) passes the gateway too.
            progress: list[float] = []

            async def on_progress(value: float, total: float | None, message: str | None) -> None:
                progress.append(value)

            second = await mcp.call_tool("create_draft", {"title": "more"}, progress_callback=on_progress)
            assert progress == [1.0] and not second.is_error
        stack.mint(draft_id, "alice")

        # bob presents alice's draft: refused on both replicas, the server never runs it.
        before = stack.served()
        async with client(stack, bob) as mcp:
            for _ in range(4):
                assert await refused(mcp, "publish_draft", draft_id) == "Unknown handle"
                assert await refused(mcp, "delete_draft", draft_id) == "Unknown handle"
        after = stack.served()
        assert all(after[port] > before[port] for port in stack.replicas), (before, after)
        assert not stack.drafts.executed("publish_draft", draft_id)
        assert not stack.drafts.executed("delete_draft", draft_id)

        # A draft id never minted gets the same answer, and never reaches the server either.
        async with client(stack, bob) as mcp:
            assert await refused(mcp, "publish_draft", "d-never-minted") == "Unknown handle"
        assert not stack.drafts.executed("publish_draft", "d-never-minted")

        # alice, after a refresh (a new token: new iat and jti, same iss + sub), publishes.
        alice.token = stack.idp.token("alice", jti="refreshed")
        async with client(stack, alice) as mcp:
            published = await mcp.call_tool("publish_draft", {"draft_id": draft_id})
            assert not published.is_error and stack.drafts.executed("publish_draft", draft_id)
            # The owner's delete ends the draft for both replicas: reuse is refused.
            deleted = await mcp.call_tool("delete_draft", {"draft_id": draft_id})
            assert not deleted.is_error
            calls = len(stack.drafts.calls)
            for _ in range(4):
                assert await refused(mcp, "publish_draft", draft_id) == "Unknown handle"
            assert len(stack.drafts.calls) == calls

    anyio.run(story)
