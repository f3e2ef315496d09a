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


def minting_request(token: str, mint: bool = True) -> pb.ProcessingRequest:
    pairs: list[tuple[str, str | bytes]] = [
        (":method", "POST"), (":path", "/mcp"), (":authority", "mcp"),
        ("authorization", f"Bearer {token}"), ("content-type", "application/json"),
        ("mcp-protocol-version", "2026-07-28"),
    ]
    message = pb.ProcessingRequest(request_headers=headers(*pairs))
    if mint:
        message.metadata_context.filter_metadata[EXT_AUTHZ_NAMESPACE].update({MINT_METADATA_KEY: True})
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
    assert create.status.code == 0 and create.dynamic_metadata.fields[MINT_METADATA_KEY].bool_value
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


def test_only_a_true_marker_counts() -> None:
    """The marker is a bool: a string "true" (or anything else) does not count."""
    metadata = base_pb2.Metadata()
    metadata.filter_metadata[EXT_AUTHZ_NAMESPACE].update({MINT_METADATA_KEY: "true"})
    assert not may_mint(metadata)
    assert not may_mint(base_pb2.Metadata())
