"""The ext_proc stream on its own: a real gRPC channel against the real gateway server.

What Envoy sends in order (request headers, response headers, a body only when asked) is
played by hand, and so is everything Envoy never sends: each gets a clean stream error, never
a crash and never a bind.
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest

from gateway.config import MCP_SDK_SESSION_NOT_FOUND_BODY
from gateway.envoy_api.envoy.config.core.v3 import base_pb2
from gateway.envoy_api.envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from gateway.extproc import SERVICE_NAME
from gateway.otlp_api.opentelemetry.proto.trace.v1 import trace_pb2
from gateway.policy.loader import default_policy_dir
from gateway.session.record import owner_key
from gateway.telemetry.tracing import PROCESS_SPAN_NAME
from tests.support.checks import check_request
from tests.support.inprocess import InProcessGateway
from tests.support.issuer import TestIssuer
from tests.support.otlp import OtlpReceiver
from tests.support.processes import GatewayProcess, RedisServer, health_status, wait_until

METHOD = f"/{SERVICE_NAME}/Process"
NOT_FOUND = MCP_SDK_SESSION_NOT_FOUND_BODY.encode()


def headers(*pairs: tuple[str, str | bytes], end: bool = False) -> pb.HttpHeaders:
    entries = [
        base_pb2.HeaderValue(key=k, raw_value=v if isinstance(v, bytes) else v.encode()) for k, v in pairs
    ]
    return pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=entries), end_of_stream=end)


def request(token: str | None, session: str | None = None, path: str = "/mcp") -> pb.ProcessingRequest:
    pairs: list[tuple[str, str | bytes]] = [(":method", "POST"), (":path", path), (":authority", "mcp")]
    if token:
        pairs.append(("authorization", f"Bearer {token}"))
    if session:
        pairs.append(("mcp-session-id", session))
    return pb.ProcessingRequest(request_headers=headers(*pairs))


def response(
    status: int = 200, *sessions: str | bytes, content_type: str = "application/json"
) -> pb.ProcessingRequest:
    pairs: list[tuple[str, str | bytes]] = [(":status", str(status)), ("content-type", content_type)]
    pairs += [("mcp-session-id", s) for s in sessions]
    return pb.ProcessingRequest(response_headers=headers(*pairs))


def body(data: bytes) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(response_body=pb.HttpBody(body=data, end_of_stream=True))


class Processor:
    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.call = self.channel.stream_stream(
            METHOD,
            request_serializer=lambda m: m if isinstance(m, bytes) else m.SerializeToString(),
            response_deserializer=pb.ProcessingResponse.FromString,
        )

    def exchange(self, *messages: Any, timeout: float = 5) -> list[pb.ProcessingResponse]:
        """Send every message, then half-close; the replies until the stream ended."""
        return list(self.call(iter(messages), timeout=timeout))

    def close(self) -> None:
        self.channel.close()


@pytest.fixture(scope="module")
def idp() -> Iterator[TestIssuer]:
    issuer = TestIssuer()
    yield issuer
    issuer.stop()


@pytest.fixture(scope="module")
def gateway(idp: TestIssuer) -> Iterator[InProcessGateway]:
    config = {
        "policies": str(default_policy_dir()),
        "store": "memory://",
        "auth": {"issuers": [idp.issuer_config()], "allow_anonymous": True},
        "session": {"bind_on": "response"},
    }
    running = InProcessGateway(config)
    yield running
    running.stop()


@pytest.fixture
def processor(gateway: InProcessGateway) -> Iterator[Processor]:
    client = Processor(gateway.address)
    yield client
    client.close()


def stored(gateway: InProcessGateway, session_id: str) -> Any:
    loaded = gateway.gateway.store.load(session_id, time.time())
    return None if loaded is None else loaded.data


def invalid(processor: Processor, *messages: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as failed:
        processor.exchange(*messages)
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT, failed.value
    return failed.value


def test_the_issued_id_is_bound_to_the_requests_identity(
    gateway: InProcessGateway, processor: Processor, idp: TestIssuer
) -> None:
    replies = processor.exchange(request(idp.token("alice")), response(200, "issued-1"))
    assert [r.WhichOneof("response") for r in replies] == ["request_headers", "response_headers"]
    assert not replies[1].response_headers.response.HasField("header_mutation")  # passed unchanged
    record = stored(gateway, "issued-1")
    assert record["owner"] == owner_key(idp.issuer, "alice")
    assert record["bound"] == {"iss": idp.issuer, "sub": "alice"}
    # Check sees it as alice's; bob's request with it is refused; an unknown id is unknown.
    alice = check_request(token=idp.token("alice"), session_id="issued-1")
    assert gateway.client.check(alice).status.code == 0
    assert gateway.last.reason == "allowed"
    gateway.client.check(check_request(token=idp.token("bob"), session_id="issued-1"))
    assert gateway.last.reason == "subject_mismatch"
    gateway.client.check(check_request(token=idp.token("alice"), session_id="nope"))
    assert (gateway.last.reason, gateway.last.status) == ("session_unknown", 404)


def test_anonymous_binds_as_anonymous(gateway: InProcessGateway, processor: Processor) -> None:
    processor.exchange(request(None), response(200, "anon-1"))
    assert stored(gateway, "anon-1")["anonymous"] is True


def test_a_reissued_id_is_refused_with_502(
    gateway: InProcessGateway, processor: Processor, idp: TestIssuer
) -> None:
    processor.exchange(request(idp.token("alice")), response(200, "taken-1"))
    replies = processor.exchange(request(idp.token("bob")), response(200, "taken-1"))
    immediate = replies[-1].immediate_response
    assert immediate.status.code == 502 and immediate.details == "session_reissued"
    assert b"taken-1" not in immediate.SerializeToString()
    assert stored(gateway, "taken-1")["bound"]["sub"] == "alice"
    # The owner's own id, repeated in her session's responses, is normal.
    replies = processor.exchange(request(idp.token("alice"), "taken-1"), response(200, "taken-1"))
    assert replies[-1].WhichOneof("response") == "response_headers"


def test_a_local_reply_passes_and_binds_nothing(gateway: InProcessGateway, processor: Processor) -> None:
    replies = processor.exchange(response(401, "local-1"))
    assert [r.WhichOneof("response") for r in replies] == ["response_headers"]
    assert not replies[0].response_headers.response.HasField("header_mutation")
    assert stored(gateway, "local-1") is None


def test_a_404_with_the_servers_session_not_found_ends_the_session(
    gateway: InProcessGateway, processor: Processor, idp: TestIssuer
) -> None:
    token = idp.token("carol")
    processor.exchange(request(token), response(200, "forgot-1"))
    # A 404 for a wrong path (another body) ends nothing.
    replies = processor.exchange(request(token, "forgot-1", "/wrong"), response(404), body(b"Not Found"))
    assert replies[1].mode_override.response_body_mode == 2  # BUFFERED: only this 404's body
    assert stored(gateway, "forgot-1")["terminated"] is False
    # An SSE 404 is never buffered.
    replies = processor.exchange(request(token, "forgot-1"), response(404, content_type="text/event-stream"))
    assert not replies[1].HasField("mode_override")
    # Another identity's 404 (it never passes Check, but if it came) ends nothing either.
    processor.exchange(request(idp.token("mallory"), "forgot-1"), response(404), body(NOT_FOUND))
    assert stored(gateway, "forgot-1")["terminated"] is False
    processor.exchange(request(token, "forgot-1"), response(404), body(NOT_FOUND))
    record = stored(gateway, "forgot-1")
    assert (record["terminated"], record["ended"]) == (True, "terminated")
    # Never bound again, even when a server hands it out afresh.
    replies = processor.exchange(request(token), response(200, "forgot-1"))
    assert replies[-1].immediate_response.details == "session_reissued"


@pytest.mark.parametrize(
    "messages",
    [
        pytest.param([pb.ProcessingRequest()], id="empty"),
        pytest.param([b"\xff\xff\xff\xff"], id="garbage"),
        pytest.param([pb.ProcessingRequest(request_trailers=pb.HttpTrailers())], id="never-asked"),
        pytest.param([request(None), request(None)], id="two-request-headers"),
        # After a 404 in a session the stream waits for the body: headers again are refused.
        pytest.param([request(None, "s-1"), response(404), response(404)], id="two-response-headers"),
        pytest.param([request(None), body(b"x")], id="unasked-body"),
    ],
)
def test_bad_messages_end_the_stream_cleanly(processor: Processor, messages: list[Any]) -> None:
    invalid(processor, *messages)


@pytest.mark.parametrize(
    "sessions",
    [
        pytest.param(("dup-1", "dup-2"), id="two-headers"),
        pytest.param((b"caf\xc3\xa9",), id="not-ascii"),
        pytest.param((b"bad id",), id="space"),
        pytest.param((b"a,b",), id="comma"),
        pytest.param((b"x\x00y",), id="nul"),
    ],
)
def test_a_malformed_issued_id_ends_the_stream_and_binds_nothing(
    gateway: InProcessGateway, processor: Processor, idp: TestIssuer, sessions: tuple[Any, ...]
) -> None:
    error = invalid(processor, request(idp.token("alice")), response(200, *sessions))
    assert "dup-1" not in (error.details() or "") and "caf" not in (error.details() or "")
    for candidate in ("dup-1", "dup-2", "a,b"):
        assert stored(gateway, candidate) is None


def test_a_stream_cancelled_half_way_binds_nothing(
    gateway: InProcessGateway, processor: Processor, idp: TestIssuer
) -> None:
    sent = threading.Event()

    def messages() -> Iterator[pb.ProcessingRequest]:
        yield request(idp.token("alice"))
        sent.set()
        time.sleep(30)  # never sends the response headers
        yield response(200, "cancelled-1")

    call = processor.call(messages(), timeout=30)
    first = next(call)
    assert first.WhichOneof("response") == "request_headers"
    call.cancel()
    assert stored(gateway, "cancelled-1") is None
    assert processor.exchange(request(idp.token("alice")), response(200, "after-cancel"))
    assert stored(gateway, "after-cancel") is not None


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.timeout(300)
def test_a_thousand_abandoned_streams_leave_memory_flat(tmp_path: Path, idp: TestIssuer) -> None:
    config = {
        "policies": str(default_policy_dir()),
        "store": "memory://",
        "auth": {"issuers": [idp.issuer_config()]},
        "session": {"bind_on": "response"},
    }
    process = GatewayProcess(config, tmp_path)
    try:
        token = idp.token("alice")

        def abandon(count: int) -> None:
            channel = grpc.insecure_channel(process.address)
            call = channel.stream_stream(
                METHOD,
                request_serializer=pb.ProcessingRequest.SerializeToString,
                response_deserializer=pb.ProcessingResponse.FromString,
            )
            for _ in range(count):
                release = threading.Event()

                def messages(release: threading.Event) -> Iterator[pb.ProcessingRequest]:
                    yield request(token)
                    release.wait(10)  # opened, half done, then abandoned

                replies = call(messages(release), timeout=10)
                assert next(replies).WhichOneof("response") == "request_headers"
                replies.cancel()
                release.set()
            channel.close()

        abandon(200)  # warm up: thread pool, caches, allocator arenas
        gc.collect()
        time.sleep(0.5)
        before = _rss_kb(process.proc.pid)
        abandon(1000)
        time.sleep(0.5)
        after = _rss_kb(process.proc.pid)
        # Flat: not a few KB per stream (1000 streams × even 4 KB would be 4 MB).
        assert after - before < 3000, (before, after)
        assert health_status(process.address, SERVICE_NAME) == "SERVING"
        client = Processor(process.address)
        assert client.exchange(request(token), response(200, "still-works"))
        client.close()
        assert process.alive()
    finally:
        process.stop()


def test_health_answers_for_the_processing_service(gateway: InProcessGateway) -> None:
    assert health_status(gateway.address, SERVICE_NAME) == "SERVING"


def test_the_process_span_with_store_children_and_no_session_id(tmp_path: Path, idp: TestIssuer) -> None:
    receiver = OtlpReceiver()
    redis = RedisServer(tmp_path)
    config = {
        "policies": str(default_policy_dir()),
        "store": redis.url,
        "auth": {"issuers": [idp.issuer_config()]},
        "session": {"bind_on": "response"},
    }
    env = {
        "OTEL_SDK_DISABLED": "false",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": receiver.grpc_endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "50",
    }
    process = GatewayProcess(config, tmp_path, env=env)
    client = Processor(process.address)
    try:
        trace_id, parent = "ab" * 16, "cd" * 8
        metadata = (("traceparent", f"00-{trace_id}-{parent}-01"),)
        session_id = "secret-session-4f2a9c"
        messages = iter([request(idp.token("alice")), response(200, session_id)])
        assert len(list(client.call(messages, timeout=5, metadata=metadata))) == 2
        messages = iter([request(idp.token("bob")), response(200, session_id)])
        other = (("traceparent", f"00-{'ef' * 16}-{parent}-01"),)
        replies = list(client.call(messages, timeout=5, metadata=other))
        assert replies[-1].immediate_response.details == "session_reissued"

        (bound,) = wait_until(
            lambda: [s for s in receiver.spans(name=PROCESS_SPAN_NAME) if s.trace_id == trace_id],
            what="the Process span",
        )
        assert bound.kind == trace_pb2.Span.SPAN_KIND_SERVER and bound.parent_span_id == parent
        assert bound.attributes["authz.session.bound_at"] == "response"
        assert bound.attributes["authz.session.new"] is True
        children = [s for s in receiver.spans() if s.parent_span_id == bound.span_id]
        assert "redis EVAL" in {s.name for s in children}  # the bind script
        (refused,) = wait_until(
            lambda: [s for s in receiver.spans(name=PROCESS_SPAN_NAME) if s.trace_id == "ef" * 16],
            what="the refusal's span",
        )
        assert refused.attributes["authz.reason"] == "session_reissued"
        assert refused.attributes["http.response.status_code"] == 502
        assert "authz.session.bound_at" not in refused.attributes
        exported = b"".join(r.SerializeToString() for r in receiver.trace_requests)
        assert session_id.encode() not in exported
    finally:
        client.close()
        process.stop()
        redis.stop()
        receiver.stop()


def test_open_streams_are_capped_and_never_starve_check(idp: TestIssuer) -> None:
    """A stream holds a thread until its response headers come (a slow tool call): past
    max_process_streams a new stream is refused, and Check keeps threads of its own."""
    config = {
        "policies": str(default_policy_dir()),
        "store": "memory://",
        "auth": {"issuers": [idp.issuer_config()]},
        "session": {"bind_on": "response"},
        "max_process_streams": 2,
    }
    running = InProcessGateway(config)
    client = Processor(running.address)
    release = threading.Event()
    token = idp.token("alice")

    def slow_call(caller: str) -> Iterator[pb.ProcessingRequest]:
        yield request(idp.token(caller))
        release.wait(30)  # the upstream has not answered yet

    held = [client.call(slow_call(caller), timeout=30) for caller in ("bob", "carol")]
    try:
        for call in held:
            assert next(call).WhichOneof("response") == "request_headers"
        with pytest.raises(grpc.RpcError) as refused:
            client.exchange(request(token), response(200, "over-the-cap"))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert stored(running, "over-the-cap") is None
        # 20 Checks at once while both streams hold their threads: every one answered.
        with ThreadPoolExecutor(20) as pool:
            statuses = list(pool.map(lambda _: running.client.status(token=token), range(20)))
        assert statuses == [200] * 20
    finally:
        release.set()
        for call in held:
            call.cancel()

    def a_slot_is_free() -> bool:
        try:
            return bool(client.exchange(request(token), response(200, "after-the-cap")))
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
            return False

    wait_until(a_slot_is_free, 10, what="a free stream once the held ones ended")
    assert stored(running, "after-the-cap") is not None
    client.close()
    running.stop()


def test_one_credential_holds_only_its_share_of_the_streams(idp: TestIssuer) -> None:
    """A client decides how long its stream stays open (a request body it never finishes): one
    token may hold an eighth of max_process_streams, and the others keep theirs."""
    config = {
        "policies": str(default_policy_dir()),
        "store": "memory://",
        "auth": {"issuers": [idp.issuer_config()]},
        "session": {"bind_on": "response"},
        "max_process_streams": 16,  # a share of 2
    }
    running = InProcessGateway(config)
    client = Processor(running.address)
    release = threading.Event()
    mallory = idp.token("mallory")
    assert running.client.status(token=mallory) == 200  # Check verified it, as Envoy's order has it

    def slow_call() -> Iterator[pb.ProcessingRequest]:
        yield request(mallory)
        release.wait(30)

    held = [client.call(slow_call(), timeout=30) for _ in range(2)]
    try:
        for call in held:
            assert next(call).WhichOneof("response") == "request_headers"
        with pytest.raises(grpc.RpcError) as refused:
            client.exchange(request(mallory), response(200, "mallory-third"))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert stored(running, "mallory-third") is None
        # A refreshed token, once Check verified it, is the same identity: no new share.
        refreshed = idp.token("mallory", jti="refreshed")
        assert running.client.status(token=refreshed) == 200
        with pytest.raises(grpc.RpcError) as refused:
            client.exchange(request(refreshed), response(200, "mallory-refreshed"))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert client.exchange(request(idp.token("alice")), response(200, "alice-meanwhile"))
        assert stored(running, "alice-meanwhile") is not None
    finally:
        release.set()
        for call in held:
            call.cancel()
    client.close()
    running.stop()


def test_first_use_ends_the_stream_at_the_request(idp: TestIssuer) -> None:
    """bind_on: first_use learns nothing from the response: the stream ends after the request's
    headers, so no thread waits out the upstream call."""
    config = {
        "policies": str(default_policy_dir()),
        "store": "memory://",
        "auth": {"issuers": [idp.issuer_config()]},
    }
    running = InProcessGateway(config)
    client = Processor(running.address)
    release = threading.Event()

    def slow_call() -> Iterator[pb.ProcessingRequest]:
        yield request(idp.token("alice"))
        release.wait(30)

    replies = list(client.call(slow_call(), timeout=10))  # ends without the response headers
    release.set()
    assert [r.WhichOneof("response") for r in replies] == ["request_headers"]
    client.close()
    running.stop()
