"""Handles (MCP 2026-07-28): kinds in policy files, the request side of the check, the
response side's core (minting), the store's key space, the admin CLI and telemetry.

Checks go through the real Authorizer (`policy test`'s CaseRunner, the gateway's own check
path after token verification) with real stores; nothing here is mocked.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gateway import decision
from gateway.commands.policy_cases import CaseRunner, identity_from_claims, parse_cases
from gateway.config import AuthConfig, ConfigError, HandlesConfig, SessionConfig, config_from_mapping
from gateway.extproc_handles import ResponseMinting
from gateway.identity.verifier import TokenVerifier
from gateway.mcp import EventStream, Unparseable, response_messages
from gateway.pipeline import Authorizer, PolicyHolder
from gateway.policy.loader import PolicyLoadError, load_policy_dir, load_policy_set
from gateway.request import from_check_request
from gateway.session import open_store
from gateway.session.handles import (
    HandleBinder,
    HandleRefused,
    handle_store_settings,
    handle_store_url,
    open_handle_store,
    store_key,
)
from gateway.session.memory import MemoryStore
from gateway.session.record import new_record, owner_key
from gateway.session.store import StoreSettings
from gateway.telemetry.tracing import CheckSpans, SubjectHasher
from tests.support.checks import check_request
from tests.support.processes import REPO, RedisServer

ENGINES = ("cel", "celpy")
EXAMPLE = REPO / "examples" / "policies" / "handles"
ISS = "https://idp.example.com"
ALICE = {"iss": ISS, "sub": "alice"}


def problems_of(text: str, engine: str = "cel") -> list[str]:
    with pytest.raises(PolicyLoadError) as caught:
        load_policy_set([("h.yaml", textwrap.dedent(text))], engine)
    return [str(p) for p in caught.value.problems]


# ------------------------------------------------------------------ kinds in policy files


@pytest.mark.parametrize("engine", ENGINES)
def test_the_example_loads_on_both_engines(engine: str) -> None:
    policy_set = load_policy_dir(EXAMPLE, engine)
    (policy,) = policy_set.policies
    (kind,) = policy.handles
    assert kind.name == "draft" and not kind.unknown_allowed and kind.ttl == 24 * 3600
    assert [name for name, _ in kind.bind] == ["iss", "sub"]
    # `presented` reads mcp.arguments: the body is read (and refused when unreadable) first.
    assert policy.uses_body and "mcp" in policy_set.reads
    assert "response" not in policy_set.reads


@pytest.mark.parametrize("engine", ENGINES)
def test_problems_in_handles_are_located(engine: str) -> None:
    text = """\
    name: h
    handles:
      "bad kind!":
        presented: '""'
      draft:
        presented: 'response.status == 200 ? "x" : ""'
        ttl: soon
        unknown: maybe
        colour: red
      job:
        minted: '"x"'
        refusal: {status: 200}
    rules: []
    """
    found = problems_of(text, engine)
    assert "h.yaml:3:3: handle kind 'bad kind!' must be 1-64 letters, digits, '-', '_' or '.'" in found
    column = 25 if engine == "cel" else 17  # cel: where its checker stops; celpy: the variable
    assert any(p.startswith(f"h.yaml:6:{column}: handles.draft.presented:") for p in found), found
    assert "h.yaml:8:14: handles.draft.unknown must be deny or allow, not 'maybe'" in found
    assert (
        "h.yaml:9:5: unknown key 'colour' in handles.draft (allowed: bind, minted, minted_by, presented, "
        "refusal, terminate, ttl, unknown)"
    ) in found
    assert "h.yaml:12:23: handles.job.refusal.status must be 400-599" in found


@pytest.mark.parametrize("engine", ENGINES)
def test_bad_values_of_a_kind_are_located(engine: str) -> None:
    base = """\
    name: h
    handles:
      draft:
        presented: '"x"'
        {line}
    """
    assert problems_of(base.format(line="ttl: soon"), engine) == [
        "h.yaml:5:10: handles.draft.ttl: not a duration: 'soon' (use e.g. 250ms, 30s, 5m, 1h)"
    ]
    assert problems_of(base.format(line="unknown: maybe"), engine) == [
        "h.yaml:5:14: handles.draft.unknown must be deny or allow, not 'maybe'"
    ]
    assert problems_of(base.format(line="bind: {kind: claims.sub}"), engine) == [
        "h.yaml:5:12: handles.draft.bind cannot use the reserved name 'kind'"
    ]
    if engine == "cel":  # celpy types at run time only
        assert problems_of(base.format(line="terminate: '\"yes\"'"), engine) == [
            "h.yaml:5:17: handles.draft.terminate: must evaluate to a bool, not string"
        ]


def test_response_is_known_only_to_minted() -> None:
    text = """\
    name: h
    rules:
      - name: r
        allow: response.status == 200
        deny: {reason: x}
    """
    for engine in ENGINES:
        found = problems_of(text, engine)
        assert len(found) == 1 and found[0].startswith("h.yaml:4:"), found
        assert "response" in found[0]


def test_a_minted_type_error_is_caught_at_load_with_the_cel_engine() -> None:
    text = """\
    name: h
    handles:
      draft:
        minted: 'response.json.id + ("x" + 1)'
    """
    (problem,) = problems_of(text, "cel")
    assert problem.startswith("h.yaml:4:38: handles.draft.minted: found no matching overload"), problem


def test_one_kind_in_two_policies_is_refused() -> None:
    kind = 'handles: {draft: {presented: \'""\'}}\n'
    with pytest.raises(PolicyLoadError) as caught:
        load_policy_set([("a.yaml", "name: a\n" + kind), ("b.yaml", "name: b\n" + kind)])
    assert [str(p) for p in caught.value.problems] == [
        "b.yaml:2:11: duplicate handle kind 'draft' (first at a.yaml:2:11)"
    ]


# ------------------------------------------------------------------ the request side

POLICY = """\
name: drafts
when: 'mcp.method == "tools/call"'
handles:
  draft:
    presented: '"draft_id" in mcp.arguments ? mcp.arguments.draft_id : ""'
    bind: {{iss: claims.iss, sub: claims.sub, tier: '"tier" in claims ? claims.tier : "free"'}}
    terminate: 'mcp.name == "delete_draft"'
    {extra}
