"""Bind at issuance (`session.bind_on: response`) through real Envoy with the example config's
ext_proc filter, the official MCP SDK client and server, and the gateway's own spans.

A session id is bound the moment the MCP server hands it out, to the identity whose request
it answered: a guessed or early-used id is refused before its owner ever uses it.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import httpx2
import pytest
from mcp.shared.exceptions import MCPError

from gateway.config import MCP_SDK_SESSION_NOT_FOUND_BODY
from gateway.demo.client import BearerAuth, SentRequests, mcp_session, new_trace_id
from gateway.policy.loader import default_policy_dir
from gateway.telemetry.tracing import PROCESS_SPAN_NAME, SPAN_NAME
from tests.support.issuer import TestIssuer
from tests.support.mcp_upstream import McpUpstream
from tests.support.otlp import OtlpReceiver, ReceivedSpan
from tests.support.processes import GatewayProcess, IssuingUpstream, free_port, start_envoy, wait_until
from tests.test_mcp_e2e import gateway_env, raw_call, text_of

pytestmark = pytest.mark.timeout(120)

NOT_FOUND_BODY = MCP_SDK_SESSION_NOT_FOUND_BODY.encode()


def response_config(idp: TestIssuer, **session: Any) -> dict[str, Any]:
    return {
        "policies": str(default_policy_dir()),
        "store": "memory://",
        "auth": {"issuers": [idp.issuer_config()]},
        "session": {"bind_on": "response", **session},
    }


@dataclass
class Stack:
    url: str
    idp: TestIssuer
    receiver: OtlpReceiver
    upstream: McpUpstream
    gateway: GatewayProcess
    work: Path

    def spans(self, trace_id: str, name: str) -> list[ReceivedSpan]:
        return [s for s in self.receiver.spans(name=name) if s.trace_id == trace_id]

    def checks(self, trace_id: str) -> list[ReceivedSpan]:
        return self.spans(trace_id, SPAN_NAME)

    def processes(self, trace_id: str) -> list[ReceivedSpan]:
        return self.spans(trace_id, PROCESS_SPAN_NAME)

    def checks_once(self, trace_id: str, predicate: Any, what: str) -> list[ReceivedSpan]:
        """The Check spans of this trace, once `predicate(spans)` holds."""
        wait_until(lambda: predicate(self.checks(trace_id)), what=what)
        return self.checks(trace_id)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("extproc-e2e")
    receiver = OtlpReceiver()
    idp = TestIssuer()
    started: list[Any] = []
    try:
        gateway = GatewayProcess(response_config(idp), work, env=gateway_env(receiver))
        started.append(gateway)
        upstream = McpUpstream(free_port())
        started.append(upstream)
        envoy, listener_port = start_envoy(
            work, [gateway.port], upstream.port, extra={"port_value: 4317": f"port_value: {receiver.port}"}
        )
        started.append(envoy)
        yield Stack(f"http://127.0.0.1:{listener_port}/mcp", idp, receiver, upstream, gateway, work)
    finally:
        for part in reversed(started):
            part.stop()
        receiver.stop()
        idp.stop()


def reasons(spans: list[ReceivedSpan]) -> list[str]:
    return [str(s.attributes.get("authz.reason")) for s in spans]


def test_the_sdk_session_is_bound_when_the_server_issues_it(stack: Stack) -> None:
    auth = BearerAuth(stack.idp.token("alice"))
    trace_id = new_trace_id()
    auth.trace_id = trace_id
    sent = SentRequests()
    seen: dict[str, Any] = {}

    async def scenario() -> None:
        async with mcp_session(stack.url, auth, sent) as client:
            seen["tools"] = sorted(t.name for t in (await client.list_tools()).tools)
            seen["echo"] = text_of(await client.call_tool("echo", {"text": "hi"}))
            seen["whoami"] = text_of(await client.call_tool("whoami", {}))

    anyio.run(scenario)

    assert seen["tools"] == ["add", "delete_everything", "echo", "whoami"]
    assert (seen["echo"], seen["whoami"]) == ("hi", "alice")
    (session_id,) = set(sent.session_ids())
    assert stack.upstream.issued_session_ids().count(session_id) == 1
    # One bind, by the response path; no check ever binds (authz.session.new stays false).
    processes = wait_until(
        lambda: [s for s in stack.processes(trace_id) if s.attributes.get("authz.session.bound_at")],
        what="the bind's Process span",
    )
    assert len(processes) == 1
    (bound,) = processes
    assert bound.attributes["authz.session.bound_at"] == "response"
    assert bound.attributes["authz.session.new"] is True
    assert bound.attributes["authz.reason"] == "allowed"
    assert session_id not in json.dumps(bound.attributes)
    checks = wait_until(lambda: stack.checks(trace_id), what="check spans")
    assert set(reasons(checks)) == {"allowed"}
    assert not any(s.attributes.get("authz.session.new") for s in checks)
    # The Process spans hang under Envoy's spans, in the client's trace, like the Check spans.
    assert all(s.parent_span_id for s in stack.processes(trace_id))


def test_the_long_lived_get_stream_and_sse_answers_flow_through(stack: Stack) -> None:
    """Headers only: the SDK's GET stream stays open while the session works, and POST answers
    come as SSE, neither buffered by the response path."""
    token = stack.idp.token("frank")
    sent = SentRequests()
    seen: dict[str, Any] = {}

    async def scenario() -> None:
        async with mcp_session(stack.url, BearerAuth(token), sent) as client:
            await client.list_tools()
            session_id = sent.session_ids()[-1]

            def get_stream_open() -> bool:
                return any(
                    r.method == "GET" and r.session_id == session_id and r.status == 200
                    for r in stack.upstream.seen
                )

            await anyio.to_thread.run_sync(lambda: wait_until(get_stream_open, what="the GET stream"))
            seen["echo"] = text_of(await client.call_tool("echo", {"text": "while streaming"}))
            seen["sse"] = await anyio.to_thread.run_sync(
                lambda: raw_call(stack.url, token, session_id, "echo")
            )

    anyio.run(scenario)

    assert seen["echo"] == "while streaming"
    sse: httpx.Response = seen["sse"]
    assert sse.status_code == 200 and sse.headers["content-type"].startswith("text/event-stream")
    assert "while streaming" not in sse.text and '"text":"x"' in sse.text.replace(" ", "")


def test_an_id_used_by_someone_else_before_its_owner_is_refused_and_the_owner_carries_on(
    stack: Stack,
) -> None:
    alice = BearerAuth(stack.idp.token("alice"))
    mallory_token = stack.idp.token("mallory")
    trace_id = new_trace_id()
    alice.trace_id = trace_id
    seen: dict[str, Any] = {}
    sent = SentRequests()

    async def race(response: httpx2.Response) -> None:
        # The id is in the initialize response's headers: mallory uses it before the SDK
        # client's next request (notifications/initialized) leaves.
        issued = response.headers.get("mcp-session-id")
        if issued and "early" not in seen:
            seen["early"] = await anyio.to_thread.run_sync(
                lambda: raw_call(stack.url, mallory_token, issued, "whoami", trace_id)
            )
            seen["sent_before_early"] = list(sent.items)

    async def scenario() -> None:
        async with (
            httpx2.AsyncClient(
                auth=alice, timeout=10, event_hooks={"request": [sent.hook], "response": [race]}
            ) as http,
        ):
            from mcp import Client
            from mcp.client.streamable_http import streamable_http_client

            async with Client(
                streamable_http_client(stack.url, http_client=http), mode="legacy", read_timeout_seconds=10
            ) as client:
                seen["after"] = text_of(await client.call_tool("whoami", {}))

    anyio.run(scenario)

    early: httpx.Response = seen["early"]
    assert seen["sent_before_early"] == [("POST", None)]  # only initialize had gone out
    assert early.status_code == 404 and early.content == NOT_FOUND_BODY
    assert seen["after"] == "alice"
    assert not [r for r in stack.upstream.seen if mallory_token in r.headers.get("authorization", "")]
    spans = stack.checks_once(trace_id, lambda s: "subject_mismatch" in reasons(s), "mallory's refusal")
    assert [r for r in reasons(spans) if r != "allowed"] == ["subject_mismatch"]


def test_a_never_issued_id_is_unknown(stack: Stack) -> None:
    trace_id = new_trace_id()
    seen_before = len(stack.upstream.seen)
    response = raw_call(stack.url, stack.idp.token("alice"), "made-up-0123456789", "echo", trace_id)
    assert response.status_code == 404 and response.content == NOT_FOUND_BODY
    assert response.headers["content-type"] == "application/json"
    assert len(stack.upstream.seen) == seen_before  # refused before the upstream
    (span,) = wait_until(lambda: stack.checks(trace_id), what="the check span")
    assert span.attributes["authz.reason"] == "session_unknown"
    assert span.attributes["http.response.status_code"] == 404
    # Nothing was bound on that use: the same id is still unknown, to anyone.
    again = raw_call(stack.url, stack.idp.token("bob"), "made-up-0123456789", "echo")
    assert again.status_code == 404 and again.content == NOT_FOUND_BODY


def test_a_local_reply_passes_the_response_path_untouched(stack: Stack) -> None:
    response = httpx.post(stack.url, content=b"{}", headers={"content-type": "application/json"}, timeout=10)
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer ")
    assert json.loads(response.content) == {"error": "unauthorized"}


def test_refresh_then_the_owners_delete_then_reuse(stack: Stack) -> None:
    auth = BearerAuth(stack.idp.token("carol", now=time.time() - 60))
    trace_id = new_trace_id()
    auth.trace_id = trace_id
    sent = SentRequests()
    seen: dict[str, Any] = {}

    async def scenario() -> None:
        async with mcp_session(stack.url, auth, sent) as client:
            seen["one"] = text_of(await client.call_tool("echo", {"text": "one"}))
            auth.token = stack.idp.token("carol")  # the refresh: same person, new token
            seen["two"] = text_of(await client.call_tool("whoami", {}))
        # Leaving, the SDK sent its DELETE; the server's answer repeats the id: not a re-issue.
        session_id = sent.session_ids()[-1]
        seen["reuse"] = await anyio.to_thread.run_sync(
            lambda: raw_call(stack.url, auth.token, session_id, "echo", trace_id)
        )

    anyio.run(scenario)

    assert (seen["one"], seen["two"]) == ("one", "carol")
    assert len(set(sent.session_ids())) == 1
    session_id = sent.session_ids()[-1]
    delete = [r for r in stack.upstream.seen if r.session_id == session_id and r.method == "DELETE"]
    assert [r.status for r in delete] == [200]
    assert seen["reuse"].status_code == 404 and seen["reuse"].content == NOT_FOUND_BODY
    spans = stack.checks_once(trace_id, lambda s: "session_terminated" in reasons(s), "the reuse's refusal")
    assert [r for r in reasons(spans) if r != "allowed"] == ["session_terminated"]
    processes = stack.processes(trace_id)
    assert "session_reissued" not in reasons(processes)


def test_an_upstream_that_forgets_a_session_leaves_a_tombstone(stack: Stack) -> None:
    """The MCP server restarts and forgets every session: its own 404 reaches the client, and
    the gateway ends the session, so the id is never bound again."""
    token = stack.idp.token("dave")
    sent = SentRequests()
    seen: dict[str, Any] = {}

    async def scenario() -> None:
        async with mcp_session(stack.url, BearerAuth(token), sent) as client:
            seen["one"] = text_of(await client.call_tool("echo", {"text": "one"}))
            session_id = sent.session_ids()[-1]
            # A 404 for another reason (a wrong path) ends nothing.
            wrong = await anyio.to_thread.run_sync(
                lambda: httpx.post(
                    stack.url.replace("/mcp", "/nowhere"),
                    headers={"authorization": f"Bearer {token}", "mcp-session-id": session_id},
                    content=b"{}",
                    timeout=10,
                )
            )
            seen["wrong_path"] = wrong
            seen["still"] = text_of(await client.call_tool("echo", {"text": "still"}))
            port = stack.upstream.port
            await anyio.to_thread.run_sync(stack.upstream.stop)
            stack.upstream = await anyio.to_thread.run_sync(lambda: McpUpstream(port))
            trace_id = new_trace_id()
            seen["trace"] = trace_id
            seen["forgot"] = await anyio.to_thread.run_sync(
                lambda: raw_call(stack.url, token, session_id, "echo", trace_id)
            )
            seen["after"] = await anyio.to_thread.run_sync(
                lambda: raw_call(stack.url, token, session_id, "echo", trace_id)
            )
            with pytest.raises(MCPError):
                await client.call_tool("echo", {"text": "gone"})

    anyio.run(scenario)

    assert seen["wrong_path"].status_code == 404 and seen["wrong_path"].content != NOT_FOUND_BODY
    assert (seen["one"], seen["still"]) == ("one", "still")
    forgot, after = seen["forgot"], seen["after"]
    assert forgot.status_code == 404 and forgot.content == NOT_FOUND_BODY  # the server's own
    assert after.status_code == 404 and after.content == NOT_FOUND_BODY  # the gateway's
    session_id = sent.session_ids()[-1]
    reached = [r for r in stack.upstream.seen if r.session_id == session_id and r.method == "POST"]
    assert len(reached) == 1  # only the call that found the server had forgotten
    trace_id = seen["trace"]
    (ended,) = wait_until(
        lambda: [s for s in stack.processes(trace_id) if s.attributes["authz.reason"] != "allowed"],
        what="the tombstone's Process span",
    )
    assert ended.attributes["authz.reason"] == "session_terminated"
    assert ended.attributes["authz.decision"] == "allow"  # the upstream's 404 was delivered
    checks = stack.checks_once(trace_id, lambda s: len(s) == 2, "two checks")
    assert sorted(reasons(checks)) == ["allowed", "session_terminated"]


# ---- an upstream that issues what the test tells it to ----


@dataclass
class IssuingStack:
    url: str
    idp: TestIssuer
    gateway: GatewayProcess
    upstream: IssuingUpstream

    def send(
        self, subject: str, *, issue: str = "", issue_hex: str = "", session: str = "", delay: float = 0
    ) -> httpx.Response:
        headers = {"authorization": f"Bearer {self.idp.token(subject)}", "content-type": "application/json"}
        if delay:
            headers["x-delay"] = str(delay)
        if issue:
            headers["x-issue"] = issue
        if issue_hex:
            headers["x-issue-hex"] = issue_hex
        if session:
            headers["mcp-session-id"] = session
        return httpx.post(self.url, headers=headers, content=b"{}", timeout=10)


@pytest.fixture(scope="module")
def issuing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IssuingStack]:
    work = tmp_path_factory.mktemp("extproc-issuing")
    idp = TestIssuer()
    upstream = IssuingUpstream()
    started: list[Any] = []
    try:
        gateway = GatewayProcess(response_config(idp), work)
        started.append(gateway)
        envoy, listener_port = start_envoy(work, [gateway.port], upstream.port)
        started.append(envoy)
        yield IssuingStack(f"http://127.0.0.1:{listener_port}/mcp", idp, gateway, upstream)
    finally:
        for part in reversed(started):
            part.stop()
        upstream.stop()
        idp.stop()


def test_an_id_reissued_to_another_identity_is_never_delivered(issuing: IssuingStack) -> None:
    first = issuing.send("alice", issue="shared-id-1")
    assert first.status_code == 200 and first.headers["mcp-session-id"] == "shared-id-1"
    # The owner's own id repeated, in her own session, is normal; so is the same id handed to
    # her again.
    assert issuing.send("alice", issue="shared-id-1", session="shared-id-1").status_code == 200
    assert issuing.send("alice", issue="shared-id-1").status_code == 200
    stolen = issuing.send("bob", issue="shared-id-1")
    assert stolen.status_code == 502
    assert "shared-id-1" not in stolen.text and "mcp-session-id" not in stolen.headers
    assert json.loads(stolen.content) == {"error": "bad_gateway"}
    # Alice's session is unharmed; bob cannot use it either.
    assert issuing.send("alice", session="shared-id-1").status_code == 200
    assert issuing.send("bob", session="shared-id-1").status_code == 404


@pytest.mark.parametrize(
    ("issue", "issue_hex"),
    [("dup-a,dup-b", ""), ("", "6964e9"), ("", "69642c6964")],
    ids=["two-headers", "not-ascii", "comma"],
)
def test_a_malformed_issued_id_is_refused_and_binds_nothing(
    issuing: IssuingStack, issue: str, issue_hex: str
) -> None:
    response = issuing.send("alice", issue=issue, issue_hex=issue_hex)
    # The stream ends with INVALID_ARGUMENT; Envoy (failure_mode_allow: false) answers its
    # status_on_error, 503, itself.
    assert response.status_code == 503 and response.content == b""
    assert "mcp-session-id" not in response.headers
    for candidate in ("dup-a", "dup-b", "id,id"):
        assert issuing.send("alice", session=candidate).status_code in (400, 404)
    assert issuing.gateway.alive()


def test_when_the_stream_fails_mid_request_the_response_is_not_delivered(issuing: IssuingStack) -> None:
    """The gateway dies while the upstream prepares its answer: Envoy answers the client itself
    (its status_on_error, 503, empty body), and the upstream's response, with the id it issued,
    never reaches it."""
    assert issuing.send("erin", issue="before-kill").status_code == 200
    answered: dict[str, httpx.Response] = {}
    arrived_before = issuing.upstream.arrived

    def slow_request() -> None:
        answered["response"] = issuing.send("erin", issue="during-kill", delay=1.5)

    thread = threading.Thread(target=slow_request)
    thread.start()
    wait_until(lambda: issuing.upstream.arrived > arrived_before, what="the request at the upstream")
    issuing.gateway.kill()
    thread.join(15)
    response = answered["response"]
    assert response.status_code == 503 and response.content == b""
    assert "mcp-session-id" not in response.headers
    # Envoy answered at once, when the stream broke; the upstream's answer came later, to no one.
    wait_until(lambda: "during-kill" in issuing.upstream.answered, what="the upstream's answer")
