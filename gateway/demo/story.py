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

    async def gateway(
        self, trace_id: str, expected: list[Expected], binds_expected: int = 0
    ) -> list[SeenDecision]:
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
        # The response that issues a session id binds it (session.bind_on: response): the
        # Process span of initialize's response says so.
        self.bound = await anyio.to_thread.run_sync(
            lambda: self.receiver.wait_binds(trace_id, binds_expected)
        )
        if self.bound:
            self.said("", "(the session id was bound to the token's iss+sub when the server issued it)")
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
        trace = self.step(
            f"alice opens an MCP session, with access token AT1 [{fingerprint(at1)}]; mallory sees the id",
            alice,
        )
        mallory = self.tokens.mint("mallory", 0)
        early: dict[str, Any] = {}
        whoami_body = {"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "whoami"}}

        async def use_it_first(response: httpx2.Response) -> None:
            # mallory sees the id go by and uses it before alice's client sends anything more.
            issued = response.headers.get("mcp-session-id")
            if issued and "response" not in early:
                early["sent_before"] = len(sent.items)
                early["response"] = await self.raw("POST", mallory, issued, trace, whoami_body)

        async with mcp_session(self.url, alice, sent, on_response=use_it_first) as client:
            tools = sorted(t.name for t in (await client.list_tools()).tools)
            echo = text_of(await client.call_tool("echo", {"text": "hello"}))
            session_id = sent.session_ids()[-1]
            first_use: httpx2.Response = early["response"]
            self.said("client", f"initialize -> session [{fingerprint(session_id)}]")
            self.said(
                "mallory",
                f"uses it before alice's client sends its next request -> HTTP {first_use.status_code}",
            )
            self.said("client", f"tools/list -> {', '.join(tools)}; tools/call echo('hello') -> {echo!r}")
            expected = [*INITIALIZE, call("whoami"), ("POST", "tools/list", ""), call("echo")]
            seen = await self.gateway(trace, expected, binds_expected=1)
            self.expect(echo == "hello", "echo to answer 'hello'")
            refused_early = early["sent_before"] == 1 and first_use.status_code == 404
            self.expect(refused_early, "mallory's early use refused")
            early_refusals = [d.reason for d in seen if d.decision != "allow"]
            self.expect(early_refusals == ["subject_mismatch"], "only mallory's early use refused")
            self.expect(self.bound == 1, "the session bound once, as issued")

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

            trace = self.step("mallory replays alice's session id, with a valid token of her own", alice)
            hijack = await self.raw("POST", mallory, session_id, trace, whoami_body)
            self.said("mallory", f"tools/call whoami -> HTTP {hijack.status_code} {hijack.text}")
            guessed = await self.raw("POST", mallory, "guessed-0123456789abcdef", trace, whoami_body)
            self.said("mallory", f"the same with a made-up session id -> HTTP {guessed.status_code}")
            seen = await self.gateway(trace, [call("whoami"), call("whoami")])
            self.expect(hijack.status_code == 404 and guessed.status_code == 404, "HTTP 404 for mallory")
            reasons = [d.reason for d in seen]
            self.expect(reasons == ["subject_mismatch", "session_unknown"], "mismatch, then unknown")
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
        seen = await self.gateway(trace, [DELETE, *INITIALIZE, call("echo"), DELETE], binds_expected=1)
        self.expect(echo == "hello again" and new_id != session_id, "a new session that works")
        refused = [d for d in seen if d.decision != "allow"]
        self.expect(
            [(d.http_method, d.reason) for d in refused] == [("DELETE", "session_terminated")]
            and self.bound == 1,
            "the new session's checks allowed, only the old id refused",
        )
        return not self.failures
