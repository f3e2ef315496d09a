"""The demo's script: one MCP session through Envoy and the gateway, told step by step.

Each step runs real MCP traffic (the SDK's client), then prints what the client saw and
what the gateway decided, read from the gateway's own Check spans. Each step also checks
its outcome; the demo fails (exit 1) if any step did not go as the gateway promises.
Tokens and session ids are printed only as short one-way fingerprints.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx2
from mcp.shared.exceptions import MCPError

from gateway.demo.client import BearerAuth, SentRequests, fingerprint, mcp_session, new_trace_id
from gateway.demo.receiver import DecisionReceiver, SeenDecision

# (HTTP method, MCP method, tool) of a check the step waits for before printing.
Expected = tuple[str, str, str]
INITIALIZE: list[Expected] = [("POST", "initialize", ""), ("POST", "notifications/initialized", "")]


def call(tool: str) -> Expected:
    return ("POST", "tools/call", tool)


DELETE: Expected = ("DELETE", "", "")


def text_of(result: Any) -> str:
    return "".join(getattr(part, "text", "") for part in result.content)


def describe(decision: SeenDecision) -> str:
    what = " ".join(x for x in (decision.http_method, decision.mcp_method, decision.tool) if x)
    verdict = "allow" if decision.decision == "allow" else f"deny {decision.status}"
    notes = []
    if claim := decision.attributes.get("authz.mismatch.claim"):
        notes.append(f"bound {claim} differs")
    note = f"  ({'; '.join(notes)})" if notes else ""
    return f"{what:<32} {verdict:<9} {decision.reason}{note}"


@dataclass
class Tokens:
    """Mints access tokens for the demo's people: `mint(subject, issued_seconds_ago)`."""

    mint: Callable[[str, float], str]