rules:
  - name: paid-drafts-need-a-paid-caller
    when: handle.exists && "tier" in handle && handle.tier == "paid"
    allow: '"tier" in claims && claims.tier == "paid"'
    deny: {{status: 402, reason: payment_required}}
"""


def run_case(case_yaml: str, extra: str = "", engine: str = "cel", **config: Any) -> Any:
    policy_set = load_policy_set([("p.yaml", POLICY.format(extra=extra))], engine)
    (case,) = parse_cases("t_test.yaml", textwrap.dedent(case_yaml))
    handles = HandlesConfig(**config)
    return CaseRunner(policy_set, handles=handles).run(case)


def call(arguments: Any, name: str = "publish_draft", request_id: Any = 7) -> str:
    message = {"jsonrpc": "2.0", "id": request_id, "method": "tools/call",
               "params": {"name": name, "arguments": arguments}}
    return json.dumps(message)


def stored_handle(handle_id: str = "d-1", more: str = "", bound: str = "") -> str:
    """A case's `handle:` (stored before the check): alice's draft by default."""
    return f"{{kind: draft, id: {handle_id}, bound: {{iss: {ISS}, sub: alice{bound}}}{more}}}"


ALICES_DRAFT = stored_handle()


def case(body: str, sub: str = "alice", stored: str = ALICES_DRAFT, extra: str = "") -> str:
    return (
        f"name: c\nrequest: {{body: {json.dumps(body)}, headers: {{content-type: application/json}}}}\n"
        f"claims: {{iss: {ISS}, sub: {sub}{extra}}}\n"
        + (f"handle: {stored}\n" if stored else "")
    )


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(
    ("arguments", "reason"),
    [
        ({"draft_id": 1}, decision.HANDLE_INVALID),
        ({"draft_id": 1.5}, decision.HANDLE_INVALID),
        ({"draft_id": True}, decision.HANDLE_INVALID),
        ({"draft_id": None}, decision.HANDLE_INVALID),
        ({"draft_id": {"id": "d-1"}}, decision.HANDLE_INVALID),
        ({"draft_id": ["d-1"]}, decision.HANDLE_INVALID),
        ({"draft_id": "d 1"}, decision.HANDLE_INVALID),
        ({"draft_id": "d-1,d-2"}, decision.HANDLE_INVALID),
        ({"draft_id": "d-\u00e9"}, decision.HANDLE_INVALID),
        ({"draft_id": "d-\t1"}, decision.HANDLE_INVALID),
        ({"draft_id": "x" * 257}, decision.HANDLE_INVALID),
        ({"draft_id": "d-2"}, decision.HANDLE_UNKNOWN),
    ],
)
def test_bad_handles_are_refused_with_the_kinds_answer(engine: str, arguments: Any, reason: str) -> None:
    outcome = run_case(case(call(arguments)), engine=engine)
    assert (outcome.decision.allowed, outcome.decision.reason) == (False, reason)
    denied = outcome.response.denied_response
    assert denied.status.code == 404
    assert denied.body == '{"jsonrpc":"2.0","id":7,"error":{"code":-32602,"message":"Unknown handle"}}'
    headers = {h.header.key: h.header.value for h in denied.headers}
    assert headers["content-type"] == "application/json" and headers["cache-control"] == "no-store"
    assert outcome.handle_after is not None and outcome.handle_after["bound"]["sub"] == "alice"


def test_a_nul_in_a_handle_is_refused_before_any_policy() -> None:
    outcome = run_case(case(call({"draft_id": "d-1\u0000"})))
    assert outcome.decision.reason == decision.REQUEST_INVALID


@pytest.mark.parametrize(
    "body",
    [
        # Duplicate keys: the gateway and the server must never read different values.
        '{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"publish_draft",'
        '"arguments":{"draft_id":"d-1","draft_id":"d-2"}}}',
        '{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"publish_draft",'
        '"arguments":{"draft_id":"d-1"},"arguments":{"draft_id":"d-2"}}}',
        # Arguments by position: a server might read them; no policy could.
        '{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"publish_draft","arguments":["d-2"]}}',
    ],
)
def test_arguments_the_gateway_cannot_read_exactly_are_refused(body: str) -> None:
    outcome = run_case(case(body, sub="bob"))
    assert outcome.decision.reason == decision.REQUEST_UNPARSEABLE


@pytest.mark.parametrize("engine", ENGINES)
def test_a_mismatch_changes_nothing_and_records_whose_handle(engine: str) -> None:
    outcome = run_case(case(call({"draft_id": "d-1"}), sub="bob"), engine=engine)
    d = outcome.decision
    assert (d.reason, d.handle_kind, d.handle_id) == (decision.HANDLE_MISMATCH, "draft", "d-1")
    assert d.mismatch is not None and (d.mismatch.claim, d.mismatch.bound, d.mismatch.presented) == (
        "sub", "alice", "bob"
    )
    assert outcome.handle_after == new_record(
        anonymous=False, bound={"iss": ISS, "sub": "alice"}, owner=owner_key(ISS, "alice"),
        now=outcome.handle_after["created_at"],
    )


def test_a_batch_with_one_foreign_handle_is_refused_whole() -> None:
    calls = (call({"title": "x"}, "create_draft", 1), call({"draft_id": "d-1"}))
    batch = json.dumps([json.loads(message) for message in calls])
    outcome = run_case(case(batch, sub="bob"))
    assert outcome.decision.reason == decision.HANDLE_MISMATCH
    assert outcome.response.denied_response.body == (
        '{"jsonrpc":"2.0","id":null,"error":{"code":-32602,"message":"Unknown handle"}}'
    )
    # The owner's batch passes.
    assert run_case(case(batch)).decision.allowed


@pytest.mark.parametrize("engine", ENGINES)
def test_rules_see_the_handle_and_its_bound_values(engine: str) -> None:
    paid = stored_handle(bound=", tier: paid")
    refused = run_case(case(call({"draft_id": "d-1"}), stored=paid), engine=engine)
    assert (refused.decision.reason, refused.decision.status) == ("payment_required", 402)
    assert refused.decision.rule == "paid-drafts-need-a-paid-caller"
    allowed = run_case(case(call({"draft_id": "d-1"}), stored=paid, extra=", tier: paid"), engine=engine)
    assert allowed.decision.allowed and allowed.decision.handle_kind == "draft"
    # A call without a draft: handle.exists is false, the rule does not apply.
    assert run_case(case(call({"title": "x"}, "create_draft"), stored=paid), engine=engine).decision.allowed


def test_unknown_allow_lets_a_never_minted_handle_pass_but_never_an_ended_one() -> None:
    assert run_case(case(call({"draft_id": "d-9"})), extra="unknown: allow").decision.allowed
    ended = stored_handle(more=", state: terminated")
    outcome = run_case(case(call({"draft_id": "d-1"}), stored=ended), extra="unknown: allow")
    assert outcome.decision.reason == decision.HANDLE_UNKNOWN
    assert outcome.decision.error is not None and "terminated" in outcome.decision.error


def test_an_expired_handle_is_refused_and_tombstoned() -> None:
    old = stored_handle(more=", created: 120")
    outcome = run_case(case(call({"draft_id": "d-1"}), stored=old), extra="ttl: 60s")
    assert outcome.decision.reason == decision.HANDLE_UNKNOWN
    assert outcome.handle_after is not None and outcome.handle_after["ended"] == "expired"


def test_a_legacy_record_is_refused_and_replaced() -> None:
    legacy = stored_handle(more=", state: legacy")
    outcome = run_case(case(call({"draft_id": "d-1"}), stored=legacy))
    assert outcome.decision.reason == decision.HANDLE_UNKNOWN
    assert outcome.handle_after is not None and outcome.handle_after["ended"] == "legacy"


def test_the_refusal_is_configurable_per_kind() -> None:
    extra = "refusal: {status: 400, code: -32001, message: Draft not found}"
    outcome = run_case(case(call({"draft_id": "d-2"}, request_id="r-\u00e9")), extra=extra)
    denied = outcome.response.denied_response
    assert denied.status.code == 400
    error = '"error":{"code":-32001,"message":"Draft not found"}'
    assert denied.body == '{"jsonrpc":"2.0","id":"r-\\u00e9",' + error + "}"


def test_the_owners_terminating_call_ends_the_handle_only_when_allowed() -> None:
    outcome = run_case(case(call({"draft_id": "d-1"}, "delete_draft")))
    assert outcome.decision.allowed and outcome.handle_after is not None
    assert outcome.handle_after["terminated"] is True and outcome.handle_after["ended"] == "terminated"
    # Refused by a rule (a paid draft, a free caller): nothing ends.
    paid = stored_handle(bound=", tier: paid")
    refused = run_case(case(call({"draft_id": "d-1"}, "delete_draft"), stored=paid))
    assert not refused.decision.allowed and refused.handle_after is not None
    assert refused.handle_after["terminated"] is False


def test_max_id_length_is_configurable() -> None:
    long_id = "d-" + "x" * 20
    stored = stored_handle(long_id)
    assert run_case(case(call({"draft_id": long_id}), stored=stored)).decision.allowed
    short = run_case(case(call({"draft_id": long_id}), stored=stored), max_id_length=16)
    assert short.decision.reason == decision.HANDLE_INVALID


# ------------------------------------------------------------------ the response side's core


def test_an_event_stream_is_read_event_by_event_across_any_split() -> None:
    body = (
        b"\xef\xbb\xbfevent: message\r\nid: 1\r\ndata: {\"a\":\r\ndata: 1}\r\n\r\n"
        b": keep-alive\n\ndata:{\"b\":2}\r\rdata: {\"c\":3}\n\n"
    )
    expected = ['{"a":\n1}', '{"b":2}', '{"c":3}']
    for size in (1, 2, 3, 7, len(body)):
        stream = EventStream(1024)
        got = []
        for start in range(0, len(body), size):
            got += stream.feed(body[start : start + size])
        got += stream.finish()
        assert got == expected, size


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("text/event-stream", b'data: {"a":1}\n'),  # truncated: no blank line
        ("text/event-stream", b'data: {"a":1,"a":2}\n\n'),  # duplicate keys
        ("text/event-stream", b"data: " + b"x" * 300 + b"\n\n"),  # over the bound
        ("text/event-stream", b'data: {"a":"\xff"}\n\n'),  # not UTF-8
        ("application/json", b'{"a":1} trailing'),
        ("application/json", b'{"a":NaN}'),
        ("application/json", b'\xef\xbb\xbf{"a":1}'),
        ("application/json; charset=latin-1", b'{"a":1}'),
        ("application/json", b'{"a":"\\u0000"}'),
    ],
)
def test_responses_the_gateway_cannot_read_exactly_are_refused(content_type: str, body: bytes) -> None:
    with pytest.raises(ValueError):  # Unparseable or UnsafeText
        response_messages(content_type, body, 256)


@pytest.mark.parametrize("newline", [b"\n", b"\r\n"])
def test_a_chunk_of_a_mebibyte_of_blank_lines_is_read_in_linear_time(newline: bytes) -> None:
    """Each line once: re-slicing the pending bytes per line made this take about a minute."""
    chunk = newline * ((1 << 20) // len(newline))
    stream = EventStream(1 << 21)
    started = time.perf_counter()
    assert stream.feed(chunk) == []
    elapsed = time.perf_counter() - started
    assert stream.complete == stream.consumed == len(chunk)
    assert elapsed < 2.0, f"{elapsed:.2f}s"


def test_an_event_over_the_bound_is_refused_as_it_arrives() -> None:
    stream = EventStream(64)
    with pytest.raises(Unparseable):
        for _ in range(10):
            stream.feed(b"data: " + b"x" * 20)


def mint_case(
    body: Any, sub: str = "alice", stored: bool = False, content_type: str = "application/json"
) -> str:
    response_body = json.dumps(body) if not isinstance(body, str) else body
    stored_line = f"handle: {ALICES_DRAFT}\n" if stored else ""
    return (
        f"name: m\nrequest: {{body: {json.dumps(call({'title': 't'}, 'create_draft', 1))}, "
        "headers: {content-type: application/json}}\n"
        f"claims: {{iss: {ISS}, sub: {sub}}}\n{stored_line}"
        f"response: {{status: 200, headers: {{content-type: {json.dumps(content_type)}}}, "
        f"body: {json.dumps(response_body)}}}\n"
        "expect: {decision: allow, handle: {kind: draft, id: d-1}}\n"
    )


MINTED = 'minted: \'"result" in response.json ? response.json.result.structuredContent.draft_id : ""\''


def result(draft_id: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": 1, "result": {"content": [], "structuredContent": {"draft_id": draft_id}}}


@pytest.mark.parametrize("engine", ENGINES)
def test_minting_binds_to_the_caller_and_a_reissue_is_refused(engine: str) -> None:
    minted = run_case(mint_case(result("d-1")), extra=MINTED, engine=engine)
    assert minted.decision.allowed and minted.decision.handle_new and minted.decision.handle_kind == "draft"
    assert minted.handle_after is not None and minted.handle_after["bound"] == {
        "iss": ISS, "sub": "alice", "tier": "free"
    }
    # The same id minted again for its owner (a retry) binds nothing new and passes.
    again = run_case(mint_case(result("d-1"), stored=True), extra=MINTED, engine=engine)
    assert again.decision.allowed and not again.decision.handle_new
    # Minted for bob while bound to alice: 502, alice's record untouched.
    reissued = run_case(mint_case(result("d-1"), sub="bob", stored=True), extra=MINTED, engine=engine)
    assert (reissued.decision.reason, reissued.response.denied_response.status.code) == (
        decision.HANDLE_REISSUED, 502
    )
    assert reissued.response.denied_response.body == '{"error":"bad_gateway"}'
    assert reissued.handle_after is not None and reissued.handle_after["bound"]["sub"] == "alice"


@pytest.mark.parametrize("engine", ENGINES)
def test_a_minted_expression_that_fails_refuses_the_response(engine: str) -> None:
    # No structuredContent: `response.json.result.structuredContent` is an error, not "".
    body = {"jsonrpc": "2.0", "id": 1, "result": {"content": []}}
    outcome = run_case(mint_case(body), extra=MINTED, engine=engine)
    assert (outcome.decision.reason, outcome.decision.status) == (decision.POLICY_ERROR, 502)
    assert outcome.handle_after is None


@pytest.mark.parametrize("value", [42, None, {"id": "d-1"}, "d 1", "x" * 300])
def test_a_minted_value_that_cannot_be_a_handle_refuses_the_response(value: Any) -> None:
    outcome = run_case(mint_case(result(value)), extra=MINTED)
    assert (outcome.decision.reason, outcome.decision.status) == (decision.HANDLE_UNREADABLE, 502)


def test_an_sse_response_mints_from_each_event() -> None:
    events = "".join(
        f"event: message\ndata: {json.dumps(m)}\n\n"
        for m in (
            {"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progress": 1}},
            result("d-1"),
        )
    )
    outcome = run_case(mint_case(events, content_type="text/event-stream"), extra=MINTED)
    assert outcome.decision.allowed and outcome.decision.handle_new
    assert outcome.handle_after is not None and outcome.handle_after["bound"]["sub"] == "alice"


def test_minted_by_limits_which_responses_are_read() -> None:
    extra = MINTED + "\n    minted_by: 'mcp.name == \"create_draft\"'"
    policy_set = load_policy_set([("p.yaml", POLICY.format(extra=extra))])
    runner = CaseRunner(policy_set)
    (create,) = parse_cases("t_test.yaml", case(call({"title": "x"}, "create_draft"), stored=""))
    (publish,) = parse_cases("t_test.yaml", case(call({"draft_id": "d-1"})))
    assert runner.run(create).decision.mints_handles
    assert not runner.run(publish).decision.mints_handles


# ------------------------------------------------------------------ the store


def binder_for(url: str, tmp_path: Path) -> tuple[HandleBinder, Any]:
    handles = HandlesConfig(ttl=3600)
    store = open_handle_store(url, handles, 0.5, 1000)
    return HandleBinder(store, handles), store


@pytest.fixture(params=["memory", "sqlite", "redis"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    if request.param == "memory":
        yield "memory://"
    elif request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/sessions.db"
    else:
        redis = RedisServer(tmp_path)
        yield redis.url
        redis.stop()


def test_handles_keep_their_own_key_space_in_every_store(store_url: str, tmp_path: Path) -> None:
    binder, handle_store = binder_for(store_url, tmp_path)
    session_settings = StoreSettings(ttl=3600, idle_timeout=3600)
    sessions = open_store(store_url, session_settings) if not store_url.startswith("memory") else None
    alice, bob = (ISS, "alice"), (ISS, "bob")
    try:
        minted = binder.mint("draft", "d-1", alice, lambda: ALICE, 1000.0)
        assert not isinstance(minted, HandleRefused) and not minted.existed
        found = binder.find("draft", "d-1", alice, None, False, 1001.0)
        assert not isinstance(found, HandleRefused) and found.existed
        refused = binder.find("draft", "d-1", bob, None, False, 1001.0)
        assert isinstance(refused, HandleRefused) and refused.reason == decision.HANDLE_MISMATCH
        reissued = binder.mint("draft", "d-1", bob, lambda: {"iss": ISS, "sub": "bob"}, 1002.0)
        assert isinstance(reissued, HandleRefused) and reissued.reason == decision.HANDLE_REISSUED
        # Another kind with the same value is another handle.
        assert binder.find("job", "d-1", alice, None, False, 1001.0) == HandleRefused(
            decision.HANDLE_UNKNOWN, "job: a handle never minted"
        )
        if sessions is not None:
            # Sessions and handles never see each other's records, whatever the ids.
            assert sessions.load(store_key("draft", "d-1"), 1003.0) is None
            assert [key for key, _ in sessions.scan()] == []
            record = new_record(anonymous=False, bound=ALICE, owner="o", now=1000.0)
            sessions.create("draft:d-2", record, 1000.0, 9)
            assert handle_store.load("draft:d-2", 1003.0) is None
        binder.end(found, 1004.0)
        ended = binder.find("draft", "d-1", alice, None, True, 1005.0)
        assert isinstance(ended, HandleRefused) and ended.reason == decision.HANDLE_UNKNOWN
        again = binder.mint("draft", "d-1", alice, lambda: ALICE, 1006.0)
        assert isinstance(again, HandleRefused) and again.reason == decision.HANDLE_REISSUED
    finally:
        handle_store.close()
        if sessions is not None:
            sessions.close()


def test_an_expired_handle_is_refused_to_everyone_until_the_retention_ends(store_url: str) -> None:
    """Past its ttl a handle is refused to its owner and to anyone else alike, whatever the
    kind's `unknown` says, for `handles.expired_retention`; then the store forgets it."""
    handles = HandlesConfig(ttl=3600, expired_retention=1800)
    store = open_handle_store(store_url, handles, 0.5, 1000)
    binder = HandleBinder(store, handles)
    alice, bob = (ISS, "alice"), (ISS, "bob")
    # Times near the real clock: Redis expires keys on its own clock, relative to the write.
    start = float(int(time.time()))
    try:
        for value in ("d-1", "d-2", "d-3", "d-4"):
            assert not isinstance(binder.mint("draft", value, alice, lambda: ALICE, start), HandleRefused)
        live = binder.find("draft", "d-1", bob, None, True, start + 3599)
        assert isinstance(live, HandleRefused) and live.reason == decision.HANDLE_MISMATCH
        expired = start + 3601
        for who in (bob, alice, bob):  # the second look finds the expiry tombstone
            refused = binder.find("draft", "d-1", who, None, True, expired)
            assert refused == HandleRefused(decision.HANDLE_UNKNOWN, "draft: the handle has expired"), who
        # A kind's shorter ttl expires it sooner, for everyone too.
        short = binder.find("draft", "d-3", bob, 60.0, True, start + 61)
        assert short == HandleRefused(decision.HANDLE_UNKNOWN, "draft: the handle has expired")
        # Kept, an expired value is never bound again, not even to its owner.
        again = binder.mint("draft", "d-1", alice, lambda: ALICE, expired + 1)
        assert isinstance(again, HandleRefused) and again.reason == decision.HANDLE_REISSUED
        # Never presented after it expired, a handle is kept until its ttl + retention (d-4), then
        # forgotten (d-2): presented after that, it is a value never minted.
        last = binder.find("draft", "d-4", bob, None, True, start + 3600 + 1799)
        assert last == HandleRefused(decision.HANDLE_UNKNOWN, "draft: the handle has expired")
        if store_url.startswith("redis"):
            import redis as redis_client

            from gateway.session.redis_layout import record_key

            client = redis_client.Redis.from_url(store_url)
            try:
                kept_ms = client.pttl(record_key(handles.key_prefix, store_key("draft", "d-2")))
            finally:
                client.close()
            # Native expiry (Redis's clock): the whole ttl + retention from the mint, slid by reads.
            assert 5390 * 1000 < kept_ms <= 5400 * 1000, kept_ms
        else:
            forgotten = start + 3600 + 1800 + 1
            passed = binder.find("draft", "d-2", bob, None, True, forgotten)
            assert not isinstance(passed, HandleRefused) and not passed.existed
            never = binder.find("draft", "d-2", bob, None, False, forgotten)
            assert never == HandleRefused(decision.HANDLE_UNKNOWN, "draft: a handle never minted")
    finally:
        store.close()


