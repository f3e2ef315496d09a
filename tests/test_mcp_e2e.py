"""MCP end to end: the official `mcp` SDK on both sides, real Envoy and the gateway in between.

The client is the SDK's streamable-HTTP client, forced into the initialize handshake
(`mode="legacy"`) so that Mcp-Session-Id sessions are used; the upstream is the SDK's
MCPServer (stateful streamable HTTP). Every assertion is on what the client sent and got,
what reached the upstream, and the reasons in the gateway's own spans (a real OTLP receiver).
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import httpx2
import jwt
import pytest
from mcp import Client
from mcp.client.auth.utils import extract_field_from_www_auth, extract_scope_from_www_auth
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from gateway.config import MCP_SDK_SESSION_NOT_FOUND_BODY
from gateway.demo.client import BearerAuth, SentRequests, mcp_session, new_trace_id
from gateway.policy.loader import default_policy_dir
from gateway.telemetry.tracing import SPAN_NAME
from tests.support.issuer import TestIssuer
from tests.support.mcp_upstream import McpUpstream, SeenRequest
from tests.support.otlp import OtlpReceiver, ReceivedSpan
from tests.support.processes import (
    REPO,
    EnvoyProcess,
    GatewayProcess,
    ManagedProcess,
    free_port,
    health_status,
    start_envoy,
    wait_for_port,
    wait_until,
)

pytestmark = pytest.mark.timeout(90)

# Every 404 the gateway sends is these bytes, whatever the reason: the MCP SDK server's own.
NOT_FOUND_BODY = MCP_SDK_SESSION_NOT_FOUND_BODY.encode()


@dataclass
class Stack:
    url: str
    idp: TestIssuer
    rotating_idp: TestIssuer
    receiver: OtlpReceiver
    upstream: McpUpstream
    gateway: GatewayProcess
    envoy: EnvoyProcess

    def decisions(self, trace_id: str) -> list[ReceivedSpan]:
        return [s for s in self.receiver.spans(name=SPAN_NAME) if s.trace_id == trace_id]

    def wait_decisions(self, trace_id: str, predicate: Any, what: str) -> list[ReceivedSpan]:
        """The gateway's Check spans in this trace, once `predicate(spans)` holds."""
        wait_until(lambda: predicate(self.decisions(trace_id)), timeout=10, what=what)
        return self.decisions(trace_id)

    def seen_in(self, session_id: str) -> list[SeenRequest]:
        return [r for r in self.upstream.seen if r.session_id == session_id]


def gateway_env(receiver: OtlpReceiver) -> dict[str, str]:
    return {
        "OTEL_SDK_DISABLED": "false",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": receiver.grpc_endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "50",  # export spans within 50 ms, not the default 5 s
    }


def behind_envoy(
    config: dict[str, Any], work: Path, receiver: OtlpReceiver, started: list[Any]
) -> tuple[GatewayProcess, McpUpstream, Any, int]:
    """The gateway, an MCP upstream and Envoy in front of both, all exporting to `receiver`;
    each is appended to `started` as soon as it runs, so the caller stops what did start."""
    gateway = GatewayProcess(config, work, env=gateway_env(receiver))
    started.append(gateway)
    upstream = McpUpstream(free_port())
    started.append(upstream)
    envoy, listener_port = start_envoy(
        work, [gateway.port], upstream.port, extra={"port_value: 4317": f"port_value: {receiver.port}"}
    )
    started.append(envoy)
    return gateway, upstream, envoy, listener_port


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("mcp-e2e")
    receiver = OtlpReceiver()
    idp, rotating_idp = TestIssuer(), TestIssuer()
    started: list[Any] = []
    try:
        config = {
            "policies": str(default_policy_dir()),  # the shipped default: sessions bound to iss+sub
            "store": "memory://",
            "auth": {
                "issuers": [idp.issuer_config(), rotating_idp.issuer_config()],
                # Short, so the key-rotation test sees the JWKS change within a second.
                "jwks_refresh": "1s",
                "jwks_cooldown": "0s",  # an unknown kid refetches at once
            },
        }
        gateway, upstream, envoy, listener_port = behind_envoy(config, work, receiver, started)
        yield Stack(
            f"http://127.0.0.1:{listener_port}/mcp", idp, rotating_idp, receiver, upstream, gateway, envoy
        )
    finally:
        for part in reversed(started):
            part.stop()
        receiver.stop()
        idp.stop()
        rotating_idp.stop()


