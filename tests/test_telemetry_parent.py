"""parent_from: metadata first, then request headers; the fast version-00 path agrees with the propagator."""

from __future__ import annotations

import pytest
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from gateway.telemetry.tracing import parent_from

TRACE, SPAN = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"


def context_of(parent: object) -> trace.SpanContext:
    return trace.get_current_span(parent).get_span_context()  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "traceparent",
    [
        f"00-{TRACE}-{SPAN}-01",
        f"00-{TRACE}-{SPAN}-00",
        f"00-{TRACE}-{SPAN}-03",
        f"00-{'0' * 32}-{SPAN}-01",  # invalid trace id
        f"00-{TRACE}-{'0' * 16}-01",  # invalid span id
        f"00-{TRACE.upper()}-{SPAN}-01",  # not lower-case hex
        f"01-{TRACE}-{SPAN}-01-extra",  # a future version
        "garbage",
    ],
)
def test_same_parent_as_the_propagator(traceparent: str) -> None:
    ours = parent_from([("traceparent", traceparent)], None)
    theirs = TraceContextTextMapPropagator().extract({"traceparent": traceparent})
    assert ours is not None
    assert context_of(ours) == context_of(theirs)
    assert context_of(ours).is_remote == context_of(theirs).is_remote


def test_metadata_then_headers_then_none() -> None:
    other = f"00-{'1' * 32}-{'2' * 16}-01"
    both = parent_from([("traceparent", f"00-{TRACE}-{SPAN}-01")], {"traceparent": other})
    assert both is not None and context_of(both).trace_id == int(TRACE, 16)
    headers_only = parent_from([("user-agent", "grpc")], {"traceparent": other, "tracestate": "a=1"})
    assert headers_only is not None and context_of(headers_only).trace_id == int("1" * 32, 16)
    assert context_of(headers_only).trace_state.get("a") == "1"
    assert parent_from([], {}) is None
    assert parent_from(None, None) is None