def test_expired_handles_kept_for_the_retention_leave_the_identitys_cap(store_url: str) -> None:
    """`handles.max_per_identity` counts live handles: one past its ttl, kept only to be refused,
    gives its place back (on every store)."""
    handles = HandlesConfig(ttl=3600, expired_retention=1800, max_per_identity=2)
    store = open_handle_store(store_url, handles, 0.5, 1000)
    binder = HandleBinder(store, handles)
    alice = (ISS, "alice")
    start = float(int(time.time()))
    try:
        for value in ("d-1", "d-2"):
            assert not isinstance(binder.mint("draft", value, alice, lambda: ALICE, start), HandleRefused)
        full = binder.mint("draft", "d-3", alice, lambda: ALICE, start + 10)
        assert isinstance(full, HandleRefused) and full.reason == decision.HANDLE_LIMIT_EXCEEDED
        later = binder.mint("draft", "d-3", alice, lambda: ALICE, start + 3601)
        assert not isinstance(later, HandleRefused) and not later.existed
        # The expired ones are still kept, and refused.
        kept = binder.find("draft", "d-1", alice, None, True, start + 3602)
        assert kept == HandleRefused(decision.HANDLE_UNKNOWN, "draft: the handle has expired")
    finally:
        store.close()


def test_a_handle_past_its_kinds_shorter_ttl_is_not_minted_again_even_to_its_owner() -> None:
    handles = HandlesConfig(ttl=3600)
    binder = HandleBinder(MemoryStore(handle_store_settings(handles, 0.25, 1_000)), handles)
    alice = (ISS, "alice")
    assert not isinstance(binder.mint("draft", "d-1", alice, lambda: ALICE, 1000.0, 60.0), HandleRefused)
    retried = binder.mint("draft", "d-1", alice, lambda: ALICE, 1059.0, 60.0)
    assert not isinstance(retried, HandleRefused) and retried.existed
    late = binder.mint("draft", "d-1", alice, lambda: ALICE, 1061.0, 60.0)
    assert isinstance(late, HandleRefused) and late.reason == decision.HANDLE_REISSUED