def raw_call(
    url: str, token: str, session_id: str, tool: str = "echo", trace_id: str | None = None
) -> httpx.Response:
    """A hand-made MCP tools/call: for a caller who is not the SDK client holding the session."""
    headers = {
        "authorization": f"Bearer {token}",
        "mcp-session-id": session_id,
        "mcp-protocol-version": "2025-11-25",
        "accept": "application/json, text/event-stream",
        "content-type": "application/json",
    }
    if trace_id:
        headers["traceparent"] = f"00-{trace_id}-{'1' * 16}-01"
    body = {
        "jsonrpc": "2.0",
        "id": 99,
        "method": "tools/call",
        "params": {"name": tool, "arguments": {"text": "x"}},
    }
    return httpx.post(url, headers=headers, content=json.dumps(body), timeout=10)


def text_of(result: Any) -> str:
    return "".join(getattr(part, "text", "") for part in result.content)


def reasons(spans: list[ReceivedSpan]) -> list[str]:
    return [str(s.attributes.get("authz.reason")) for s in spans]


def test_refreshed_token_keeps_the_session(stack: Stack) -> None:
    at1 = stack.idp.token("alice", now=time.time() - 60)  # issued a minute ago
    at2 = stack.idp.token("alice")
    claims1, claims2 = (jwt.decode(t, options={"verify_signature": False}) for t in (at1, at2))
    assert (claims1["iss"], claims1["sub"]) == (claims2["iss"], claims2["sub"])
    assert claims1["iat"] != claims2["iat"] and claims1["jti"] != claims2["jti"] and at1 != at2

    trace_id = new_trace_id()
    auth = BearerAuth(at1)
    auth.trace_id = trace_id
    sent = SentRequests()
    seen: dict[str, Any] = {}

    async def scenario() -> None:
        async with mcp_session(stack.url, auth, sent) as client:
            seen["tools"] = sorted(t.name for t in (await client.list_tools()).tools)
            seen["echo"] = text_of(await client.call_tool("echo", {"text": "hello"}))
            seen["session_before"] = sent.session_ids()[-1]
            auth.token = at2  # the OAuth refresh: same person, new token bytes
            seen["whoami"] = text_of(await client.call_tool("whoami", {}))
            seen["add"] = text_of(await client.call_tool("add", {"a": 2, "b": 3}))
            seen["session_after"] = sent.session_ids()[-1]

    anyio.run(scenario)

    # The client: one session from initialize to the last call, across the refresh.
    assert seen["tools"] == ["add", "delete_everything", "echo", "whoami"]
    assert (seen["echo"], seen["whoami"], seen["add"]) == ("hello", "alice", "5")
    session_id = seen["session_before"]
    assert seen["session_after"] == session_id
    assert set(sent.session_ids()) == {session_id}
    assert sent.items[0] == ("POST", None)  # initialize opens it

    # The upstream: it issued that id once, and served the post-refresh calls in it, with AT2.
    assert stack.upstream.issued_session_ids().count(session_id) == 1
    after_refresh = [
        r for r in stack.seen_in(session_id) if r.rpc_method == "tools/call" and r.tool != "echo"
    ]
    assert [r.tool for r in after_refresh] == ["whoami", "add"]
    assert all(r.status == 200 and r.headers["authorization"] == f"Bearer {at2}" for r in after_refresh)
    assert all(r.headers["x-authz-subject"] == "alice" for r in after_refresh)

    # The gateway: every check in this trace allowed; the session bound once, on first use.
    spans = stack.wait_decisions(
        trace_id,
        lambda s: sum(x.attributes.get("gen_ai.tool.name") == "add" for x in s) == 1,
        "the add check",
    )
    assert set(reasons(spans)) == {"allowed"}
    assert sum(bool(s.attributes.get("authz.session.new")) for s in spans) == 1
    tools_called = [
        s.attributes.get("gen_ai.tool.name")
        for s in spans
        if s.attributes.get("mcp.method.name") == "tools/call"
    ]
    assert tools_called == ["echo", "whoami", "add"]


