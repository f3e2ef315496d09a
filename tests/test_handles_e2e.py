"""Handles through real Envoy: the drafts server (the official SDK's MCPServer), the SDK's
client in 2026-07-28 mode, two gateway replicas on one real redis-server, the example policy
examples/policies/handles and the example Envoy config (ext_authz, then ext_proc).

Every draft id is bound by the gateway as the server mints it: Check marks `create_draft` as a
call whose response may mint, ext_proc reads that response (JSON buffered, SSE event by event)
and binds the id to the caller before the response goes on. Nothing here is stood in.
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
from gateway.session.handles import handle_store_settings
from gateway.session.redis_store import RedisStore
from tests.support.drafts_server import DraftsServer, asgi_app
from tests.support.issuer import TestIssuer
from tests.support.otlp import OtlpReceiver
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
PROCESS_SPAN = "envoy.service.ext_proc.v3.ExternalProcessor/Process"
CHECK_SPAN = "envoy.service.auth.v3.Authorization/Check"
MODERN = "2026-07-28"


@dataclass
class Stack:
    idp: TestIssuer
    redis: RedisServer
    replicas: dict[int, GatewayProcess]
    drafts: DraftsServer
    url: str
    admin_port: int
    receiver: OtlpReceiver

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

    def bound_to(self, draft_id: str) -> str | None:
        """Whom the replicas' Redis says the draft is bound to (None: never bound)."""
        handles = HandlesConfig()
        store = RedisStore(self.redis.url, handle_store_settings(handles, 0.5, 1000))
        try:
            loaded = store.load(f"draft:{draft_id}", time.time())
        finally:
            store.close()
        if loaded is None:
            return None
        return "(ended)" if loaded.data.get("terminated") else str(loaded.data["bound"].get("sub"))


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
        "handles": {"max_response_bytes": 4096},
    }
    receiver = OtlpReceiver()
    replicas = [
        GatewayProcess(config, tmp_path, name=f"replica-{i}", env=receiver.exporter_env()) for i in (1, 2)
    ]
    listener_port, admin_port = free_port(), free_port()
    text = envoy_config(
        listener_port=listener_port, admin_port=admin_port,
        gateway_ports=[r.port for r in replicas], upstream_port=upstream_port,
    )
    envoy = EnvoyProcess(text, tmp_path)
    wait_for_port(admin_port, 30)
    wait_for_port(listener_port, 30)
    url = f"http://127.0.0.1:{listener_port}/mcp"
    yield Stack(idp, redis, {r.port: r for r in replicas}, drafts, url, admin_port, receiver)
    envoy.stop()
    for replica in replicas:
        assert replica.stop() == 0, replica.log_text()
    server.should_exit = True
    thread.join(10)
    redis.stop()
    receiver.stop()


@asynccontextmanager
async def client(
    stack: Stack, auth: BearerAuth, seen: list[tuple[int, str]] | None = None
) -> AsyncIterator[Client]:
    async def record(response: httpx2.Response) -> None:
        if seen is not None:
            seen.append((response.status_code, response.headers.get("content-type", "")))

    async with (
        httpx2.AsyncClient(auth=auth, timeout=15, event_hooks={"response": [record]}) as http,
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

    async def story() -> str:
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
            streamed_id = str((second.structured_content or {})["draft_id"])
        # Both bound to alice by the replica that saw the response (JSON, then SSE).
        assert stack.bound_to(draft_id) == "alice" and stack.bound_to(streamed_id) == "alice"

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
        async with client(stack, bob) as mcp:
            assert await refused(mcp, "publish_draft", streamed_id) == "Unknown handle"
        assert not stack.drafts.executed("publish_draft", streamed_id)

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
            assert stack.bound_to(draft_id) == "(ended)"
            # The SSE-minted draft is alice's too.
            assert not (await mcp.call_tool("publish_draft", {"draft_id": streamed_id})).is_error
        return draft_id

    draft_id = anyio.run(story)
    # The Process span of the bind, and the Check span of bob's refusal, say so; neither (nor
    # anything the receiver got) holds a draft id.
    minted = stack.receiver.wait_for_span(
        lambda s: s.attributes.get("authz.handle.new") is True, name=PROCESS_SPAN
    )
    assert minted.attributes["authz.handle.kind"] == "draft"
    assert str(minted.attributes["authz.handle.id"]).startswith("hmac-sha256:")
    mismatch = stack.receiver.wait_for_span(
        lambda s: s.attributes.get("authz.reason") == "handle_mismatch", name=CHECK_SPAN
    )
    (event,) = [attributes for name, attributes in mismatch.events if name == "authz.binding_mismatch"]
    assert event["authz.handle.kind"] == "draft" and event["authz.mismatch.claim"] == "sub"
    assert draft_id.encode() not in b"".join(stack.receiver.raw_payloads)


def test_a_response_that_cannot_be_bound_never_reaches_the_client(stack: Stack) -> None:
    alice = BearerAuth(stack.idp.token("alice"))
    bob = BearerAuth(stack.idp.token("bob"))

    async def story() -> None:
        async with client(stack, alice) as mcp:
            created = await mcp.call_tool("create_draft", {"title": "mine"})
            draft_id = str((created.structured_content or {})["draft_id"])
        assert stack.bound_to(draft_id) == "alice"
        seen: list[tuple[int, str]] = []
        async with client(stack, bob, seen) as mcp:
            # The server hands bob alice's draft id (its idempotency key is anyone's): 502,
            # handle_reissued; bob never sees the id, and it stays alice's.
            with pytest.raises(MCPError):
                await mcp.call_tool("create_draft", {"title": "x", "idempotency_key": draft_id})
            assert stack.drafts.executed("create_draft", draft_id)
            assert seen[-1] == (502, "application/json"), seen
            # The same over SSE: the stream ends before the result event is delivered.
            with pytest.raises(MCPError):
                await mcp.call_tool(
                    "create_draft", {"title": "x", "idempotency_key": draft_id}, progress_callback=ignore
                )
            # Refused before Envoy sent the headers (502), or after them (the stream is cut).
            assert seen[-1] in {(502, "application/json"), (200, "text/event-stream")}, seen
            # A response over handles.max_response_bytes (4096 here) cannot be read: 502.
            with pytest.raises(MCPError):
                await mcp.call_tool("create_draft", {"title": "t" * 5000})
            assert seen[-1] == (502, "application/json"), seen
        assert stack.bound_to(draft_id) == "alice"
        async with client(stack, alice) as mcp:
            assert not (await mcp.call_tool("publish_draft", {"draft_id": draft_id})).is_error

    anyio.run(story)


async def ignore(value: float, total: float | None, message: str | None) -> None:
    return None