def test_an_expired_handle_still_kept_is_listed_expired_not_live() -> None:
    """The store keeps a handle `expired_retention` past its ttl; the listing judges it by
    `handles.ttl`, as every call presenting it is judged."""
    from gateway.session import operations

    handles = HandlesConfig(ttl=3600, expired_retention=1800)
    store = MemoryStore(handle_store_settings(handles, 0.25, 1_000))
    binder = HandleBinder(store, handles)
    assert not isinstance(binder.mint("draft", "d-1", (ISS, "alice"), lambda: ALICE, 1000.0), HandleRefused)
    key = store_key("draft", "d-1")
    before = operations.show_session(store, key, 1000.0 + 3599)
    assert before is not None and before.state == "live"
    after = operations.show_session(store, key, 1000.0 + 3601)
    assert after is not None and after.state == "expired"
    assert operations.revoke_session(store, key, 1000.0 + 3602) == "expired"


def test_the_handle_store_url_and_the_prefix_check() -> None:
    assert handle_store_url("sqlite:///var/lib/authz/sessions.db") == "sqlite:///var/lib/authz/sessions.handles.db"
    assert handle_store_url("sqlite://rel.db") == "sqlite://rel.handles.db"
    assert handle_store_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert handle_store_settings(HandlesConfig(), 0.25, 10).key_prefix == "authz:handle:"
    with pytest.raises(ConfigError, match="handles.key_prefix"):
        config_from_mapping({"session": {"key_prefix": "authz:"}})
    assert config_from_mapping({"handles": {"ttl": "1h", "max_id_length": 64}}).handles.ttl == 3600
    assert SessionConfig().key_prefix != HandlesConfig().key_prefix