def test_hijacked_session_id_gets_404_and_the_owner_carries_on(stack: Stack) -> None:
    alice = BearerAuth(stack.idp.token("alice"))
    mallory_token = stack.idp.token("mallory")
    trace_id = new_trace_id()
    alice.trace_id = trace_id
    sent = SentRequests()
    seen: dict[str, Any] = {}

    async def scenario() -> None:
        async with mcp_session(stack.url, alice, sent) as client:
            seen["first"] = text_of(await client.call_tool("echo", {"text": "mine"}))
            session_id = sent.session_ids()[-1]
            seen["session"] = session_id
            # Mallory holds a valid token of her own and alice's session id.
            seen["hijack"] = await anyio.to_thread.run_sync(
                lambda: raw_call(stack.url, mallory_token, session_id, "whoami", trace_id)
            )
            seen["after"] = text_of(await client.call_tool("whoami", {}))
            seen["session_after"] = sent.session_ids()[-1]

    anyio.run(scenario)

    hijack: httpx.Response = seen["hijack"]
    assert hijack.status_code == 404
    assert hijack.content == NOT_FOUND_BODY
    assert hijack.headers["server"] == "envoy"
    assert "x-envoy-upstream-service-time" not in hijack.headers  # refused before any upstream
    # Nothing of mallory's reached the MCP server; alice's session is untouched and still hers.
    assert not [r for r in stack.upstream.seen if mallory_token in r.headers.get("authorization", "")]
    assert (seen["first"], seen["after"]) == ("mine", "alice")
    assert seen["session_after"] == seen["session"]
    last = [r for r in stack.seen_in(seen["session"]) if r.rpc_method == "tools/call"][-1]
    assert (last.tool, last.status, last.headers["x-authz-subject"]) == ("whoami", 200, "alice")

    def owner_whoami_allowed(spans: list[ReceivedSpan]) -> bool:
        return any(
            s.attributes.get("gen_ai.tool.name") == "whoami" and s.attributes["authz.decision"] == "allow"
            for s in spans
        )

    spans = stack.wait_decisions(
        trace_id,
        lambda s: "subject_mismatch" in reasons(s) and owner_whoami_allowed(s),
        "mismatch, then owner",
    )
    (denied,) = [s for s in spans if s.attributes["authz.decision"] == "deny"]
    assert denied.attributes["authz.reason"] == "subject_mismatch"
    assert denied.attributes["authz.mismatch.claim"] == "sub"
    assert denied.attributes["http.response.status_code"] == 404
    assert denied.attributes["authz.policy"] == "mcp-session-binding"
    ((event, event_attrs),) = denied.events
    assert event == "authz.binding_mismatch"
    # Subjects are recorded as keyed hashes: correlatable, not readable.
    assert "mallory" not in json.dumps(event_attrs) and "alice" not in json.dumps(event_attrs)
    assert event_attrs["authz.bound"] != event_attrs["authz.presented"]


