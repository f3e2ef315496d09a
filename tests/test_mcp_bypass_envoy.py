"""The tool allow-list cannot be bypassed with a body only a lenient server reads, through a real Envoy.

Envoy (examples/envoy/envoy.yaml, this test's ports put in), the gateway with the policies
directory examples/policies/tool-scopes (session binding + a tool allow-list per scope), and
as the upstream an MCP server built with the official TypeScript SDK (`createMcpExpressApp()`,
stateless, runs any tool it is asked for: tests/node/mcp_server.mjs). The caller's token has
the scope "tools:echo" only.

Each hostile body of tests/corpus/mcp_bodies.json marked `envoy` (gzip, deflate, a BOM,
UTF-16, a 5,000-digit number, 1,500 and 20,000 deep arguments, duplicate name keys) makes
the TS server run a tool when sent to it directly; through Envoy it must get 400 and never
reach the server. A plain echo passes and runs, a plain drop_tables gets 403: the path is live.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.support.issuer import TestIssuer
from tests.support.processes import REPO, GatewayProcess, free_port, start_envoy
from tests.support.sdk_servers import CorpusEntry, Reply, TsSdkServer, load_corpus, ts_sdk_server

pytestmark = pytest.mark.timeout(90)

CORPUS = {entry.id: entry for entry in load_corpus()}
HOSTILE = [entry for entry in CORPUS.values() if entry.envoy]
FORBIDDEN = ("tools/call", "drop_tables")
ALLOWED = ("tools/call", "echo")


@dataclass
class Stack:
    ts: TsSdkServer
    url: str
    token: str

    def via_envoy(self, entry: CorpusEntry) -> Reply:
        headers = {**entry.headers, "authorization": f"Bearer {self.token}"}
        return self.ts.post(headers, entry.body, url=self.url)

    def reached_server(self, reply: Reply) -> list[dict[str, Any]]:
        return self.ts.requests(reply.tag)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("mcp-bypass")
    idp = TestIssuer()
    started: list[Any] = []
    try:
        with ts_sdk_server(work) as ts:
            config = {
                "policies": str(REPO / "examples" / "policies" / "tool-scopes"),
                "store": "memory://",
                "auth": {"issuers": [idp.issuer_config()]},
            }
            gateway = GatewayProcess(config, work)
            started.append(gateway)
            # The example's tracer exports to :4317; point it at a port of this test's own.
            envoy, port = start_envoy(
                work, [gateway.port], ts.port, extra={"port_value: 4317": f"port_value: {free_port()}"}
            )
            started.append(envoy)
            yield Stack(ts, f"http://127.0.0.1:{port}/mcp", idp.token("alice", scope="tools:echo"))
    finally:
        for part in reversed(started):
            part.stop()
        idp.stop()


def test_an_allowed_tool_call_reaches_the_server_and_runs(stack: Stack) -> None:
    reply = stack.via_envoy(CORPUS["valid-call-allowed"])
    assert reply.status == 200, reply.body
    assert reply.calls == [ALLOWED]
    assert b"ran echo" in reply.body


def test_a_plain_forbidden_tool_call_is_403_and_never_reaches_the_server(stack: Stack) -> None:
    reply = stack.via_envoy(CORPUS["valid-call-forbidden"])
    assert reply.status == 403, reply.body
    assert 'scope="tools:drop_tables"' in reply.headers["www-authenticate"]
    assert reply.calls == []
    assert stack.reached_server(reply) == []


@pytest.mark.parametrize("entry", HOSTILE, ids=[e.id for e in HOSTILE])
def test_a_hostile_body_is_400_and_never_reaches_the_server(stack: Stack, entry: CorpusEntry) -> None:
    # Sent directly, the TS SDK server reads the body and runs a tool: the attack is real.
    # (drop_tables, or echo for the duplicate key a first-wins reader would take.)
    direct = stack.ts.post(entry.headers, entry.body)
    assert direct.status == 200 and direct.calls, f"{entry.comment}: the TS server did not run it directly"
    assert direct.calls == list(entry.ts)

    reply = stack.via_envoy(entry)
    assert reply.status == 400, f"{entry.comment}: {reply.status} {reply.body[:200]!r}, ran {reply.calls}"
    assert FORBIDDEN not in reply.calls
    assert reply.calls == []
    assert stack.reached_server(reply) == [], "the gateway let it through to the server"


def test_the_hostile_corpus_is_the_attack_list() -> None:
    assert {e.id for e in HOSTILE} >= {
        "gzip",
        "deflate",
        "bom-utf8",
        "utf16le-charset",
        "utf16-bom-charset",
        "number-5000-digits",
        "depth-1500-arguments",
        "depth-20000-arguments",
        "dup-name-forbidden-last",
        "dup-name-forbidden-first",
    }