def test_the_cli_lists_and_revokes_handles(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/sessions.db"
    binder, store = binder_for(url, tmp_path)
    import time

    binder.mint("draft", "d-1", (ISS, "alice"), lambda: ALICE, time.time())
    store.close()

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "gateway", "sessions", *args, "--store", url, "--handles"]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=REPO, check=False)

    listed = cli("list", "--json")
    assert listed.returncode == 0, listed.stderr
    (row,) = [json.loads(line) for line in listed.stdout.splitlines()]
    assert (row["id"], row["state"], row["bound"]) == ("draft:d-1", "live", ALICE)
    revoked = cli("revoke", "draft:d-1")
    assert revoked.returncode == 0 and revoked.stdout.startswith("revoked (was live)"), revoked
    shown = cli("show", "draft:d-1", "--json")
    assert json.loads(shown.stdout)["state"] == "revoked"
    # The session listing of the same store does not show handles.
    sessions = subprocess.run(
        [sys.executable, "-m", "gateway", "sessions", "list", "--store", url],
        capture_output=True, text=True, timeout=60, cwd=REPO, check=False,
    )
    assert "draft:d-1" not in sessions.stdout


# ------------------------------------------------------------------ telemetry


@pytest.mark.parametrize("record_subject", [False, True])
def test_the_span_names_the_kind_and_hashes_the_handle(record_subject: bool) -> None:
    """Hashed even with `record_subject`: that shows subjects, never a handle."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    spans = CheckSpans(SubjectHasher(record_subject, "k"), provider.get_tracer("t"))
    outcome = run_case(case(call({"draft_id": "d-secret-1"}), stored=(
        stored_handle("d-secret-1")
    ), sub="bob"))
    span = spans.start(None, 1)
    spans.finish(span, outcome.decision, None, 2)
    (recorded,) = exporter.get_finished_spans()
    attributes = dict(recorded.attributes or {})
    assert attributes["authz.reason"] == "handle_mismatch"
    assert attributes["authz.handle.kind"] == "draft" and attributes["authz.handle.new"] is False
    assert str(attributes["authz.handle.id"]).startswith("hmac-sha256:")
    (event,) = [e for e in recorded.events if e.name == "authz.binding_mismatch"]
    assert dict(event.attributes or {})["authz.handle.kind"] == "draft"
    assert "d-secret-1" not in recorded.to_json()
    assert ("alice" in recorded.to_json()) is record_subject  # the bound subject, as configured


def test_the_documented_refusal_is_the_refusal_sent() -> None:
    text = (REPO / "docs" / "policies.md").read_text()
    block = text.split("With the default `refusal`, a call with `\"id\": 7` gets exactly:\n\n```\n", 1)[1]
    documented = block.split("```", 1)[0].splitlines()
    outcome = run_case(case(call({"draft_id": "d-1"}), sub="bob"))
    denied = outcome.response.denied_response
    headers = [f"{h.header.key}: {h.header.value}" for h in denied.headers]
    assert documented == [f"HTTP/1.1 {denied.status.code} Not Found", *headers, "", denied.body]


def test_the_readmes_story_shows_the_real_explain_output() -> None:
    """README §5 shows bob's refused publish with `policy explain`: the command's own output,
    byte for byte, with the exact JSON-RPC error bytes bob's client gets."""
    readme = (REPO / "README.md").read_text()
    command = (
        "authz-gateway policy explain --input examples/policies/handles/10-drafts_test.yaml"
        " --case another-identity-is-refused"
    )
    shown = readme.split(f"$ {command}\n", 1)[1].split("```", 1)[0]
    done = subprocess.run(
        [sys.executable, "-m", "gateway", *command.split()[1:]],
        capture_output=True, text=True, cwd=REPO, timeout=60, env={"PYTHONPATH": str(REPO), "PATH": ""},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout == shown
    assert '{"jsonrpc":"2.0","id":7,"error":{"code":-32602,"message":"Unknown handle"}}' in shown


def test_a_handle_presented_only_in_an_mcp_param_header_is_refused_at_load() -> None:
    """An Mcp-Param-* header only mirrors an argument, and the server acts on the body (the SDK
    ignores the header for a tool that does not declare it): a client leaving the header out would
    present its handle unchecked."""
    header_only = """\
    name: jobs
    handles:
      job:
        presented: '"mcp-param-job" in request.headers ? request.headers["mcp-param-job"] : ""'
    """
    (problem,) = problems_of(textwrap.dedent(header_only))
    assert problem.startswith("h.yaml:4:16: handles.job.presented reads the mcp-param-job header but not")


def test_a_handle_in_a_custom_header_may_be_presented() -> None:
    policy = """\
    name: jobs
    handles:
      job:
        presented: '"x-job" in request.headers ? request.headers["x-job"] : ""'
    """
    policy_set = load_policy_set([("p.yaml", textwrap.dedent(policy))])
    runner = CaseRunner(policy_set)

    def sent(job: str, sub: str) -> Any:
        (one,) = parse_cases("t_test.yaml", textwrap.dedent(f"""\
            name: c
            request: {{method: POST, headers: {{x-job: "{job}"}}}}
            claims: {{iss: {ISS}, sub: {sub}}}
            handle: {{kind: job, id: j-1, bound: {{iss: {ISS}, sub: alice}}}}
            """))
        return runner.run(one).decision

    assert sent("j-1", "alice").allowed
    assert sent("j-1", "bob").reason == decision.HANDLE_MISMATCH
    assert sent("j-2", "alice").reason == decision.HANDLE_UNKNOWN
    # A repeated header arrives comma-joined: never one handle, whichever the server reads.
    assert sent("j-1,j-1", "alice").reason == decision.HANDLE_INVALID


def test_the_common_forms_are_read_without_cel_and_mean_the_same() -> None:
    (policy,) = load_policy_dir(EXAMPLE).policies
    assert policy.handles[0].argument == "draft_id" and policy.handles[0].header is None
    assert policy.handles[0].terminate_memo is not None and policy.handles[0].minted_by_memo is not None
    # The same kind written so that CEL must run gives the same decisions.
    extra_forms = {
        "direct": '"draft_id" in mcp.arguments ? mcp.arguments.draft_id : ""',
        "cel": 'has(mcp.arguments.draft_id) ? mcp.arguments["draft_id"] : ""',
    }
    for form, presented in extra_forms.items():
        policy_set = load_policy_set([("p.yaml", textwrap.dedent(f"""\
            name: p
            handles:
              draft:
                presented: '{presented.replace("'", "''")}'
                terminate: 'mcp.name == "delete_draft"'
            """))])
        assert (policy_set.policies[0].handles[0].argument is not None) == (form == "direct")
        runner = CaseRunner(policy_set)
        for arguments, sub, expected in (
            ({"draft_id": "d-1"}, "alice", decision.ALLOWED),
            ({"draft_id": "d-1"}, "bob", decision.HANDLE_MISMATCH),
            ({"draft_id": 5}, "alice", decision.HANDLE_INVALID),
            ({"other": "d-1"}, "bob", decision.ALLOWED),
        ):
            (one,) = parse_cases("t_test.yaml", case(call(arguments), sub=sub))
            assert runner.run(one).decision.reason == expected, (form, arguments, sub)


def test_remembered_terminate_results_follow_the_fields_they_read() -> None:
    """One runner (one policy set, one memo): publish, then delete, then publish again."""
    runner = CaseRunner(load_policy_dir(EXAMPLE))
    for tool, state in (("publish_draft", "live"), ("delete_draft", "terminated"), ("publish_draft", "live")):
        (one,) = parse_cases("t_test.yaml", case(call({"draft_id": "d-1"}, tool)))
        outcome = runner.run(one)
        assert outcome.decision.allowed and outcome.handle_after is not None
        assert ("terminated" if outcome.handle_after["terminated"] else "live") == state, tool


# ------------------------------------------------------------------ the response path's reader


def minting_for(sub: str = "alice", max_bytes: int = 4096) -> Any:
    """A ResponseMinting over the example policy, for a create_draft by `sub`."""
    store = MemoryStore(StoreSettings(ttl=3600, idle_timeout=3600))
    policies = PolicyHolder(load_policy_dir(EXAMPLE))
    authorizer = Authorizer(AuthConfig(), SessionConfig(), TokenVerifier(AuthConfig()), store, policies)
    response_path = authorizer.response_path
    body = call({"title": "t"}, "create_draft", 1)
    context = from_check_request(check_request(body=body, headers={"content-type": "application/json"}))
    identity = identity_from_claims({"iss": ISS, "sub": sub}, 1000.0)
    headers = {"content-type": "text/event-stream"}
    return response_path, lambda: ResponseMinting(
        response_path, context, identity, 200, headers, max_bytes, 1000.0, "drafts/draft"
    )


def sse(message: Any) -> bytes:
    return f"event: message\ndata: {json.dumps(message)}\n\n".encode()


def test_an_sse_response_goes_on_event_by_event_and_stops_at_a_refused_one() -> None:
    response_path, make = minting_for()
    progress = sse({"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progress": 1}})
    minting = make()
    # A chunk that ends inside an event passes on only the complete events before it.
    released, refused = minting.streamed_chunk(progress + sse(result("d-1"))[:20], False)
    assert (released, refused) == (progress, None)
    released, refused = minting.streamed_chunk(sse(result("d-1"))[20:], True)
    assert refused is None and released == sse(result("d-1"))
    assert minting.outcome.handle_new and minting.outcome.handle_kind == "draft"
    # bob's response re-issuing d-1: the progress event went on, the result never does.
    bobs = minting_for("bob")[1]()
    bobs._response_path = response_path  # the same store as alice's
    released, refused = bobs.streamed_chunk(progress, False)
    assert released == progress and refused is None
    released, refused = bobs.streamed_chunk(sse(result("d-1")), True)
    assert released == b"" and refused is not None and refused.reason == decision.HANDLE_REISSUED