def test_owner_delete_ends_the_session_and_the_client_starts_a_new_one(stack: Stack) -> None:
    token = stack.idp.token("alice")
    auth = BearerAuth(token)
    trace_id = new_trace_id()
    auth.trace_id = trace_id
    sent = SentRequests()
    seen: dict[str, Any] = {}

    async def scenario() -> None:
        async with mcp_session(stack.url, auth, sent) as client:
            assert text_of(await client.call_tool("echo", {"text": "one"})) == "one"
            old = sent.session_ids()[-1]
            seen["old"] = old
            # The owner ends the session (the MCP DELETE), from another of her tabs.
            seen["delete"] = await anyio.to_thread.run_sync(
                lambda: httpx.request(
                    "DELETE",
                    stack.url,
                    headers={
                        "authorization": f"Bearer {token}",
                        "mcp-session-id": old,
                        "traceparent": f"00-{trace_id}-{'2' * 16}-01",
                    },
                    timeout=10,
                )
            )
            seen["reuse"] = await anyio.to_thread.run_sync(
                lambda: raw_call(stack.url, token, old, "echo", trace_id)
            )
            # The SDK client still holds the old id; the 404 is how it learns the session is gone.
            with pytest.raises(MCPError) as ended:
                await client.call_tool("echo", {"text": "two"})
            seen["sdk_error"] = ended.value
        # What a conformant client does next: a new session, and carry on.
        sent_new = SentRequests()
        async with mcp_session(stack.url, auth, sent_new) as client:
            seen["carried_on"] = text_of(await client.call_tool("echo", {"text": "three"}))
            seen["new"] = sent_new.session_ids()[-1]
        # Leaving the context, the SDK sent its own DELETE for the new session.
        seen["reuse_new"] = await anyio.to_thread.run_sync(
            lambda: raw_call(stack.url, token, seen["new"], "echo", trace_id)
        )

    anyio.run(scenario)

    old, new = seen["old"], seen["new"]
    assert seen["delete"].status_code == 200  # the upstream ended its session too
    assert seen["reuse"].status_code == 404 and seen["reuse"].content == NOT_FOUND_BODY
    # The SDK client surfaces the 404's JSON-RPC error: the same as for a server-side unknown id.
    assert "Session not found" in str(seen["sdk_error"])
    assert seen["carried_on"] == "three" and new != old
    assert seen["reuse_new"].status_code == 404 and seen["reuse_new"].content == NOT_FOUND_BODY

    # The upstream saw the DELETE, and nothing for the old id after it.
    old_requests = stack.seen_in(old)
    delete_at = next(i for i, r in enumerate(old_requests) if r.method == "DELETE")
    assert old_requests[delete_at].status == 200
    assert [r for r in old_requests[delete_at + 1 :] if r.method == "POST"] == []
    last_new = [r for r in stack.seen_in(new) if r.method != "GET"][-1]
    assert (last_new.method, last_new.status) == ("DELETE", 200)  # the SDK's own, on leaving

    def terminated_calls(spans: list[ReceivedSpan]) -> list[ReceivedSpan]:
        return [
            s
            for s in spans
            if s.attributes["authz.reason"] == "session_terminated"
            and s.attributes.get("mcp.method.name") == "tools/call"
        ]

    # Three tools/call on ended sessions: the raw reuse, the SDK's call, the reuse of the new id.
    spans = stack.wait_decisions(
        trace_id, lambda s: len(terminated_calls(s)) >= 3, "session_terminated denies"
    )
    assert len(terminated_calls(spans)) == 3
    assert all(s.attributes["http.response.status_code"] == 404 for s in terminated_calls(spans))
    deletes = sorted(
        str(s.attributes["authz.reason"]) for s in spans if s.attributes["http.request.method"] == "DELETE"
    )
    # The owner's DELETE and the new client's allowed; the old client's goodbye hit the tombstone.
    assert deletes == ["allowed", "allowed", "session_terminated"]
    assert (
        sum(bool(s.attributes.get("authz.session.new")) for s in spans) == 2
    )  # the old session, the new one


