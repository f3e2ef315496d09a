"""A small OTLP/gRPC trace receiver inside the demo: how it learns what the gateway decided.

The gateway exports one span per Check (its telemetry contract), the demo reads the
decision and the reason from those spans, and groups them by trace id: each step of the
demo sends its own W3C trace context, which Envoy continues into the ext_authz call.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc

from gateway.otlp_api.opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from gateway.otlp_api.opentelemetry.proto.common.v1 import common_pb2
from gateway.telemetry.tracing import PROCESS_SPAN_NAME, SPAN_NAME

_TRACE_SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"


@dataclass(frozen=True)
class SeenDecision:
    """One gateway Check span, reduced to what the demo prints."""

    trace_id: str
    start_ns: int
    attributes: dict[str, Any]
    events: tuple[str, ...]

    @property
    def decision(self) -> str:
        return str(self.attributes.get("authz.decision", "?"))

    @property
    def reason(self) -> str:
        return str(self.attributes.get("authz.reason", "?"))

    @property
    def http_method(self) -> str:
        return str(self.attributes.get("http.request.method", ""))

    @property
    def mcp_method(self) -> str:
        return str(self.attributes.get("mcp.method.name", ""))

    @property
    def tool(self) -> str:
        return str(self.attributes.get("gen_ai.tool.name", ""))

    @property
    def status(self) -> int:
        return int(self.attributes.get("http.response.status_code", 200))

    @property
    def session_new(self) -> bool:
        return bool(self.attributes.get("authz.session.new", False))


def any_value(value: common_pb2.AnyValue) -> Any:
    """An OTLP AnyValue as the plain Python value it holds."""
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, kind) if kind else None


class DecisionReceiver:
    """OTLP/gRPC on a free loopback port; keeps the gateway's Check spans, and counts the
    session ids its response path bound (Process spans with `authz.session.bound_at`)."""

    def __init__(self, port: int = 0) -> None:
        self._binds: list[str] = []
        self._decisions: list[SeenDecision] = []
        self._lock = threading.Lock()
        handler = grpc.unary_unary_rpc_method_handler(
            self._export,
            request_deserializer=trace_service_pb2.ExportTraceServiceRequest.FromString,
            response_serializer=trace_service_pb2.ExportTraceServiceResponse.SerializeToString,
        )
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="otlp"))
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(_TRACE_SERVICE, {"Export": handler}),)
        )
        self.port = self._server.add_insecure_port(f"127.0.0.1:{port}")
        if self.port == 0:
            raise OSError(f"the demo's OTLP receiver cannot listen on 127.0.0.1:{port}")
        self._server.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, _context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        found = []
        for resource_spans in request.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    if span.name == PROCESS_SPAN_NAME:
                        attributes = {kv.key: any_value(kv.value) for kv in span.attributes}
                        if attributes.get("authz.session.bound_at") == "response":
                            with self._lock:
                                self._binds.append(span.trace_id.hex())
                        continue
                    if span.name != SPAN_NAME:
                        continue  # Envoy's own spans, the gateway's JWKS fetches
                    found.append(
                        SeenDecision(
                            trace_id=span.trace_id.hex(),
                            start_ns=span.start_time_unix_nano,
                            attributes={kv.key: any_value(kv.value) for kv in span.attributes},
                            events=tuple(event.name for event in span.events),
                        )
                    )
        with self._lock:
            self._decisions.extend(found)
        return trace_service_pb2.ExportTraceServiceResponse()

    def wait_binds(self, trace_id: str, expected: int, timeout: float = 10.0) -> int:
        """How many session ids the response path bound in this trace (its Process spans), once
        `expected` have arrived (or at the timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                found = self._binds.count(trace_id)
            if found >= expected or time.monotonic() > deadline:
                return found
            time.sleep(0.02)

    def in_trace(self, trace_id: str) -> list[SeenDecision]:
        with self._lock:
            found = [d for d in self._decisions if d.trace_id == trace_id]
        return sorted(found, key=lambda d: d.start_ns)

    def wait(
        self, trace_id: str, ready: Callable[[list[SeenDecision]], bool], timeout: float = 10.0
    ) -> list[SeenDecision]:
        """The decisions of one trace, once `ready` says they have all arrived (or at the timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            decisions = self.in_trace(trace_id)
            if ready(decisions) or time.monotonic() > deadline:
                return decisions
            time.sleep(0.02)

    def stop(self) -> None:
        self._server.stop(0)
