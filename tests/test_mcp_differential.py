"""Differential: the gateway's reading of an MCP request body against what real MCP servers run.

Every body of tests/corpus/mcp_bodies.json is POSTed to two real MCP servers, one built with
each official SDK (tests/support/sdk_servers.py: TypeScript `createMcpExpressApp()`, Python
low-level `Server`, both stateless streamable HTTP, both running any tool name they are
asked for), and judged by `gateway.request.judge_mcp` from a CheckRequest carrying the same
headers and raw body bytes, as Envoy sends it with `pack_as_bytes`.

The invariant: when a server executes a call, the gateway judged that same call (method and
name), or refused the request with the reason the corpus documents. A lenient parser (gzip,
a BOM, UTF-16, duplicate keys, absurd nesting...) must never run a call the gateway did not
see. The corpus also documents what each SDK executes; `pytest -s` prints the table.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from gateway.envoy_api.envoy.service.auth.v3 import attribute_context_pb2 as attrs
from gateway.envoy_api.envoy.service.auth.v3 import external_auth_pb2
from tests.support.sdk_servers import (
    CorpusEntry,
    ExecutedCall,
    Reply,
    load_corpus,
    python_sdk_server,
    ts_sdk_server,
)

pytestmark = pytest.mark.timeout(120)

CORPUS = load_corpus()
BY_ID = {entry.id: entry for entry in CORPUS}
SDKS = ("ts", "py")
REFUSALS = {"request_unparseable", "request_invalid", "mcp_header_mismatch"}

# The bodies that got a forbidden tool to run through Envoy on the TypeScript SDK before
# the fix: each must be refused. (All are also in the Envoy test.)
KNOWN_ATTACKS = {
    "gzip": "request_unparseable",
    "deflate": "request_unparseable",
    "bom-utf8": "request_unparseable",
    "utf16le-charset": "request_unparseable",
    "utf16-bom-charset": "request_unparseable",
    "number-5000-digits": "request_unparseable",
    "depth-1500-arguments": "request_unparseable",
    "depth-20000-arguments": "request_unparseable",
    "dup-name-forbidden-last": "request_unparseable",
    "dup-name-forbidden-first": "request_unparseable",
}

SdkResults = dict[str, dict[str, Reply]]


@pytest.fixture(scope="module")
def sdk_results(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SdkResults]:
    """Each corpus body, sent once to each SDK server: entry id -> {"ts": Reply, "py": Reply}."""
    with ts_sdk_server(tmp_path_factory.mktemp("ts-sdk")) as ts, python_sdk_server() as py:
        yield {
            entry.id: {"ts": ts.post(entry.headers, entry.body), "py": py.post(entry.headers, entry.body)}
            for entry in CORPUS
        }


def check_request_for(entry: CorpusEntry) -> external_auth_pb2.CheckRequest:
    """The CheckRequest Envoy sends for this body (`with_request_body.pack_as_bytes: true`)."""
    headers = {
        ":method": "POST",
        ":path": "/mcp",
        ":authority": "mcp.example.test",
        ":scheme": "http",
        "content-length": str(len(entry.body)),
        "accept": "application/json, text/event-stream",
        **{name.lower(): value for name, value in entry.headers.items()},
    }
    http = attrs.AttributeContext.HttpRequest(
        id="req-1",
        method="POST",
        path="/mcp",
        host="mcp.example.test",
        scheme="http",
        headers=headers,
        raw_body=entry.body,
        size=len(entry.body),
        protocol="HTTP/1.1",
    )
    return external_auth_pb2.CheckRequest(
        attributes=attrs.AttributeContext(request=attrs.AttributeContext.Request(http=http))
    )


def gateway_view(entry: CorpusEntry) -> tuple[str, tuple[ExecutedCall, ...]]:
    """("calls", the (method, name) pairs the gateway judges), or (the refusal reason, ())."""
    try:
        from gateway.request import RequestError, judge_mcp
    except ImportError as exc:
        pytest.fail(f"the gateway has no judge_mcp yet: {exc}")
    try:
        calls = judge_mcp(check_request_for(entry))
    except RequestError as exc:
        return str(exc.reason), ()
    return "calls", tuple((call.method, call.name) for call in calls)


def short(text: str, size: int = 40) -> str:
    return text if len(text) <= size else f"{text[:size]}...({len(text)} chars)"


def show(calls: Any) -> str:
    return "[" + ", ".join(f"{m} {short(n)!r}" for m, n in calls) + "]" if calls else "-"


def test_the_corpus_is_well_formed() -> None:
    assert len(BY_ID) == len(CORPUS), "corpus ids must be unique"
    for entry in CORPUS:
        assert entry.gateway == "calls" or entry.gateway in REFUSALS, entry.id
        assert bool(entry.calls) == (entry.gateway == "calls"), f"{entry.id}: calls iff gateway == 'calls'"
        assert entry.comment, entry.id
        assert all(name == name.lower() for name in entry.headers), f"{entry.id}: lower-case header names"
    for attack_id, reason in KNOWN_ATTACKS.items():
        assert BY_ID[attack_id].gateway == reason and BY_ID[attack_id].envoy, attack_id


@pytest.mark.parametrize("sdk", SDKS)
def test_each_sdk_executes_what_the_corpus_documents(sdk: str, sdk_results: SdkResults) -> None:
    """The `ts` and `py` columns of the corpus are what the pinned SDKs really do."""
    rows, changed = [], []
    for entry in CORPUS:
        reply = sdk_results[entry.id][sdk]
        documented = list(getattr(entry, sdk))
        rows.append(f"  {entry.id:36} {reply.status}  {show(reply.calls)}")
        if reply.calls != documented:
            changed.append(f"  {entry.id}: documented {show(documented)}, executed {show(reply.calls)}")
    executed = sum(bool(sdk_results[e.id][sdk].calls) for e in CORPUS)
    print(f"\n{sdk} SDK server: executed calls for {executed} of {len(CORPUS)} bodies (status, calls)")
    print("\n".join(rows))
    assert not changed, (
        f"the {sdk} SDK server no longer does what tests/corpus/mcp_bodies.json says "
        "(an SDK upgrade?); check the differential tests, then update the corpus:\n" + "\n".join(changed)
    )


@pytest.mark.parametrize("entry", CORPUS, ids=[e.id for e in CORPUS])
def test_the_gateway_judges_as_documented(entry: CorpusEntry) -> None:
    outcome, calls = gateway_view(entry)
    assert outcome == entry.gateway, f"{entry.comment}\n  calls judged: {show(calls)}"
    if outcome == "calls":
        assert calls == entry.calls, entry.comment


@pytest.mark.parametrize("entry", CORPUS, ids=[e.id for e in CORPUS])
def test_every_call_an_sdk_executes_is_a_call_the_gateway_judged(
    entry: CorpusEntry, sdk_results: SdkResults
) -> None:
    outcome, judged = gateway_view(entry)
    for sdk in SDKS:
        executed = sdk_results[entry.id][sdk].calls
        if not executed:
            continue
        if outcome != "calls":
            # A refusal is safe; refusing what a server accepts must be a deliberate, documented
            # choice (the corpus says so), never an accident that breaks real clients.
            assert entry.refused, (
                f"the {sdk} SDK executed {show(executed)} but the gateway refused the request "
                f"({outcome}), and the corpus expects {show(entry.calls)}: {entry.comment}"
            )
            continue
        missed = [call for call in executed if call not in judged]
        assert not missed, (
            f"BYPASS: the {sdk} SDK executed {show(missed)}, which the gateway never judged "
            f"(it judged {show(judged)}): {entry.comment}"
        )


@pytest.mark.parametrize("attack_id", sorted(KNOWN_ATTACKS))
def test_the_known_attacks_run_on_the_ts_sdk_and_the_gateway_refuses_them(
    attack_id: str, sdk_results: SdkResults
) -> None:
    entry = BY_ID[attack_id]
    assert sdk_results[attack_id]["ts"].calls, "the TypeScript SDK should run this body (the attack is live)"
    outcome, calls = gateway_view(entry)
    assert outcome == KNOWN_ATTACKS[attack_id], f"{entry.comment}\n  calls judged: {show(calls)}"