def test_key_rotation_without_restart(stack: Stack) -> None:
    idp = stack.rotating_idp
    old_key = idp.key
    at_old = idp.token("carol")
    trace_id = new_trace_id()
    auth = BearerAuth(at_old)
    auth.trace_id = trace_id
    sent = SentRequests()
    seen: dict[str, Any] = {}
    gateway_pid = stack.gateway.proc.pid

    async def scenario() -> None:
        async with mcp_session(stack.url, auth, sent) as client:
            assert text_of(await client.call_tool("whoami", {})) == "carol"
            session_id = sent.session_ids()[-1]
            # The IdP rotates: a new signing key with a new kid, both keys published.
            new_key = idp.rotate()
            assert new_key.kid != old_key.kid
            auth.token = idp.token("carol")
            assert jwt.get_unverified_header(auth.token)["kid"] == new_key.kid
            seen["new_key_call"] = text_of(await client.call_tool("whoami", {}))
            # Then it withdraws the old key from its JWKS.
            idp.published = [new_key]
            fetches_before = idp.jwks_requests

            def old_token_refused() -> httpx.Response | None:
                response = raw_call(stack.url, at_old, session_id, "whoami", trace_id)
                return response if response.status_code == 401 else None

            seen["refused"] = await anyio.to_thread.run_sync(
                lambda: wait_until(
                    old_token_refused, timeout=10, interval=0.1, what="the old key's token refused"
                )
            )
            seen["refetched"] = idp.jwks_requests > fetches_before
            seen["still_works"] = text_of(await client.call_tool("whoami", {}))
            seen["session_stayed"] = set(sent.session_ids()) == {session_id}

    anyio.run(scenario)

    assert seen["new_key_call"] == "carol"
    refused: httpx.Response = seen["refused"]
    assert 'error="invalid_token"' in refused.headers["www-authenticate"]
    assert seen["refetched"]
    assert seen["still_works"] == "carol" and seen["session_stayed"]
    assert stack.gateway.alive() and stack.gateway.proc.pid == gateway_pid  # never restarted

    spans = stack.wait_decisions(trace_id, lambda s: "token_invalid" in reasons(s), "token_invalid")
    assert set(reasons(spans)) == {"allowed", "token_invalid"}
    assert all(
        s.attributes["http.response.status_code"] == 401
        for s in spans
        if s.attributes["authz.reason"] != "allowed"
    )


# ---------------------------------------------------------------------------------------------
# MCP 2026-07-28: no initialize, no session; Mcp-Method / Mcp-Name headers beside the JSON body.
# The tool allow-list from examples/policies/tool-scopes: "tools:<name>" grants the tool <name>.
# ---------------------------------------------------------------------------------------------

MODERN = "2026-07-28"
TOOL_SCOPES = REPO / "examples" / "policies" / "tool-scopes"


@dataclass
class ModernStack:
    url: str
    idp: TestIssuer
    receiver: OtlpReceiver
    upstream: McpUpstream

    def decisions(self, trace_id: str) -> list[ReceivedSpan]:
        return [s for s in self.receiver.spans(name=SPAN_NAME) if s.trace_id == trace_id]


@pytest.fixture(scope="module")
def modern(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModernStack]:
    work = tmp_path_factory.mktemp("mcp-modern")
    receiver = OtlpReceiver()
    idp = TestIssuer()
    started: list[Any] = []
    try:
        config = {
            "policies": str(TOOL_SCOPES),
            "store": "memory://",
            "auth": {"issuers": [idp.issuer_config()]},
        }
        _, upstream, _, listener_port = behind_envoy(config, work, receiver, started)
        yield ModernStack(f"http://127.0.0.1:{listener_port}/mcp", idp, receiver, upstream)
    finally:
        for part in reversed(started):
            part.stop()
        receiver.stop()
        idp.stop()


