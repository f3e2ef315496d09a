"""Telemetry providers from the standard OTEL_* variables.

Honoured: OTEL_SDK_DISABLED, OTEL_SERVICE_NAME (default authz-gateway),
OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_SAMPLER(_ARG), OTEL_EXPORTER_OTLP_(TRACES_|METRICS_)
ENDPOINT / PROTOCOL / HEADERS / TIMEOUT, OTEL_TRACES_EXPORTER / OTEL_METRICS_EXPORTER
(`none` turns a signal off), OTEL_BSP_* and OTEL_METRIC_EXPORT_INTERVAL.

With no OTLP endpoint nothing is exported and nothing is printed per request. Spans go
through a batch processor; shutdown() flushes them, and the metrics, before exit.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from opentelemetry import metrics, trace

log = logging.getLogger(__name__)

DEFAULT_SERVICE_NAME = "authz-gateway"


def _env(name: str) -> str:
    return os.environ.get(name, "").strip()


def sdk_disabled() -> bool:
    return _env("OTEL_SDK_DISABLED").lower() == "true"


def _protocol(signal: str) -> str:
    protocol = _env(f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL") or _env("OTEL_EXPORTER_OTLP_PROTOCOL")
    return (protocol or "grpc").lower()


def _endpoint(signal: str) -> str:
    return _env(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT") or _env("OTEL_EXPORTER_OTLP_ENDPOINT")


def _endpoint_configured(signal: str) -> bool:
    # OTEL_TRACES_EXPORTER=none / OTEL_METRICS_EXPORTER=none switch one signal off.
    return bool(_endpoint(signal)) and _env(f"OTEL_{signal}_EXPORTER").lower() != "none"


def _destination(signal: str) -> str:
    """Where a signal goes, for the start-up log line; any user:password in the URL is left out."""
    parts = urlsplit(_endpoint(signal))
    netloc = parts.netloc.rpartition("@")[2]
    return f"-> OTLP {_protocol(signal)} {parts.scheme}://{netloc}{parts.path}" if parts.scheme else "-> OTLP"


def service_resource() -> Any:
    """The resource from OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME, named authz-gateway by default."""
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource

    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    return resource


def _span_exporter() -> Any:
    if _protocol("TRACES") == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpanExporter

        return HttpSpanExporter()
    from gateway.telemetry.otlp_encoding import fast_grpc_span_exporter

    return fast_grpc_span_exporter()


def _metric_exporter() -> Any:
    if _protocol("METRICS") == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpExporter

        return HttpExporter()
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcExporter

    return GrpcExporter()


@dataclass
class Telemetry:
    tracer_provider: Any = None
    meter_provider: Any = None
    prometheus_reader: Any = None
    exporting: bool = False
    extras: list[Any] = field(default_factory=list)

    def shutdown(self) -> None:
        """Flush and stop: no span or metric point is lost at exit."""
        if self.tracer_provider is not None:
            from gateway.telemetry.tracing import install_span_sink

            install_span_sink(None)  # after this, a late check's span goes nowhere, not to a closed queue
        for provider in (self.tracer_provider, self.meter_provider):
            if provider is None:
                continue
            try:
                provider.force_flush()
                provider.shutdown()
            except Exception as exc:  # flushing must not turn a clean exit into a crash
                log.warning("telemetry flush failed: %s", exc)


def setup_telemetry(*, metrics_http: bool = False) -> Telemetry:
    """Install the global tracer and meter providers, as the OTEL_* variables ask."""
    if sdk_disabled():
        return Telemetry()
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import MetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    from gateway.telemetry import local_metrics
    from gateway.telemetry.local_metrics import readers_with_local_metrics
    from gateway.telemetry.tracing import TRACER_NAME, SpanSink, install_span_sink

    resource = service_resource()
    telemetry = Telemetry()

    if _endpoint_configured("TRACES"):
        # When the collector is down the span queue fills, and the SDK builds a "Queue full"
        # warning record for every dropped span: per request, and costly. Exporter failures
        # are still logged (once per batch) by the exporter's own logger.
        logging.getLogger("opentelemetry.sdk._shared_internal").setLevel(logging.ERROR)
        tracer_provider = TracerProvider(resource=resource)  # the sampler comes from OTEL_TRACES_SAMPLER
        processor = BatchSpanProcessor(_span_exporter())
        tracer_provider.add_span_processor(processor)
        trace.set_tracer_provider(tracer_provider)
        # The Check span's lean path: the same sampler, ids, resource and processor.
        install_span_sink(
            SpanSink(
                processor=processor,
                sampler=tracer_provider.sampler,
                id_generator=tracer_provider.id_generator,
                resource=resource,
                scope=InstrumentationScope(TRACER_NAME),
            )
        )
        telemetry.tracer_provider = tracer_provider
        telemetry.exporting = True

    # Readers that also collect the per-check local instruments (local_metrics.py).
    periodic_reader, prometheus_reader = readers_with_local_metrics()
    readers: list[MetricReader] = []
    if _endpoint_configured("METRICS"):
        readers.append(periodic_reader(_metric_exporter()))
    if metrics_http:
        telemetry.prometheus_reader = prometheus_reader()
        readers.append(telemetry.prometheus_reader)
    if readers:
        meter_provider = MeterProvider(resource=resource, metric_readers=readers)
        metrics.set_meter_provider(meter_provider)
        telemetry.meter_provider = meter_provider
        local_metrics.enable(resource)
    # Once at start, so an operator sees where telemetry goes (endpoints hold no secrets;
    # OTLP headers, which may, are not logged).
    log.info(
        "telemetry: traces %s, metrics %s%s",
        _destination("TRACES") if telemetry.exporting else "not exported",
        _destination("METRICS") if _endpoint_configured("METRICS") else "not pushed",
        ", served on /metrics" if metrics_http else "",
    )
    return telemetry
