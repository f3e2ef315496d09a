"""Telemetry providers from the standard OTEL_* variables.

Honoured: OTEL_SDK_DISABLED, OTEL_SERVICE_NAME (default authz-gateway),
OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_SAMPLER(_ARG), OTEL_EXPORTER_OTLP_(TRACES_|METRICS_)
ENDPOINT / PROTOCOL / HEADERS / TIMEOUT, OTEL_TRACES_EXPORTER / OTEL_METRICS_EXPORTER
(`none` turns a signal off), OTEL_BSP_* and OTEL_METRIC_EXPORT_INTERVAL.

With no OTLP endpoint nothing is exported and nothing is printed per request. Spans go
through a batch processor; shutdown() flushes them, and the metrics, before exit.

fast_path (config `telemetry.fast_path`, default on) picks the lean Check span, the faster
OTLP/gRPC span encoding and the readers that collect the per-check local instruments, all
of gateway.telemetry.fast_path; off, or when the installed SDK lacks a hook they need,
everything is the plain SDK's. The spans and metrics exported are the same either way.
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


def _span_exporter(fast_path: bool) -> Any:
    if _protocol("TRACES") == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpanExporter

        return HttpSpanExporter()
    if fast_path:
        from gateway.telemetry.fast_path import fast_grpc_span_exporter

        return fast_grpc_span_exporter()
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter

    return GrpcSpanExporter()


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
    fast_path: bool = False  # whether gateway.telemetry.fast_path's hooks are in use
    extras: list[Any] = field(default_factory=list)

    def shutdown(self) -> None:
        """Flush and stop: no span or metric point is lost at exit."""
        if self.tracer_provider is not None:
            from gateway.telemetry.fast_path import install_lean_spans

            install_lean_spans(None)  # after this, a late check's span goes nowhere, not to a closed queue
        for provider in (self.tracer_provider, self.meter_provider):
            if provider is None:
                continue
            try:
                provider.force_flush()
                provider.shutdown()
            except Exception as exc:  # flushing must not turn a clean exit into a crash
                log.warning("telemetry flush failed: %s", exc)


def _fast_path_usable() -> bool:
    """Whether the installed SDK still has every hook the fast path needs; if not, say so once."""
    from gateway.telemetry.fast_path import installed_versions, missing_hooks

    missing = missing_hooks(required_only=True)
    if missing:
        log.warning(
            "telemetry: fast path off, the plain SDK is used instead (%s): %s",
            installed_versions(),
            "; ".join(missing),
        )
    return not missing


def setup_telemetry(*, metrics_http: bool = False, fast_path: bool = True) -> Telemetry:
    """Install the global tracer and meter providers, as the OTEL_* variables ask.

    fast_path: the config's `telemetry.fast_path`; False uses the plain SDK throughout.
    """
    if sdk_disabled():
        return Telemetry()
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import MetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from gateway.telemetry import fast_path as fast_paths
    from gateway.telemetry import local_metrics
    from gateway.telemetry.tracing import TRACER_NAME

    resource = service_resource()
    if fast_path and (_endpoint_configured("TRACES") or _endpoint_configured("METRICS") or metrics_http):
        fast_path = _fast_path_usable()
    telemetry = Telemetry(fast_path=fast_path)

    if _endpoint_configured("TRACES"):
        # A "Queue full" warning per dropped span when the collector is down: quieted in both modes.
        fast_paths.quiet_queue_full_warnings()
        tracer_provider = TracerProvider(resource=resource)  # the sampler comes from OTEL_TRACES_SAMPLER
        processor = BatchSpanProcessor(_span_exporter(fast_path))
        tracer_provider.add_span_processor(processor)
        trace.set_tracer_provider(tracer_provider)
        if fast_path:
            # The Check span's lean path: the same sampler, ids, resource, processor and scope.
            lean = fast_paths.LeanSpans.of(tracer_provider, processor, resource, TRACER_NAME)
            fast_paths.install_lean_spans(lean)
        telemetry.tracer_provider = tracer_provider
        telemetry.exporting = True

    if fast_path:
        # Readers that also collect the per-check local instruments (local_metrics.py).
        periodic_reader, prometheus_reader = fast_paths.metric_readers()
    else:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        periodic_reader, prometheus_reader = PeriodicExportingMetricReader, PrometheusMetricReader
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
        if fast_path:
            local_metrics.enable(resource)
        else:  # the per-check instruments record through SDK instruments of the same names
            local_metrics.record_through(meter_provider.get_meter(local_metrics.SCOPE.name))
    # Once at start, so an operator sees where telemetry goes (endpoints hold no secrets;
    # OTLP headers, which may, are not logged).
    log.info(
        "telemetry: traces %s, metrics %s%s%s",
        _destination("TRACES") if telemetry.exporting else "not exported",
        _destination("METRICS") if _endpoint_configured("METRICS") else "not pushed",
        ", served on /metrics" if metrics_http else "",
        "" if fast_path else ", fast path off (plain SDK)",
    )
    return telemetry