def test_modern_protocol_tool_allow_list_by_scope(modern: ModernStack) -> None:
    auth = BearerAuth(modern.idp.token("alice", scope="mcp tools:echo"))
    trace_id = new_trace_id()
    auth.trace_id = trace_id
    responses: list[httpx2.Response] = []
    seen: dict[str, Any] = {}

    async def keep(response: httpx2.Response) -> None:
        await response.aread()
        responses.append(response)

    async def scenario() -> None:
        async with (
            httpx2.AsyncClient(auth=auth, timeout=10, event_hooks={"response": [keep]}) as http,
            Client(
                streamable_http_client(modern.url, http_client=http), mode="auto", read_timeout_seconds=10
            ) as client,
        ):
            seen["version"] = client.protocol_version
            seen["echo"] = text_of(await client.call_tool("echo", {"text": "modern"}))
            with pytest.raises(MCPError) as refused:
                await client.call_tool("delete_everything", {"confirm": True})
            seen["error"] = refused.value

    anyio.run(scenario)

    # Negotiated by server/discover, without initialize; nothing carried a session.
    assert seen["version"] == MODERN
    assert responses[0].request.headers["mcp-method"] == "server/discover"
    assert seen["echo"] == "modern"
    assert all("mcp-session-id" not in r.request.headers for r in responses)
    assert not [r for r in modern.upstream.seen if r.rpc_method == "initialize"]

    # The allowed call reached the MCP server with the 2026 routing headers matching its body.
    (echo,) = [r for r in modern.upstream.seen if r.tool == "echo"]
    assert (echo.headers["mcp-method"], echo.headers["mcp-name"]) == ("tools/call", "echo")
    assert echo.headers["mcp-protocol-version"] == MODERN and echo.status == 200

    # The disallowed one: 403 with the challenge, from Envoy, never reaching the MCP server.
    (denied,) = [r for r in responses if r.status_code == 403]
    assert denied.request.headers["mcp-name"] == "delete_everything"
    assert (
        denied.headers["www-authenticate"]
        == 'Bearer error="insufficient_scope", scope="tools:delete_everything"'
    )
    assert denied.json() == {"error": "insufficient_scope"}
    assert not [r for r in modern.upstream.seen if r.tool == "delete_everything"]
    # The SDK surfaces it as an error, and its own OAuth helpers read the challenge as a step-up.
    assert isinstance(seen["error"], MCPError)
    assert extract_field_from_www_auth(denied, "error") == "insufficient_scope"
    assert extract_scope_from_www_auth(denied) == "tools:delete_everything"

    wait_until(lambda: len(tool_calls(modern.decisions(trace_id))) >= 2, what="both tools/call checks")
    calls = {s.attributes["gen_ai.tool.name"]: s for s in tool_calls(modern.decisions(trace_id))}
    assert calls["echo"].attributes["authz.reason"] == "allowed"
    refused_span = calls["delete_everything"].attributes
    assert (refused_span["authz.reason"], refused_span["http.response.status_code"]) == (
        "insufficient_scope",
        403,
    )
    assert (refused_span["authz.policy"], refused_span["authz.rule"]) == ("tool-scopes", "tool-in-scope")


def tool_calls(spans: list[ReceivedSpan]) -> list[ReceivedSpan]:
    return [s for s in spans if s.attributes.get("mcp.method.name") == "tools/call"]


def test_modern_protocol_mcp_name_header_must_match_the_body(modern: ModernStack) -> None:
    # Granted "echo" only: a policy that believed the header would let this delete_everything through.
    token = modern.idp.token("alice", scope="mcp tools:echo")
    trace_id = new_trace_id()
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "delete_everything"}}
    headers = {
        "authorization": f"Bearer {token}",
        "mcp-protocol-version": MODERN,
        "mcp-method": "tools/call",
        "mcp-name": "echo",
        "accept": "application/json, text/event-stream",
        "content-type": "application/json",
        "traceparent": f"00-{trace_id}-{'3' * 16}-01",
    }
    response = httpx.post(modern.url, headers=headers, content=json.dumps(body), timeout=10)
    assert response.status_code == 400
    assert response.json() == {"error": "invalid_request"}
    assert not [r for r in modern.upstream.seen if r.tool == "delete_everything"]
    (span,) = wait_until(lambda: modern.decisions(trace_id), what="the mismatch check")
    assert span.attributes["authz.reason"] == "mcp_header_mismatch"
    assert span.attributes["http.response.status_code"] == 400


# ---------------------------------------------------------------------------------------------
# examples/mcp/README.md, run as written: its commands (with free ports put in) and its client.
# ---------------------------------------------------------------------------------------------

GUIDE = REPO / "examples" / "mcp" / "README.md"
# The ports the guide uses, as in examples/envoy/envoy.yaml.
GUIDE_PORTS = (8080, 9191, 10000, 4317)


def guide_blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", GUIDE.read_text(), re.S | re.M)


def with_ports(token: str, ports: dict[int, int]) -> str:
    for old, new in ports.items():
        token = re.sub(rf"(?<![0-9]){old}(?![0-9])", str(new), token)
    return token