@pytest.mark.parametrize(
    ("chunks", "reason"),
    [
        ([b'data: {"jsonrpc":"2.0","id":1,"result":{}}\n'], decision.HANDLE_UNREADABLE),  # truncated
        ([b"data: " + b"x" * 5000], decision.HANDLE_UNREADABLE),  # over max_response_bytes
        ([b'data: {"a":1,"a":2}\n\n'], decision.HANDLE_UNREADABLE),  # duplicate keys
    ],
)
def test_an_sse_response_that_cannot_be_read_is_refused(chunks: list[bytes], reason: str) -> None:
    _, make = minting_for(max_bytes=4096)
    minting = make()
    refused = None
    for index, chunk in enumerate(chunks):
        released, refused = minting.streamed_chunk(chunk, index == len(chunks) - 1)
        if refused is not None:
            break
    assert refused is not None and (refused.reason, refused.status) == (reason, 502)


def test_a_batch_whose_response_may_mint_is_refused() -> None:
    """Which call of a batch minted what cannot be told from a list of answers."""
    calls = [json.loads(call({}, "list_drafts", 1)), json.loads(call({"title": "t"}, "create_draft", 2))]
    body = json.dumps(json.dumps(calls))
    text = (
        f"name: b\nrequest: {{body: {body}, headers: {{content-type: application/json}}}}\n"
        f"claims: {{iss: {ISS}, sub: alice}}\n"
        "response: {body: [{jsonrpc: '2.0', id: 1, result: {}}, "
        "{jsonrpc: '2.0', id: 2, result: {structuredContent: {draft_id: d-7}}}]}\n"
    )
    (one,) = parse_cases("t_test.yaml", text)
    outcome = CaseRunner(load_policy_dir(EXAMPLE)).run(one)
    assert (outcome.decision.reason, outcome.decision.status) == (decision.HANDLE_UNREADABLE, 502)


