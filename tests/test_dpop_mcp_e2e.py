"""A DPoP client session with the official MCP SDK, through real Envoy (examples/envoy/envoy.yaml),
the gateway process with examples/policies/dpop-binding, and the SDK's MCP server upstream.

The client is the SDK's streamable-HTTP client with an httpx Auth that sends
`Authorization: DPoP <token>` and a fresh proof (signed with joserfc) on every request. A token
refresh mid-session keeps the session the server issued; a proof seen on the wire, sent again,
is refused; a thief with the session id and their own key and token gets the server's own 404.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from tests.support.dpop_client import DpopKey
from tests.support.issuer import TestIssuer
from tests.support.mcp_upstream import McpUpstream
from tests.support.processes import REPO, EnvoyProcess, GatewayProcess, free_port, start_envoy

pytestmark = pytest.mark.timeout(90)


class DpopAuth(httpx2.Auth):
    """`Authorization: DPoP <current token>` and a new proof for every request."""

    def __init__(self, key: DpopKey, token: str) -> None:
        self.key = key
        self.token = token
        self.sent: list[tuple[str, str, str | None]] = []  # (method, proof, Mcp-Session-Id)

    def auth_flow(self, request: httpx2.Request) -> Generator[httpx2.Request, httpx2.Response, None]:
        url = request.url
        htu = f"{url.scheme}://{url.netloc.decode()}{url.path}"
        proof = self.key.proof(request.method, htu, self.token)
        request.headers["Authorization"] = f"DPoP {self.token}"
        request.headers["DPoP"] = proof
        self.sent.append((request.method, proof, request.headers.get("mcp-session-id")))
        yield request


@dataclass
class Stack:
    url: str
    idp: TestIssuer
    upstream: McpUpstream
    gateway: GatewayProcess
    envoy: EnvoyProcess


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("dpop-mcp")
    idp = TestIssuer("ES256", serve=False)
    jwks = idp.write_jwks(work / "jwks.json")
    config = {
        "policies": str(REPO / "examples" / "policies" / "dpop-binding"),
        "auth": {"issuers": [idp.issuer_config(jwks_file=jwks)]},
        # As examples/gateway.yaml: the session is bound when the server issues it (ext_proc),
        # to the identity whose proof Check admitted; the proof's jti is not used twice.
        "session": {"bind_on": "response"},
    }
    started: list[Any] = []
    try:
        gateway = GatewayProcess(config, work)
        started.append(gateway)
        upstream = McpUpstream(free_port())
        started.append(upstream)
        envoy, port = start_envoy(
            work, [gateway.port], upstream.port, extra={"port_value: 4317": f"port_value: {free_port()}"}
        )
        started.append(envoy)
        yield Stack(f"http://127.0.0.1:{port}/mcp", idp, upstream, gateway, envoy)
    finally:
        for part in reversed(started):
            part.stop()


def text_of(result: Any) -> str:
    return "".join(getattr(part, "text", "") for part in result.content)


def test_an_mcp_session_with_dpop_survives_a_refresh_and_refuses_replay_and_theft(stack: Stack) -> None:
    key = DpopKey("ES256")
    at1 = stack.idp.token("alice", cnf={"jkt": key.jkt}, now=time.time() - 60)
    at2 = stack.idp.token("alice", cnf={"jkt": key.jkt})  # the refresh: same key (RFC 9449 §5)
    auth = DpopAuth(key, at1)
    seen: dict[str, Any] = {}

    async def scenario() -> None:
        async with (
            httpx2.AsyncClient(auth=auth, timeout=10) as http,
            Client(streamable_http_client(stack.url, http_client=http), mode="legacy",
                   read_timeout_seconds=10) as client,
        ):
            seen["echo"] = text_of(await client.call_tool("echo", {"text": "hello"}))
            auth.token = at2
            seen["whoami"] = text_of(await client.call_tool("whoami", {}))
            session_ids = {sid for _, _, sid in auth.sent if sid}
            (seen["session"],) = session_ids
            # Another client holding the stolen session id, with its own key and a token bound to
            # it: the gateway answers with the MCP server's own 404.
            thief_key = DpopKey("ES256")
            thief = DpopAuth(thief_key, stack.idp.token("alice", cnf={"jkt": thief_key.jkt}))
            async with httpx2.AsyncClient(auth=thief, timeout=10) as thief_http:
                response = await thief_http.post(
                    stack.url,
                    json={"jsonrpc": "2.0", "id": 9, "method": "tools/call",
                          "params": {"name": "whoami", "arguments": {}}},
                    headers={
                        "mcp-session-id": seen["session"],
                        "accept": "application/json, text/event-stream",
                        "mcp-protocol-version": "2025-06-18",
                    },
                )
                seen["thief"] = (response.status_code, response.text)
            # The owner carries on in the same session.
            seen["add"] = text_of(await client.call_tool("add", {"a": 2, "b": 3}))

    anyio.run(scenario)

    assert (seen["echo"], seen["whoami"], seen["add"]) == ("hello", "alice", "5")
    assert seen["thief"][0] == 404 and "Session not found" in seen["thief"][1]
    session = seen["session"]
    assert stack.upstream.issued_session_ids().count(session) == 1
    served = [r for r in stack.upstream.seen if r.session_id == session and r.rpc_method == "tools/call"]
    assert [r.tool for r in served] == ["echo", "whoami", "add"]
    assert served[1].headers["authorization"] == f"DPoP {at2}"

    # A proof the client sent, sent again with its token and session: refused before the server.
    method, proof, _ = next(item for item in auth.sent if item[0] == "POST" and item[2] == session)
    before = len(stack.upstream.seen)
    replayed = httpx.post(
        stack.url,
        headers={"authorization": f"DPoP {at2}", "dpop": proof, "mcp-session-id": session,
                 "accept": "application/json, text/event-stream", "content-type": "application/json"},
        content=b'{"jsonrpc":"2.0","id":10,"method":"tools/list"}',
        timeout=10,
    )
    assert replayed.status_code == 401
    assert replayed.json() == {"error": "invalid_dpop_proof"}
    assert len(stack.upstream.seen) == before


def test_the_sdk_client_with_a_key_bound_token_as_bearer_never_reaches_the_server(stack: Stack) -> None:
    key = DpopKey("ES256")
    token = stack.idp.token("alice", cnf={"jkt": key.jkt})
    before = len(stack.upstream.seen)
    statuses: list[int] = []

    async def record(response: httpx2.Response) -> None:
        statuses.append(response.status_code)

    async def scenario() -> None:
        headers = {"authorization": f"Bearer {token}"}
        async with (
            httpx2.AsyncClient(headers=headers, timeout=10, event_hooks={"response": [record]}) as http,
            Client(streamable_http_client(stack.url, http_client=http), mode="legacy",
                   read_timeout_seconds=10) as client,
        ):
            await client.list_tools()

    with pytest.raises(Exception):  # noqa: B017 - the SDK reports the 401 as an MCPError in a group
        anyio.run(scenario)
    assert statuses and set(statuses) == {401}
    assert len(stack.upstream.seen) == before
