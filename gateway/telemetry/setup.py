"""Telemetry providers from the standard OTEL_* variables.

Honoured: OTEL_SDK_DISABLED, OTEL_SERVICE_NAME (default authz-gateway),
OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_SAMPLER(_ARG), OTEL_EXPORTER_OTLP_(TRACES_|METRICS_)
ENDPOINT / PROTOCOL / HEADERS / TIMEOUT / INSECURE / CERTIFICATE / CLIENT_KEY /
CLIENT_CERTIFICATE / COMPRESSION (read by gateway.telemetry.otlp_settings),
OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE, OTEL_TRACES_EXPORTER /
OTEL_METRICS_EXPORTER (`none` turns a signal off), OTEL_BSP_* and OTEL_METRIC_EXPORT_INTERVAL.

Spans and metrics go out through the gateway's own OTLP exporters (gateway.telemetry.otlp_export),
which need neither opentelemetry-proto nor the SDK's OTLP exporter packages. A signal whose
settings they cannot use (UnusableSettings: an endpoint that is not one, a TLS file that cannot
be read) is off, after one error line; the gateway starts all the same.

With no OTLP endpoint nothing is exported and nothing is printed per request. Spans go
through a batch processor; shutdown() flushes them, and the metrics, before exit.

fast_path (config `telemetry.fast_path`, default on) picks the lean Check span and the readers
that collect the per-check local instruments, both of gateway.telemetry.fast_path; off, or
when the installed SDK lacks a hook they need, everything but the exporters is the plain
SDK's. The spans and metrics exported are the same either way.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from opentelemetry import metrics, trace

from gateway.telemetry import otlp_settings
from gateway.telemetry.otlp_export import OtlpMetricExporter, OtlpSpanExporter, ShutdownClock
from gateway.telemetry.otlp_settings import OtlpSettings, Signal, UnusableSettings

log = logging.getLogger(__name__)
Exporter = TypeVar("Exporter", OtlpSpanExporter, OtlpMetricExporter)

DEFAULT_SERVICE_NAME = "authz-gateway"


def _env(name: str) -> str:
    return os.environ.get(name, "").strip()


def sdk_disabled() -> bool:
    return _env("OTEL_SDK_DISABLED").lower() == "true"


def _endpoint(signal: Signal) -> str:
    return _env(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT") or _env("OTEL_EXPORTER_OTLP_ENDPOINT")


def _endpoint_configured(signal: Signal) -> bool:
    # OTEL_TRACES_EXPORTER=none / OTEL_METRICS_EXPORTER=none switch one signal off.
    return bool(_endpoint(signal)) and _env(f"OTEL_{signal}_EXPORTER").lower() != "none"


def _destination(settings: OtlpSettings) -> str:
    """Where a signal goes, for the start-up log line; no user:password or query of the URL."""
    if settings.protocol == otlp_settings.GRPC:
        scheme = "https" if settings.tls else "http"
        return f"-> OTLP {settings.protocol} {scheme}://{settings.destination}"
    return f"-> OTLP {settings.protocol} {settings.destination}"


def _exporter(signal: Signal, make: Callable[[OtlpSettings], Exporter]) -> Exporter | None:
    """The signal's exporter if its endpoint is set; None, after one error line, when a setting
    makes it unusable (an endpoint that is not one, a TLS file that cannot be read): that signal
    is then off, never sent somewhere else or with weaker trust, and the gateway still starts."""
    if not _endpoint_configured(signal):
        return None
    try:
        return make(otlp_settings.settings(os.environ, signal))
    except UnusableSettings as exc:
        log.error("telemetry: %s; %s are not exported", exc, signal.lower())
        return None


def service_resource() -> Any:
    """The resource from OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME, named authz-gateway by default."""
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource

    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    return resource


@dataclass
class Telemetry:
    tracer_provider: Any = None
    meter_provider: Any = None
    prometheus_reader: Any = None
    exporting: bool = False
    fast_path: bool = False  # whether gateway.telemetry.fast_path's hooks are in use
    extras: list[Any] = field(default_factory=list)
    # Shared by the OTLP exporters: once shutdown begins, each export ends within its timeout.
    shutdown_clock: ShutdownClock = field(default_factory=ShutdownClock)

    def shutdown(self) -> None:
        """Flush and stop: no span or metric point is lost at exit; a collector that is down
        delays it by at most the OTLP timeout (OTEL_EXPORTER_OTLP_TIMEOUT)."""
        self.shutdown_clock.begin()
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

    span_exporter = _exporter("TRACES", lambda found: OtlpSpanExporter(found, telemetry.shutdown_clock))
    if span_exporter is not None:
        # A "Queue full" warning per dropped span when the collector is down: quieted in both modes.
        fast_paths.quiet_queue_full_warnings()
        tracer_provider = TracerProvider(resource=resource)  # the sampler comes from OTEL_TRACES_SAMPLER
        processor = BatchSpanProcessor(span_exporter)
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
    metric_exporter = _exporter(
        "METRICS",
        lambda found: OtlpMetricExporter(
            found, telemetry.shutdown_clock, _env("OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE")
        ),
    )
    if metric_exporter is not None:
        readers.append(periodic_reader(metric_exporter))
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
        _destination(span_exporter.settings) if span_exporter is not None else "not exported",
        _destination(metric_exporter.settings) if metric_exporter is not None else "not pushed",
        ", served on /metrics" if metrics_http else "",
        "" if fast_path else ", fast path off (plain SDK)",
    )
    return telemetry
