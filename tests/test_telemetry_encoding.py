"""The fast OTLP span encoder produces exactly what the SDK's encoder produces."""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from gateway.decision import Decision, Mismatch
from gateway.mcp import McpCall
from gateway.request import RequestContext
from gateway.telemetry.otlp_encoding import SpanEncoder, encode_request
from gateway.telemetry.tracing import CheckSpans, SubjectHasher


class Collect(SpanExporter):
    def __init__(self) -> None:
        self.spans: list[ReadableSpan] = []

    def export(self, spans: object) -> SpanExportResult:
        self.spans.extend(spans)  # type: ignore[arg-type]
        return SpanExportResult.SUCCESS


def varied_spans() -> list[ReadableSpan]:
    collected = Collect()
    provider = TracerProvider(resource=Resource.create({"service.name": "enc", "team": "edge", "n": 3}))
    provider.add_span_processor(SimpleSpanProcessor(collected))
    tracer = provider.get_tracer("authz-gateway", "1.2", schema_url="https://opentelemetry.io/schemas/1.21.0")
    other_tracer = provider.get_tracer("other")
    checks = CheckSpans(SubjectHasher(False, "k"), tracer)
    parent = TraceContextTextMapPropagator().extract(
        {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "tracestate": "a=1,b=two"}
    )
    calls = (McpCall("tools/call", "x"),)
    context = RequestContext(method="POST", path="/mcp/ü", headers={}, parsed_mcp=calls)
    checks.record(Decision(True, "allowed", session_new=True), context, parent, 1_000, 2_000)
    checks.record(
        Decision(False, "subject_mismatch", 404, "p", "r", mismatch=Mismatch("sub", "alice", "bob")),
        context, None, 3_000, 4_000,
    )
    checks.record(Decision(False, "policy_error", 403, error="when: no such key"), None, None, 5, 6)
    with tracer.start_as_current_span("child", kind=SpanKind.CLIENT) as span:
        span.set_attributes({
            "b": False, "i": -7, "big": 2**62, "f": 1.5, "empty": "", "seq": ["a", "b"], "ints": (1, 2),
            "bools": [True, False], "floats": [0.5],
        })
        span.add_event("e", {"k": "v"})
        span.add_event("bare")
        span.set_status(Status(StatusCode.OK))
    with other_tracer.start_as_current_span("internal"):
        pass
    return collected.spans


def test_same_message_as_the_sdk() -> None:
    spans = varied_spans()
    assert len(spans) == 5
    encoder = SpanEncoder()
    for _ in range(2):  # the second time from the key/value cache
        mine = ExportTraceServiceRequest.FromString(encoder.request(spans))
        assert mine == encode_spans(spans)


def test_links_fall_back_to_the_sdk_encoder() -> None:
    collected = Collect()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(collected))
    linked = trace.SpanContext(1, 2, is_remote=True)
    provider.get_tracer("t").start_span("linked", links=[Link(linked, {"x": 1})]).end()
    assert encode_request(SpanEncoder(), collected.spans) == encode_spans(collected.spans)