def test_one_identity_cannot_fill_the_handle_store() -> None:
    """A caller minting without end is refused past handles.max_per_identity (429), and the
    others keep minting."""
    from gateway.config import HandlesConfig
    from gateway.session.handles import HandleBinder, HandleRefused, handle_store_settings
    from gateway.session.memory import MemoryStore

    settings = HandlesConfig(max_per_identity=2)
    binder = HandleBinder(MemoryStore(handle_store_settings(settings, 0.25, 1_000)), settings)
    bob, alice = (ISS, "bob"), (ISS, "alice")
    now = time.time()
    for n in range(2):
        assert not isinstance(binder.mint("draft", f"d-bob-{n}", bob, dict, now), HandleRefused)
    over = binder.mint("draft", "d-bob-2", bob, dict, now)
    assert isinstance(over, HandleRefused) and over.reason == decision.HANDLE_LIMIT_EXCEEDED
    never = binder.find("draft", "d-bob-2", bob, None, False, now)
    assert isinstance(never, HandleRefused) and never.reason == decision.HANDLE_UNKNOWN
    assert not isinstance(binder.mint("draft", "d-alice-0", alice, dict, now), HandleRefused)


def test_a_response_minting_past_the_identitys_cap_is_refused_with_429() -> None:
    # At the time of the run: the memory store counts an owner's records only near its clock.
    case = mint_case(result("d-2"), stored=True) + f"now: {time.time()}\n"
    over = run_case(case, extra=MINTED, max_per_identity=1)
    assert (over.decision.reason, over.response.denied_response.status.code) == (
        decision.HANDLE_LIMIT_EXCEEDED, 429
    )