def test_the_mcp_guide_as_written(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    envoy_excerpt, *_ = guide_blocks("yaml")
    run_block, scopes_block = guide_blocks("bash")
    (client_code,) = guide_blocks("python")
    envoy_example = REPO / "examples" / "envoy" / "envoy.yaml"
    assert envoy_excerpt in envoy_example.read_text()  # the guide quotes the real config

    receiver = OtlpReceiver()
    ports = {8080: free_port(), 9191: free_port(), 10000: 0, 4317: receiver.port}
    variables: dict[str, str] = {}
    started: list[Any] = []
    try:
        for line in run_block.splitlines():
            line = line.strip().removesuffix("&").strip()
            if not line or line.startswith("#"):
                continue
            if assignment := re.fullmatch(r"(\w+)=\$\((.*)\)", line):
                argv = shlex.split(assignment.group(2))
                assert argv[0] == "authz-gateway"
                output = subprocess.run(
                    [str(Path(sys.executable).with_name("authz-gateway")), *argv[1:]],
                    cwd=REPO,
                    capture_output=True,
                    text=True,
                    check=True,
                )
                variables[assignment.group(1)] = output.stdout.strip()
                continue
            words = [with_ports(word, ports) for word in shlex.split(line)]
            env = dict(word.split("=", 1) for word in words if re.match(r"^[A-Z_]+=", word))
            argv = [word for word in words if not re.match(r"^[A-Z_]+=", word)]
            if argv[0] == "python":
                process = ManagedProcess("mcp-server", [sys.executable, *argv[1:]], tmp_path)
                started.append(process)
                wait_for_port(ports[8080], 20)
            elif argv[:2] == ["authz-gateway", "serve"]:
                # The config file as written, with only its listen address moved to a free port.
                command = [str(Path(sys.executable).with_name("authz-gateway")), *argv[1:]]
                command += ["--listen", f"127.0.0.1:{ports[9191]}"]
                env |= {"OTEL_SDK_DISABLED": "false", "OTEL_BSP_SCHEDULE_DELAY": "50"}
                process = ManagedProcess("gateway", command, tmp_path, env)
                started.append(process)
                wait_until(lambda: health_status(f"127.0.0.1:{ports[9191]}") == "SERVING", 20, what="gateway")
            elif argv[0] == "envoy":
                template = REPO / argv[argv.index("-c") + 1]
                envoy, ports[10000] = start_envoy(
                    tmp_path,
                    [ports[9191]],
                    ports[8080],
                    template=template,
                    extra={"port_value: 4317": f"port_value: {receiver.port}"},
                )
                started.append(envoy)
            else:
                pytest.fail(f"the guide runs a command this test does not know: {line}")
        assert len(started) == 3 and set(variables) == {"TOKEN", "NEW_TOKEN"}
        token, new_token = variables["TOKEN"], variables["NEW_TOKEN"]
        claims = [jwt.decode(t, options={"verify_signature": False}) for t in (token, new_token)]
        assert token != new_token and claims[0]["sub"] == claims[1]["sub"] == "alice"

        namespace: dict[str, Any] = {}
        exec(compile(client_code, str(GUIDE), "exec"), namespace)  # noqa: S102 - the guide's own code
        capsys.readouterr()
        anyio.run(namespace["main"], f"http://127.0.0.1:{ports[10000]}/mcp", token, new_token)
        assert capsys.readouterr().out == "echo: hello\nwhoami: alice\n"  # what the guide says it prints

        def checks() -> list[ReceivedSpan]:
            return receiver.spans(name=SPAN_NAME)

        wait_until(
            lambda: any(s.attributes.get("gen_ai.tool.name") == "whoami" for s in checks()), what="spans"
        )
        spans = checks()
        assert set(reasons(spans)) == {"allowed"}
        (new,) = [s for s in spans if s.attributes.get("authz.session.new")]
        # The first use of the id binds it: notifications/initialized, or the SDK's GET stream
        # (started as the notification is sent), whichever reaches the gateway first.
        first_use = (new.attributes["http.request.method"], new.attributes.get("mcp.method.name"))
        assert first_use in {("POST", "notifications/initialized"), ("GET", None)}
    finally:
        for part in reversed(started):
            part.stop()
        receiver.stop()

    # Section 4 names the policy directory and the scope format the modern-protocol tests use.
    assert f"--policies {TOOL_SCOPES.relative_to(REPO)}" in scopes_block
    assert '--scope "tools:echo"' in scopes_block