@dataclass
class Story:
    url: str
    receiver: DecisionReceiver
    tokens: Tokens
    out: Callable[[str], None] = print
    failures: list[str] = field(default_factory=list)
    _step: int = 0
    # How many sessions the last step's requests bound (GETs included).
    bound: int = 0

    # ---- telling ----
    def step(self, title: str, auth: BearerAuth) -> str:
        self._step += 1
        self.out("")
        self.out(f"{self._step}. {title}")
        trace_id = new_trace_id()
        auth.trace_id = trace_id
        return trace_id

    def said(self, who: str, text: str) -> None:
        self.out(f"   {who:<8} {text}")

    def expect(self, condition: bool, what: str) -> None:
        if not condition:
            self.failures.append(f"step {self._step}: {what}")
            self.out(f"   !! expected {what}")

    async def gateway(self, trace_id: str, expected: list[Expected]) -> list[SeenDecision]:
        """Wait for the gateway's decisions on these requests, print them, return them."""
        wanted = Counter(expected)

        def arrived(decisions: list[SeenDecision]) -> bool:
            have = Counter((d.http_method, d.mcp_method, d.tool) for d in decisions)
            return all(have[key] >= n for key, n in wanted.items())

        decisions = await anyio.to_thread.run_sync(lambda: self.receiver.wait(trace_id, arrived))
        # The SDK's background GET (server-to-client stream) is checked too; it is not part of the story.
        shown = [d for d in decisions if d.http_method != "GET"]
        for i, decision in enumerate(shown):
            self.said("gateway" if i == 0 else "", describe(decision))
        # The first request that carries a new session id binds it: notifications/initialized,
        # or the SDK's GET stream, whichever reaches the gateway first.
        self.bound = sum(d.session_new for d in decisions)
        if self.bound:
            self.said("", "(the new session id is now bound to the token's iss+sub)")
        self.expect(arrived(decisions), f"the gateway's decisions on {len(expected)} requests")
        return shown

    # ---- raw HTTP, for callers that are not the SDK client holding the session ----
    async def raw(
        self, method: str, token: str, session_id: str, trace_id: str, body: Any = None
    ) -> httpx2.Response:
        headers = {
            "authorization": f"Bearer {token}",
            "mcp-session-id": session_id,
            "mcp-protocol-version": "2025-11-25",
            "accept": "application/json, text/event-stream",
            "traceparent": f"00-{trace_id}-{new_trace_id()[:16]}-01",
        }
        content = None
        if body is not None:
            headers["content-type"] = "application/json"
            content = json.dumps(body)
        async with httpx2.AsyncClient(timeout=10) as http:
            return await http.request(method, self.url, headers=headers, content=content)

    # ---- the script ----
    async def run(self) -> bool:
        at1 = self.tokens.mint("alice", 60)
        alice = BearerAuth(at1)
        sent = SentRequests()
        trace = self.step(f"alice opens an MCP session, with access token AT1 [{fingerprint(at1)}]", alice)
        async with mcp_session(self.url, alice, sent) as client:
            tools = sorted(t.name for t in (await client.list_tools()).tools)
            echo = text_of(await client.call_tool("echo", {"text": "hello"}))
            session_id = sent.session_ids()[-1]
            self.said("client", f"initialize -> session [{fingerprint(session_id)}]")
            self.said("", f"tools/list -> {', '.join(tools)}; tools/call echo('hello') -> {echo!r}")
            seen = await self.gateway(trace, [*INITIALIZE, ("POST", "tools/list", ""), call("echo")])
            self.expect(echo == "hello", "echo to answer 'hello'")
            self.expect(all(d.decision == "allow" for d in seen), "every check allowed")
            self.expect(self.bound == 1, "the session bound once")

            at2 = self.tokens.mint("alice", 0)
            trace = self.step(
                f"alice's token is refreshed: AT2 [{fingerprint(at2)}], same iss+sub, new iat and jti", alice
            )
            alice.token = at2
            whoami = text_of(await client.call_tool("whoami", {}))
            same = sent.session_ids()[-1] == session_id
            self.said(
                "client",
                f"tools/call whoami -> {whoami!r}, in session [{fingerprint(sent.session_ids()[-1])}]",
            )
            seen = await self.gateway(trace, [call("whoami")])
            self.expect(same and whoami == "alice", "the same session to carry on under AT2")
            self.expect([d.reason for d in seen] == ["allowed"], "the refreshed token allowed")

            mallory = self.tokens.mint("mallory", 0)
            trace = self.step("mallory replays alice's session id, with a valid token of her own", alice)
            body = {
                "jsonrpc": "2.0",
                "id": 7,
                "method": "tools/call",
                "params": {"name": "whoami", "arguments": {}},
            }
            hijack = await self.raw("POST", mallory, session_id, trace, body)
            self.said("mallory", f"tools/call whoami -> HTTP {hijack.status_code} {hijack.text}")
            seen = await self.gateway(trace, [call("whoami")])
            self.expect(hijack.status_code == 404, "HTTP 404 for mallory")
            self.expect([d.reason for d in seen] == ["subject_mismatch"], "reason subject_mismatch")
            trace = new_trace_id()
            alice.trace_id = trace
            added = text_of(await client.call_tool("add", {"a": 2, "b": 3}))
            self.said(
                "alice", f"tools/call add(2, 3) -> {added!r}, session [{fingerprint(sent.session_ids()[-1])}]"
            )
            seen = await self.gateway(trace, [call("add")])
            self.expect(added == "5" and sent.session_ids()[-1] == session_id, "alice's session untouched")

            trace = self.step(
                "alice ends the session (an MCP DELETE); her client still holds the old id", alice
            )
            deleted = await self.raw("DELETE", at2, session_id, trace)
            self.said("alice", f"DELETE -> HTTP {deleted.status_code}")
            try:
                await client.call_tool("echo", {"text": "still there?"})
                sdk_error = ""
            except MCPError as exc:
                sdk_error = str(exc)
            self.said("client", f"tools/call echo on the old id -> SDK error {sdk_error!r}")
            seen = await self.gateway(trace, [DELETE, call("echo")])
            gone = "session not found" in sdk_error.lower()  # the 404's JSON-RPC error, as the SDK reads it
            self.expect(deleted.status_code == 200 and gone, "the session to be gone")
            self.expect(
                [d.reason for d in seen] == ["allowed", "session_terminated"], "DELETE allowed, then 404"
            )
            trace = self.step("alice's client starts a new session and carries on", alice)
        renewed = SentRequests()
        async with mcp_session(self.url, alice, renewed) as client:
            echo = text_of(await client.call_tool("echo", {"text": "hello again"}))
            new_id = renewed.session_ids()[-1]
        self.said("client", "the SDK closed the old session (its DELETE: already ended), then")
        self.said(
            "", f"initialize -> new session [{fingerprint(new_id)}]; echo -> {echo!r}; DELETE on leaving"
        )
        seen = await self.gateway(trace, [DELETE, *INITIALIZE, call("echo"), DELETE])
        self.expect(echo == "hello again" and new_id != session_id, "a new session that works")
        refused = [d for d in seen if d.decision != "allow"]
        self.expect(
            [(d.http_method, d.reason) for d in refused] == [("DELETE", "session_terminated")]
            and self.bound == 1,
            "the new session's checks allowed, only the old id refused",
        )
        return not self.failures