AUDITED_THEN_FAILING = {
    "10-audited.yaml": """
name: audited
mode: audit
rules:
  - name: never
    allow: 'false'
    deny: {status: 403, reason: audited_refusal}
""",
    "20-failing.yaml": """
name: failing
mode: enforce
handles:
  draft:
    minted_by: 'mcp.arguments.missing == "x"'
    minted: '""'
rules:
  - name: anyone
    allow: 'true'
    deny: {status: 403, reason: never_denied}
""",
}


def test_a_failing_minted_by_keeps_the_audit_denies_recorded_before_it(tmp_path: Path) -> None:
    """A `minted_by` that fails (after every rule passed) refuses the call; what an audit policy
    recorded earlier in the same check stays on the refusal (audit_denies)."""
    for name, text in AUDITED_THEN_FAILING.items():
        (tmp_path / name).write_text(text)
    store = MemoryStore(StoreSettings(ttl=3600, idle_timeout=3600))
    policies = PolicyHolder(load_policy_dir(tmp_path))
    authorizer = Authorizer(AuthConfig(), SessionConfig(), TokenVerifier(AuthConfig()), store, policies)
    body = call({"title": "t"}, "create_draft", 1)
    context = from_check_request(check_request(body=body, headers={"content-type": "application/json"}))
    alice = identity_from_claims({"iss": ISS, "sub": "alice"}, 1000.0)
    outcome = authorizer.check_identity(context, alice, 1000.0)
    assert not outcome.allowed and outcome.policy == "failing"
    assert [(audited.policy, audited.reason) for audited in outcome.audit_denies] == [
        ("audited", "audited_refusal")
    ]
