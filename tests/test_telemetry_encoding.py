"""The gateway's OTLP encoders produce what the SDK's OTLP encoders produce, for spans and metrics.

The SDK's encoders (opentelemetry-exporter-otlp-proto-common, in the `test` extra only) are
the reference: the gateway's bytes, parsed as the SDK's message, equal the SDK's message;
parsed as gateway.otlp_api's, they serialize back to the same message.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, MetricsData
from opentelemetry.sdk.metrics.view import ExponentialBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from gateway.decision import Decision, Mismatch
from gateway.mcp import McpCall
from gateway.otlp_api.opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from gateway.otlp_api.opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from gateway.request import RequestContext
from gateway.telemetry.otlp_encoding import SpanEncoder
from gateway.telemetry.otlp_metric_encoding import MetricEncoder
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
    other_tracer = provider.get_tracer("other", attributes={"scope.kind": "test", "scope.n": 2})
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
            "bools": [True, False], "floats": [0.5], "mixed-looking": (True,), "no-items": (),
        })
        span.add_event("e", {"k": "v"})
        span.add_event("bare")
        span.set_status(Status(StatusCode.OK))
    local = trace.SpanContext(0xABC, 0xDEF, is_remote=False, trace_flags=TraceFlags(1))
    remote = trace.SpanContext(1, 2, is_remote=True, trace_state=TraceState([("k", "v")]))
    linked = other_tracer.start_span(
        "linked", kind=SpanKind.PRODUCER, links=[Link(remote, {"x": 1, "why": "retry"}), Link(local)]
    )
    linked.set_status(Status(StatusCode.ERROR, "went wrong"))
    linked.end()
    with other_tracer.start_as_current_span("internal", kind=SpanKind.CONSUMER):
        pass
    return collected.spans


def sdk_request(spans: Sequence[ReadableSpan]) -> ExportTraceServiceRequest:
    request: ExportTraceServiceRequest = encode_spans(spans)
    return request


def assert_same_spans(encoder: SpanEncoder, spans: Sequence[ReadableSpan]) -> None:
    mine = encoder.request(spans)
    expected = sdk_request(spans)
    assert ExportTraceServiceRequest.FromString(mine) == expected
    # Read with the gateway's own messages: the same request, field for field.
    own = trace_service_pb2.ExportTraceServiceRequest.FromString(mine)
    assert ExportTraceServiceRequest.FromString(own.SerializeToString()) == expected


def test_same_message_as_the_sdk() -> None:
    spans = varied_spans()
    assert len(spans) == 6
    assert any(span.links for span in spans)
    encoder = SpanEncoder()
    for _ in range(2):  # the second time from the key/value cache
        assert_same_spans(encoder, spans)


def test_hand_built_spans_of_every_shape() -> None:
    """ReadableSpans as another processor might hand them over: odd values, dropped counts,
    resources equal but distinct, a remote parent, a span with no scope."""
    resource = Resource({"service.name": "a"}, "https://schema/1")
    same_resource = Resource({"service.name": "a"}, "https://schema/1")
    other_resource = Resource({"service.name": "b"})
    remote_parent = SpanContext(5, 6, is_remote=True)

    def span(name: str, resource: Resource, **kwargs: object) -> ReadableSpan:
        context = SpanContext(0x1234, len(name) + 10, is_remote=False, trace_state=TraceState([("z", "1")]))
        return ReadableSpan(name=name, context=context, resource=resource, **kwargs)  # type: ignore[arg-type]

    spans = [
        span(
            "values", resource,
            attributes={
                "none": None, "bytes": b"\x00\x01", "map": {"a": 1, "b": [1.5, "x"]}, "neg": -(2**63)
            },
            instrumentation_scope=InstrumentationScope("s", "1", "https://schema/s", {"a": "b"}),
        ),
        span(
            "dropped", same_resource, parent=remote_parent, kind=SpanKind.SERVER,
            events=[Event("ev", {"k": 1}, timestamp=77)], start_time=1, end_time=2,
        ),
        span("no-scope", other_resource, status=Status(StatusCode.ERROR)),
    ]
    assert_same_spans(SpanEncoder(), spans)


def test_a_value_otlp_cannot_carry_is_left_out_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    context = SpanContext(1, 2, is_remote=False)
    span = ReadableSpan(
        name="odd", context=context, resource=Resource({}),
        attributes={"ok": "yes", "huge": 2**70, "object": object()},  # type: ignore[dict-item]
    )
    with caplog.at_level(logging.WARNING):
        request = trace_service_pb2.ExportTraceServiceRequest.FromString(SpanEncoder().request([span]))
    (encoded,) = request.resource_spans[0].scope_spans[0].spans
    assert [kv.key for kv in encoded.attributes] == ["ok"]
    assert "'huge'" in caplog.text and "'object'" in caplog.text


# ---------------------------------------------------------------------------------------
# Metrics.
# ---------------------------------------------------------------------------------------


def varied_metrics() -> MetricsData:
    reader = InMemoryMetricReader()
    provider = MeterProvider(
        resource=Resource.create({"service.name": "enc-metrics"}),
        metric_readers=[reader],
        views=[View(instrument_name="exp*", aggregation=ExponentialBucketHistogramAggregation())],
    )
    meter = provider.get_meter("authz-gateway", "1.0", schema_url="https://schema/m")
    tracer = TracerProvider().get_tracer("t")
    counter = meter.create_counter("authz_checks", "1", "Checks")
    updown = meter.create_up_down_counter("sessions_live")
    histogram = meter.create_histogram("authz_check_duration", "s", "Time per check")
    exponential = meter.create_histogram("exp_duration", "ms")
    gauge = meter.create_gauge("queue_depth")
    float_counter = meter.create_counter("bytes_sent")
    meter.create_observable_gauge("observed", [lambda options: [_observation(3.5, {"k": "v"})]])
    # Recorded inside a sampled span: the default exemplar filter keeps exemplars there.
    with tracer.start_as_current_span("with-exemplars"):
        for n in range(20):
            attributes = {"decision": "allow" if n % 3 else "deny", "reason": "r", "n.mod": n % 2}
            counter.add(1, attributes)
            updown.add(-1 if n % 4 else 2, {"store": "memory"})
            histogram.record(0.0004 * n, attributes)
            exponential.record(n * 1.5 + 0.1, {"decision": "allow"})
            float_counter.add(0.25)
    exponential.record(-2.0, {"decision": "deny"})  # a negative bucket
    gauge.set(7, {"queue": "spans"})
    data = reader.get_metrics_data()
    assert data is not None
    provider.shutdown()
    return data


def _observation(value: float, attributes: dict[str, str]) -> object:
    from opentelemetry.metrics import Observation

    return Observation(value, attributes)


def test_metrics_same_message_as_the_sdk() -> None:
    data = varied_metrics()
    expected: ExportMetricsServiceRequest = encode_metrics(data)
    names = {m.name for rm in expected.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}
    assert {"authz_checks", "sessions_live", "authz_check_duration", "exp_duration", "queue_depth"} <= names
    metrics = [m for rm in expected.resource_metrics for sm in rm.scope_metrics for m in sm.metrics]
    kinds = {m.WhichOneof("data") for m in metrics}
    assert kinds == {"sum", "gauge", "histogram", "exponential_histogram"}
    assert any(
        p.exemplars for rm in expected.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
        if m.WhichOneof("data") == "sum" for p in m.sum.data_points
    ), "no exemplar recorded: the test would not cover them"
    mine = MetricEncoder().request(data)
    assert ExportMetricsServiceRequest.FromString(mine) == expected
    own = metrics_service_pb2.ExportMetricsServiceRequest.FromString(mine)
    assert ExportMetricsServiceRequest.FromString(own.SerializeToString()) == expected
