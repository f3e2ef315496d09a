"""Handles on the ext_proc stream, message by message, against the real gateway servicer (over
gRPC, in process): what Check tells Envoy, what the stream asks for, and what it answers."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from gateway.envoy_api.envoy.config.core.v3 import base_pb2
from gateway.envoy_api.envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from gateway.envoy_api.envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from gateway.extproc_handles import EXT_AUTHZ_NAMESPACE, may_mint
from gateway.response import MINT_METADATA_KEY
from tests.support.checks import check_request
from tests.support.inprocess import InProcessGateway
from tests.support.issuer import TestIssuer
from tests.support.processes import REPO
from tests.test_extproc_stream import Processor, headers

EXAMPLE = REPO / "examples" / "policies" / "handles"
MODE = processing_mode_pb2.ProcessingMode


def tool_call(name: str, arguments: dict[str, Any]) -> bytes:
    params = {"name": name, "arguments": arguments}
    message = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": params}
    return json.dumps(message).encode()


def minting_request(token: str, mint: bool | str = True) -> pb.ProcessingRequest:
    """A tools/call's request headers; `mint`: Check's mark (True: the drafts example's)."""
    pairs: list[tuple[str, str | bytes]] = [
        (":method", "POST"), (":path", "/mcp"), (":authority", "mcp"),
        ("authorization", f"Bearer {token}"), ("content-type", "application/json"),
        ("mcp-protocol-version", "2026-07-28"),
    ]
    message = pb.ProcessingRequest(request_headers=headers(*pairs))
    if mint:
        mark = "drafts/draft" if mint is True else mint
        message.metadata_context.filter_metadata[EXT_AUTHZ_NAMESPACE].update({MINT_METADATA_KEY: mark})
    return message


def request_body(data: bytes) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(request_body=pb.HttpBody(body=data, end_of_stream=True))


def response_headers(content_type: str, status: int = 200) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(
        response_headers=headers((":status", str(status)), ("content-type", content_type))
    )


def response_body(data: bytes, end: bool = True) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(response_body=pb.HttpBody(body=data, end_of_stream=end))


def result(draft_id: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": 1, "result": {"content": [], "structuredContent": {"draft_id": draft_id}}}


@pytest.fixture(scope="module")
def idp() -> Iterator[TestIssuer]:
    issuer = TestIssuer()
    yield issuer
    issuer.stop()


@pytest.fixture(scope="module")
def gateway(idp: TestIssuer) -> Iterator[InProcessGateway]:
    running = InProcessGateway(
        {"policies": str(EXAMPLE), "store": "memory://", "auth": {"issuers": [idp.issuer_config()]}}
    )
    yield running
    running.stop()


@pytest.fixture
def processor(gateway: InProcessGateway) -> Iterator[Processor]:
    client = Processor(gateway.address)
    yield client
    client.close()


def bound(gateway: InProcessGateway, draft_id: str) -> Any:
    loaded = gateway.gateway.handle_store.load(f"draft:{draft_id}", time.time())
    return None if loaded is None else loaded.data


def test_check_marks_only_the_calls_whose_answer_may_mint(gateway: InProcessGateway, idp: TestIssuer) -> None:
    token = idp.token("alice")
    headers_ = {"content-type": "application/json", "mcp-protocol-version": "2026-07-28"}
    create = gateway.client.check(
        check_request(token=token, body=tool_call("create_draft", {"title": "t"}).decode(), headers=headers_)
    )
    assert create.status.code == 0
    assert create.dynamic_metadata.fields[MINT_METADATA_KEY].string_value == "drafts/draft"
    listing = gateway.client.check(
        check_request(token=token, body=tool_call("list_drafts", {}).decode(), headers=headers_)
    )
    assert listing.status.code == 0 and MINT_METADATA_KEY not in listing.dynamic_metadata.fields


def test_a_json_answer_is_bound_before_it_goes_on(
    gateway: InProcessGateway, processor: Processor, idp: TestIssuer
) -> None:
    token = idp.token("alice")
    replies = processor.exchange(
        minting_request(token),
        request_body(tool_call("create_draft", {"title": "t"})),
        response_headers("application/json"),
        response_body(json.dumps(result("d-json-1")).encode()),
    )
    assert replies[0].mode_override.request_body_mode == MODE.BUFFERED
    assert replies[2].mode_override.response_body_mode == MODE.BUFFERED
    assert replies[3].WhichOneof("response") == "response_body"
    assert bound(gateway, "d-json-1")["bound"] == {"iss": idp.issuer, "sub": "alice"}
    # bob is handed alice's draft id: 502, never delivered, still alice's.
    replies = processor.exchange(
        minting_request(idp.token("bob")),
        request_body(tool_call("create_draft", {"title": "t"})),
        response_headers("application/json"),
        response_body(json.dumps(result("d-json-1")).encode()),
    )
    immediate = replies[-1].immediate_response
    assert (immediate.status.code, immediate.body, immediate.details) == (502, b'{"error":"bad_gateway"}',
                                                                         "handle_reissued")
    assert bound(gateway, "d-json-1")["bound"]["sub"] == "alice"


def test_an_sse_answer_passes_event_by_event(
    gateway: InProcessGateway, processor: Processor, idp: TestIssuer
) -> None:
    event = f"event: message\ndata: {json.dumps(result('d-sse-1'))}\n\n".encode()
    progress = b'event: message\ndata: {"jsonrpc":"2.0","method":"notifications/progress","params":{}}\n\n'
    replies = processor.exchange(
        minting_request(idp.token("alice")),
        request_body(tool_call("create_draft", {"title": "t"})),
        response_headers("text/event-stream"),
        response_body(progress + event[:30], end=False),
        response_body(event[30:], end=True),
    )
    assert replies[2].mode_override.response_body_mode == MODE.STREAMED
    first = replies[3].response_body.response
    assert first.body_mutation.body == progress  # the half event is held back
    second = replies[4].response_body.response
    assert second.body_mutation.body == event  # released whole once bound
    assert bound(gateway, "d-sse-1")["bound"]["sub"] == "alice"


def test_bodies_not_asked_for_are_never_read(processor: Processor, idp: TestIssuer) -> None:
    """An unmarked call under bind_on: first_use: the stream ends at its request headers, so a
    body sent after them is never read (with bind_on: response it ends the stream with
    INVALID_ARGUMENT: tests/test_extproc_stream.py)."""
    replies = processor.exchange(
        minting_request(idp.token("alice"), mint=False), request_body(tool_call("create_draft", {}))
    )
    assert [reply.WhichOneof("response") for reply in replies] == ["request_headers"]


def test_an_unmarked_call_reads_no_body(processor: Processor, idp: TestIssuer) -> None:
    unmarked = minting_request(idp.token("alice"), mint=False)
    replies = processor.exchange(unmarked, response_headers("application/json"))
    assert not any(reply.HasField("mode_override") for reply in replies)
    assert [reply.WhichOneof("response") for reply in replies][0] == "request_headers"


def test_the_marker_names_the_kinds_and_a_non_string_one_names_none() -> None:
    """The marker is Check's "policy/kind" pairs; a bool true (a Check of an older version)
    marks the call but names no kind, so its response is refused rather than passed."""
    metadata = base_pb2.Metadata()
    metadata.filter_metadata[EXT_AUTHZ_NAMESPACE].update({MINT_METADATA_KEY: "drafts/draft"})
    assert may_mint(metadata) == "drafts/draft"
    metadata.filter_metadata[EXT_AUTHZ_NAMESPACE].update({MINT_METADATA_KEY: True})
    assert may_mint(metadata) == ""
    metadata.filter_metadata[EXT_AUTHZ_NAMESPACE].update({MINT_METADATA_KEY: False})
    assert may_mint(metadata) is None
    assert may_mint(base_pb2.Metadata()) is None


ROUTED_POLICY = """
name: routed-drafts
mode: enforce
when: '"route" in context && context.route == "mcp" && mcp.method == "tools/call"'
handles:
  draft:
    minted_by: 'mcp.name == "create_draft"'
    minted: >-
      "result" in response.json && "structuredContent" in response.json.result
      ? response.json.result.structuredContent.draft_id : ""
    presented: '"draft_id" in mcp.arguments ? mcp.arguments.draft_id : ""'
    bind: {iss: claims.iss, sub: claims.sub}
    unknown: deny
rules:
  - name: token-required
    allow: auth.authenticated
    deny: {status: 401, reason: token_missing}
"""


@pytest.fixture(scope="module")
def routed(idp: TestIssuer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessGateway]:
    policies = tmp_path_factory.mktemp("routed")
    (policies / "10-routed.yaml").write_text(ROUTED_POLICY)
    running = InProcessGateway(
        {"policies": str(policies), "store": "memory://", "auth": {"issuers": [idp.issuer_config()]}}
    )
    yield running
    running.stop()


def test_a_kind_whose_when_reads_context_is_bound_from_checks_mark(
    routed: InProcessGateway, idp: TestIssuer
) -> None:
    """The response path has no context_extensions: it takes Check's word for which kinds may
    mint, and never re-judges `when` (which read `context.route` there) to an unbound pass."""
    token = idp.token("alice")
    body = tool_call("create_draft", {"title": "t"})
    checked = routed.client.check(check_request(
        token=token, body=body.decode(), context_extensions={"route": "mcp"},
        headers={"content-type": "application/json", "mcp-protocol-version": "2026-07-28"},
    ))
    assert checked.status.code == 0
    message = minting_request(token, mint=False)
    message.metadata_context.filter_metadata[EXT_AUTHZ_NAMESPACE].CopyFrom(checked.dynamic_metadata)
    processor = Processor(routed.address)
    try:
        replies = processor.exchange(
            message, request_body(body), response_headers("application/json"),
            response_body(json.dumps(result("d-routed-1")).encode()),
        )
    finally:
        processor.close()
    assert replies[-1].WhichOneof("response") == "response_body"
    assert bound(routed, "d-routed-1")["bound"] == {"iss": idp.issuer, "sub": "alice"}


def test_a_marked_kind_the_policies_no_longer_have_refuses_the_answer(
    processor: Processor, idp: TestIssuer, gateway: InProcessGateway
) -> None:
    """A reload between Check and the response: the mark names a kind no policy holds now."""
    replies = processor.exchange(
        minting_request(idp.token("alice"), mint="drafts/gone"),
        request_body(tool_call("create_draft", {"title": "t"})),
        response_headers("application/json"),
        response_body(json.dumps(result("d-gone-1")).encode()),
    )
    immediate = replies[-1].immediate_response
    assert (immediate.status.code, immediate.details) == (502, "handle_unreadable")
    assert bound(gateway, "d-gone-1") is None


def test_a_marked_call_whose_request_body_never_came_is_refused(
    gateway: InProcessGateway, processor: Processor, idp: TestIssuer
) -> None:
    """Envoy that ignores mode_override (allow_mode_override unset) sends no request body: the
    response is not read as an empty request's (no MCP call, nothing to mint) and passed."""
    replies = processor.exchange(
        minting_request(idp.token("alice")),
        response_headers("application/json"),
    )
    immediate = replies[-1].immediate_response
    assert (immediate.status.code, immediate.details) == (502, "handle_unreadable")


def test_a_marked_call_whose_request_body_stopped_short_is_refused(
    processor: Processor, idp: TestIssuer
) -> None:
    part = pb.ProcessingRequest(request_body=pb.HttpBody(body=tool_call("create_draft", {})[:20]))
    replies = processor.exchange(
        minting_request(idp.token("alice")), part, response_headers("application/json"),
    )
    immediate = replies[-1].immediate_response
    assert (immediate.status.code, immediate.details) == (502, "handle_unreadable")


def test_a_token_that_expires_during_the_call_still_binds_its_answer(
    gateway: InProcessGateway, processor: Processor, idp: TestIssuer
) -> None:
    """The exchange is judged at the time of its request (as Check judged it): a token valid
    then, expired by the time a slow tool call answers, still has the minted handle bound."""
    leeway = 30.0  # auth.leeway's default
    token = idp.token("alice", ttl=600, now=time.time() - 600 - leeway + 1.5)

    def messages() -> Iterator[pb.ProcessingRequest]:
        yield minting_request(token)
        yield request_body(tool_call("create_draft", {"title": "t"}))
        time.sleep(2.5)  # the token expires (leeway included) while the tool runs
        yield response_headers("application/json")
        yield response_body(json.dumps(result("d-slow-1")).encode())

    replies = list(processor.call(messages(), timeout=10))
    assert replies[-1].WhichOneof("response") == "response_body"
    assert bound(gateway, "d-slow-1")["bound"]["sub"] == "alice"


SESSION_POLICY = """
name: sessions
mode: enforce
session:
  key: '"mcp-session-id" in request.headers ? request.headers["mcp-session-id"] : ""'
  bind: {iss: claims.iss, sub: claims.sub}
rules:
  - name: token-required
    allow: auth.authenticated
    deny: {status: 401, reason: token_missing}
"""


def test_under_first_use_an_answer_read_for_handles_binds_no_session(
    idp: TestIssuer, tmp_path: Any
) -> None:
    """bind_on: first_use: a session id the answer issues is bound at its first use, never by
    the response path, even when that answer is read for handles."""
    (tmp_path / "10-drafts.yaml").write_text((EXAMPLE / "10-drafts.yaml").read_text())
    (tmp_path / "20-sessions.yaml").write_text(SESSION_POLICY)
    running = InProcessGateway({
        "policies": str(tmp_path), "store": "memory://", "auth": {"issuers": [idp.issuer_config()]},
        "session": {"bind_on": "first_use"},
    })
    processor = Processor(running.address)
    try:
        answer = pb.ProcessingRequest(response_headers=headers(
            (":status", "200"), ("content-type", "application/json"), ("mcp-session-id", "s-first-use-1"),
        ))
        replies = processor.exchange(
            minting_request(idp.token("alice")),
            request_body(tool_call("create_draft", {"title": "t"})),
            answer,
            response_body(json.dumps(result("d-first-use-1")).encode()),
        )
        assert replies[-1].WhichOneof("response") == "response_body"
        assert bound(running, "d-first-use-1")["bound"]["sub"] == "alice"
        assert running.gateway.store.load("s-first-use-1", time.time()) is None
    finally:
        processor.close()
        running.stop()
