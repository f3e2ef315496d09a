"""A real OTLP receiver for the tests: gRPC (port) and HTTP/protobuf (http_port).

It implements the OTLP collector services with the gateway's own generated messages
(gateway.otlp_api, not the opentelemetry-proto package), keeps every span and metric it is
sent, and can search them. Both Envoy and the gateway export to it.
"""

from __future__ import annotations

import gzip
import ssl
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc

from gateway.demo.receiver import any_value
from gateway.otlp_api.opentelemetry.proto.collector.metrics.v1 import (
    metrics_service_pb2,
    metrics_service_pb2_grpc,
)
from gateway.otlp_api.opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


@dataclass
class ReceivedSpan:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: int
    attributes: dict[str, Any]
    events: list[tuple[str, dict[str, Any]]]
    status_code: int
    raw: Any = field(repr=False, default=None)


class OtlpReceiver:
    def __init__(self, tls: tuple[Path, Path] | None = None) -> None:
        """tls: (certificate chain, key) PEM files: both ports then speak TLS only."""
        self.trace_requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self.metric_requests: list[metrics_service_pb2.ExportMetricsServiceRequest] = []
        self.raw_payloads: list[bytes] = []
        # What each export request came with: HTTP headers or gRPC metadata (keys lower-case),
        # and the HTTP Content-Encoding ("" for none).
        self.request_headers: list[dict[str, str]] = []
        self.content_encodings: list[str] = []
        # Set by a test: the next this-many export requests fail, transiently (gRPC UNAVAILABLE,
        # HTTP 503), and are counted in failed_requests.
        self.fail_next = 0
        self.failed_requests = 0
        self._lock = threading.Lock()
        receiver = self

        class TraceService(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request: Any, context: Any) -> Any:
                if receiver._arrived(dict(context.invocation_metadata()), ""):
                    context.abort(grpc.StatusCode.UNAVAILABLE, "failing on purpose")
                receiver._add_traces(request, request.SerializeToString())
                return trace_service_pb2.ExportTraceServiceResponse()

        class MetricsService(metrics_service_pb2_grpc.MetricsServiceServicer):
            def Export(self, request: Any, context: Any) -> Any:
                if receiver._arrived(dict(context.invocation_metadata()), ""):
                    context.abort(grpc.StatusCode.UNAVAILABLE, "failing on purpose")
                with receiver._lock:
                    receiver.metric_requests.append(request)
                    receiver.raw_payloads.append(request.SerializeToString())
                return metrics_service_pb2.ExportMetricsServiceResponse()

        self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(TraceService(), self._grpc)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(MetricsService(), self._grpc)
        if tls is None:
            self.port = self._grpc.add_insecure_port("127.0.0.1:0")
        else:
            credentials = grpc.ssl_server_credentials([(tls[1].read_bytes(), tls[0].read_bytes())])
            self.port = self._grpc.add_secure_port("127.0.0.1:0", credentials)
        self._grpc.start()

        class HttpHandler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                encoding = (self.headers.get("content-encoding") or "").lower()
                if receiver._arrived({k.lower(): v for k, v in self.headers.items()}, encoding):
                    self.send_error(503)
                    return
                if encoding == "gzip":
                    body = gzip.decompress(body)
                if self.path == "/v1/traces":
                    request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
                    receiver._add_traces(request, body)
                    reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                elif self.path == "/v1/metrics":
                    request = metrics_service_pb2.ExportMetricsServiceRequest.FromString(body)
                    with receiver._lock:
                        receiver.metric_requests.append(request)
                        receiver.raw_payloads.append(body)
                    reply = metrics_service_pb2.ExportMetricsServiceResponse().SerializeToString()
                else:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                return

        self._http = ThreadingHTTPServer(("127.0.0.1", 0), HttpHandler)
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(tls[0], tls[1])
            self._http.socket = context.wrap_socket(self._http.socket, server_side=True)
        self.http_port = int(self._http.server_address[1])
        threading.Thread(target=self._http.serve_forever, daemon=True).start()

    @property
    def grpc_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def http_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def exporter_env(self, protocol: str = "grpc") -> dict[str, str]:
        """OTEL_* variables that make a gateway process export here, flushing quickly."""
        return {
            "OTEL_SDK_DISABLED": "false",
            "OTEL_EXPORTER_OTLP_ENDPOINT": self.grpc_endpoint if protocol == "grpc" else self.http_endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "OTEL_METRIC_EXPORT_INTERVAL": "500",
        }

    def wait_for_span(self, predicate: Any, timeout: float = 15.0, **filters: Any) -> ReceivedSpan:
        """The first span (matching the filters) for which predicate(span) holds."""
        deadline = time.monotonic() + timeout
        while True:
            for span in self.spans(**filters):
                if predicate(span):
                    return span
            if time.monotonic() > deadline:
                raise TimeoutError(f"no such span after {timeout}s")
            time.sleep(0.05)

    def metric_points(self, name: str, service: str | None = None) -> list[tuple[dict[str, Any], Any]]:
        """(attributes, data point) of every point received for a metric, in arrival order."""
        with self._lock:
            requests = list(self.metric_requests)
        points = []
        for request in requests:
            for resource_metrics in request.resource_metrics:
                attrs = {kv.key: any_value(kv.value) for kv in resource_metrics.resource.attributes}
                if service is not None and attrs.get("service.name") != service:
                    continue
                for scope_metrics in resource_metrics.scope_metrics:
                    for metric in scope_metrics.metrics:
                        if metric.name != name:
                            continue
                        data = getattr(metric, metric.WhichOneof("data"))
                        for point in data.data_points:
                            points.append(({kv.key: any_value(kv.value) for kv in point.attributes}, point))
        return points

    def all_bytes(self) -> bytes:
        """Every payload received so far, as sent (for secret scans)."""
        with self._lock:
            return b"".join(self.raw_payloads)

    def _arrived(self, headers: dict[str, str], encoding: str) -> bool:
        """Note what an export request came with; whether to fail it (fail_next)."""
        with self._lock:
            self.request_headers.append(headers)
            self.content_encodings.append(encoding)
            if self.fail_next > 0:
                self.fail_next -= 1
                self.failed_requests += 1
                return True
            return False

    def _add_traces(self, request: Any, raw: bytes) -> None:
        with self._lock:
            self.trace_requests.append(request)
            self.raw_payloads.append(raw)

    def spans(self, service: str | None = None, name: str | None = None) -> list[ReceivedSpan]:
        found = []
        with self._lock:
            requests = list(self.trace_requests)
        for request in requests:
            for resource_spans in request.resource_spans:
                attrs = {kv.key: any_value(kv.value) for kv in resource_spans.resource.attributes}
                svc = str(attrs.get("service.name", ""))
                if service is not None and svc != service:
                    continue
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        if name is not None and span.name != name:
                            continue
                        found.append(
                            ReceivedSpan(
                                service=svc,
                                name=span.name,
                                trace_id=span.trace_id.hex(),
                                span_id=span.span_id.hex(),
                                parent_span_id=span.parent_span_id.hex(),
                                kind=span.kind,
                                attributes={kv.key: any_value(kv.value) for kv in span.attributes},
                                events=[
                                    (e.name, {kv.key: any_value(kv.value) for kv in e.attributes})
                                    for e in span.events
                                ],
                                status_code=span.status.code,
                                raw=span,
                            )
                        )
        return found

    def wait_for_spans(
        self, count: int, timeout: float = 15.0, **filters: Any
    ) -> list[ReceivedSpan]:
        deadline = time.monotonic() + timeout
        while True:
            spans = self.spans(**filters)
            if len(spans) >= count or time.monotonic() > deadline:
                return spans
            time.sleep(0.1)

    def stop(self) -> None:
        self._grpc.stop(0)
        self._http.shutdown()
        self._http.server_close()
