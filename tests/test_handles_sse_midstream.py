"""A handle that cannot be bound, arriving in an SSE stream already under way, through real
Envoy: the headers and the first event have reached the client when the bad event leaves the
upstream; the client never receives the bad event, the stream ends there, and the Process span
says why. The gateway runs examples/policies/handles with the example Envoy config."""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import uvicorn

from tests.support.issuer import TestIssuer
from tests.support.otlp import OtlpReceiver
from tests.support.processes import REPO, EnvoyProcess, GatewayProcess, envoy_config, free_port, wait_for_port
from tests.support.sse_upstream import FIRST_EVENT, PausingSseUpstream, result_event

POLICIES = REPO / "examples" / "policies" / "handles"
PROCESS_SPAN = "envoy.service.ext_proc.v3.ExternalProcessor/Process"
MAX_RESPONSE_BYTES = 4096
MARK = "BAD-EVENT-7d1f"


@dataclass
class Stack:
    idp: TestIssuer
    upstream: PausingSseUpstream
    receiver: OtlpReceiver
    port: int


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("sse-midstream")
    idp = TestIssuer(serve=False)
    jwks = idp.write_jwks(work / "jwks.json")
    upstream = PausingSseUpstream()
    upstream_port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(upstream, host="127.0.0.1", port=upstream_port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for_port(upstream_port)
    receiver = OtlpReceiver()
    config = {
        "store": "memory://",
        "policies": str(POLICIES),
        "auth": {"issuers": [idp.issuer_config(jwks_file=jwks)]},
        "handles": {"max_response_bytes": MAX_RESPONSE_BYTES},
    }
    gateway = GatewayProcess(config, work, env=receiver.exporter_env())
    listener, admin = free_port(), free_port()
    text = envoy_config(
        listener_port=listener, admin_port=admin, gateway_ports=[gateway.port], upstream_port=upstream_port
    )
    envoy = EnvoyProcess(text, work)
    wait_for_port(admin, 30)
    wait_for_port(listener, 30)
    yield Stack(idp, upstream, receiver, listener)
    envoy.stop()
    assert gateway.stop() == 0, gateway.log_text()
    server.should_exit = True
    thread.join(10)
    receiver.stop()


@dataclass
class Streamed:
    status: int
    content_type: str
    before_release: bytes  # what the client had read when the upstream was let go on
    body: bytes  # everything the client read
    ended_by: str  # how the stream ended: "end" (complete) or the exception that ended it


def create_draft(stack: Stack, subject: str, second_event: bytes) -> Streamed:
    """A create_draft whose answer streams: the first event is read by the client before the
    upstream sends `second_event`."""
    stack.upstream.arm(second_event)
    body = json.dumps(
        {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
         "params": {"name": "create_draft", "arguments": {"title": "t"}, "_meta": {"progressToken": 1}}}
    )  # fmt: skip
    connection = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=15)
    try:
        connection.request("POST", "/mcp", body=body, headers={
            "authorization": f"Bearer {stack.idp.token(subject)}",
            "content-type": "application/json",
            "accept": "application/json, text/event-stream",
            "mcp-protocol-version": "2026-07-28",
        })  # fmt: skip
        response = connection.getresponse()
        received = b""
        before_release: bytes | None = None
        ended_by = "end"
        try:
            while b"\n\n" not in received:
                chunk = response.read1(65536)
                if not chunk:
                    break
                received += chunk
            before_release = received
            stack.upstream.release()
            while chunk := response.read1(65536):
                received += chunk
        except (http.client.HTTPException, OSError) as exc:
            ended_by = type(exc).__name__
        finally:
            stack.upstream.release()
        if before_release is None:  # the stream ended before its first event was read
            before_release = received
        assert stack.upstream.second_sent.wait(10), "the upstream never sent its second event"
        return Streamed(
            response.status, response.getheader("content-type", ""), before_release, received, ended_by
        )
    finally:
        connection.close()


BAD_EVENTS = {
    "not-json": b"event: message\ndata: {" + MARK.encode() + b"\n\n",
    "duplicate-key": (
        b'event: message\ndata: {"jsonrpc":"2.0","id":1,"result":{"content":[],"structuredContent":'
        b'{"draft_id":"d-' + MARK.encode() + b'","draft_id":"d-other"}}}\n\n'
    ),
    "over-max-response-bytes": (
        b'event: message\ndata: {"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"'
        + MARK.encode()
        + b"x" * MAX_RESPONSE_BYTES
        + b'"}]}}\n\n'
    ),
}


def assert_cut_after_first_event(streamed: Streamed) -> None:
    # The headers and the first event reached the client before the bad event existed.
    assert streamed.status == 200 and streamed.content_type == "text/event-stream", streamed
    assert streamed.before_release == FIRST_EVENT, streamed
    # Nothing of the bad event was delivered, and the stream ended there, cut short: Envoy
    # resets it, so an HTTP/1.1 client sees the chunked body end without its last chunk (a
    # broken stream, never a complete one).
    assert streamed.body == FIRST_EVENT, streamed
    assert MARK.encode() not in streamed.body
    assert streamed.ended_by == "IncompleteRead", streamed


@pytest.mark.parametrize("bad", sorted(BAD_EVENTS))
def test_an_unreadable_event_mid_stream_ends_the_stream_undelivered(stack: Stack, bad: str) -> None:
    before = refusal_spans(stack, "handle_unreadable")
    streamed = create_draft(stack, f"reader-{bad}", BAD_EVENTS[bad])
    assert_cut_after_first_event(streamed)
    wait_for_more_spans(stack, "handle_unreadable", before)
    assert MARK.encode() not in b"".join(stack.receiver.raw_payloads)


def test_a_reissued_handle_mid_stream_ends_the_stream_undelivered(stack: Stack) -> None:
    # alice's create_draft streams d-<MARK>: bound to alice, delivered whole.
    draft_id = f"d-{MARK}"
    minted = create_draft(stack, "alice", result_event(draft_id))
    assert minted.status == 200 and minted.ended_by == "end", minted
    assert minted.body == FIRST_EVENT + result_event(draft_id)
    # The server hands bob the same id mid-stream: cut, and bob never sees it.
    before = refusal_spans(stack, "handle_reissued")
    streamed = create_draft(stack, "bob", result_event(draft_id))
    assert_cut_after_first_event(streamed)
    wait_for_more_spans(stack, "handle_reissued", before)
    # Neither the span nor anything else the receiver got holds the draft id or the bad bytes.
    assert MARK.encode() not in b"".join(stack.receiver.raw_payloads)


def refusal_spans(stack: Stack, reason: str) -> int:
    return sum(
        1 for s in stack.receiver.spans(name=PROCESS_SPAN) if s.attributes.get("authz.reason") == reason
    )


def wait_for_more_spans(stack: Stack, reason: str, before: int) -> None:
    """The Process span of this refusal arrived (one more with `reason` than before the call)."""
    deadline = time.monotonic() + 15
    while refusal_spans(stack, reason) <= before:
        assert time.monotonic() < deadline, f"no new Process span with authz.reason {reason}"
        time.sleep(0.05)
