"""The telemetry fast paths (gateway/telemetry/fast_path.py) against the installed OTel SDK.

- Every private hook the fast paths rely on is there, with the expected signature; if not,
  the test fails naming the installed versions (and the gateway itself would fall back to
  the plain SDK with a warning).
- Each hook is really used: the readers hand over the local per-check instruments. (The span
  encoding needs no hook: the OTLP exporters are the gateway's own, tests/test_telemetry_otlp_export.py.)
- `telemetry.fast_path: false` gives the same spans and the same metrics, through the plain
  SDK: compared here in-process, and end to end by the other telemetry test files, which
  run their gateways both ways with TelemetryGateway (MODES).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Metric,
    MetricExporter,
    MetricExportResult,
    MetricsData,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.sdk.trace.sampling import Decision as SamplingDecision
from opentelemetry.sdk.trace.sampling import ParentBasedTraceIdRatio, Sampler, SamplingResult
from opentelemetry.trace import SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from gateway.config import ConfigError, config_from_mapping
from gateway.decision import AuditDeny, Decision, Mismatch
from gateway.mcp import McpCall
from gateway.request import RequestContext
from gateway.telemetry import fast_path, local_metrics
from gateway.telemetry.fast_path import HOOKS, Hook, LeanSpans, hook_problem, installed_versions
from gateway.telemetry.local_metrics import LocalCounter, LocalHistogram
from gateway.telemetry.otlp_encoding import SpanEncoder
from gateway.telemetry.tracing import TRACER_NAME, CheckSpans, SubjectHasher
from tests.support.issuer import TestIssuer
from tests.support.otlp import OtlpReceiver
from tests.support.processes import REPO, GatewayProcess, wait_until

# ---------------------------------------------------------------------------------------
# Running a real gateway process one way or the other (used by the other telemetry tests).
# ---------------------------------------------------------------------------------------

MODES = [pytest.param(True, id="fast"), pytest.param(False, id="plain")]

class TelemetryGateway(GatewayProcess):
    """A GatewayProcess with `telemetry.fast_path` set, that checks it took that path.

    With telemetry on, the start-up line says "fast path off" exactly when the plain SDK is
    used; a fast-path gateway whose SDK lacks a hook says so too, and fails here.
    """

    def __init__(self, config: dict[str, Any], work_dir: Path, *, fast_path: bool, **kwargs: Any) -> None:
        self.fast_path = fast_path
        telemetry = {**config.get("telemetry", {}), "fast_path": fast_path}
        super().__init__({**config, "telemetry": telemetry}, work_dir, **kwargs)
        if kwargs.get("wait", True) and kwargs.get("env", {}).get("OTEL_SDK_DISABLED") == "false":
            self.assert_path()

    def assert_path(self) -> None:
        line = wait_until(
            lambda: next((ln for ln in self.log_text().splitlines() if "telemetry: " in ln), None),
            what="the telemetry start-up line",
        )
        assert ("fast path off" in line) == (not self.fast_path), line


# ---------------------------------------------------------------------------------------
# The hooks are there.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("hook", HOOKS, ids=[hook.name for hook in HOOKS])
def test_private_hook_is_there(hook: Hook) -> None:
    problem = hook_problem(hook)
    assert problem is None, (
        f"the installed OTel packages ({installed_versions()}) break a fast-path hook: {problem}. "
        "Adapt gateway/telemetry/fast_path.py (or run with telemetry.fast_path: false) before "
        "moving the OTel pins in pyproject.toml."
    )


def _hook(name: str) -> Hook:
    return next(hook for hook in HOOKS if hook.name == name)


def test_hook_checks_notice_a_rename_or_a_new_signature(monkeypatch: pytest.MonkeyPatch) -> None:
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.trace.sampling import ParentBased

    periodic = _hook("PeriodicExportingMetricReader._receive_metrics")
    prometheus = _hook("PrometheusMetricReader._receive_metrics")
    description = _hook("ParentBased(ALWAYS_ON).get_description()")
    assert hook_problem(periodic) is None and hook_problem(prometheus) is None
    monkeypatch.delattr(PeriodicExportingMetricReader, "_receive_metrics")
    assert "gone" in str(hook_problem(periodic))

    def receive(self: Any, metrics_data: Any, deadline: float = 0) -> None: ...

    monkeypatch.setattr(PrometheusMetricReader, "_receive_metrics", receive)
    assert "no longer takes" in str(hook_problem(prometheus))
    monkeypatch.setattr(ParentBased, "get_description", lambda self: "ParentBased{something else}")
    assert "described as" in str(hook_problem(description))
    assert len(fast_path.missing_hooks()) == 3
    assert len(fast_path.missing_hooks(required_only=True)) == 2  # the description costs speed only


# ---------------------------------------------------------------------------------------
# The hooks are used.
# ---------------------------------------------------------------------------------------


class Collect(SpanExporter):
    def __init__(self) -> None:
        self.spans: list[ReadableSpan] = []

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.spans.extend(spans)
        return SpanExportResult.SUCCESS


class CountingIds(IdGenerator):
    """Ids in sequence, so that the lean and the plain path give the same ones."""

    def __init__(self) -> None:
        self.count = 0

    def generate_span_id(self) -> int:
        self.count += 1
        return self.count

    def generate_trace_id(self) -> int:
        self.count += 1
        return (0x5EED << 64) | (self.count * 0x9E3779B97F4A7C15 % 2**64)

    def is_trace_id_random(self) -> bool:
        return True


RESOURCE = Resource.create({"service.name": "fast-path-test"})


class CollectMetrics(MetricExporter):
    def __init__(self) -> None:
        super().__init__(preferred_temporality={}, preferred_aggregation={})
        self.exports: list[MetricsData] = []

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        self.exports.append(metrics_data)
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        return None


@pytest.fixture
def local_instruments() -> Iterator[tuple[LocalCounter, LocalHistogram]]:
    counter = LocalCounter("fp_checks", "1", "Checks, by decision")
    histogram = LocalHistogram("fp_check_duration", "s", "Time per check", (0.001, 0.01, 0.1))
    try:
        yield counter, histogram
    finally:
        local_metrics.disable()
        local_metrics.record_through(None)
        local_metrics._instruments.remove(counter)
        local_metrics._instruments.remove(histogram)


def _record(counter: LocalCounter, histogram: LocalHistogram) -> None:
    for n in range(50):
        decision = "allow" if n % 3 else "deny"
        reason = "allowed" if n % 3 else "token_missing"
        counter.add(1, {"decision": decision, "reason": reason, "policy": ""})
        histogram.record(0.0004 * (n % 7) + 0.02 * (n % 11 == 0), {"decision": decision})


def _metrics_both_ways(fast: bool) -> tuple[dict[str, Any], str]:
    """What an OTLP export and a Prometheus scrape show after _record, one way or the other."""
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from prometheus_client import REGISTRY, generate_latest

    periodic, prometheus = (
        fast_path.metric_readers() if fast else (PeriodicExportingMetricReader, PrometheusMetricReader)
    )
    exporter = CollectMetrics()
    otlp_reader = periodic(exporter, export_interval_millis=3_600_000)
    scrape_reader = prometheus()
    provider = MeterProvider(resource=RESOURCE, metric_readers=[otlp_reader, scrape_reader])
    try:
        # An SDK instrument beside them, as the gateway always has (policy reloads).
        provider.get_meter(local_metrics.SCOPE.name).create_counter("fp_reloads").add(1)
        if fast:
            local_metrics.enable(RESOURCE)
        else:
            local_metrics.record_through(provider.get_meter(local_metrics.SCOPE.name))
        counter, histogram = (i for i in local_metrics._instruments if i.name.startswith("fp_check"))
        _record(counter, histogram)  # type: ignore[arg-type]
        provider.force_flush()
        scraped = generate_latest(REGISTRY).decode()
    finally:
        provider.shutdown()
    found: dict[str, Any] = {}
    for export in exporter.exports:
        for resource_metrics in export.resource_metrics:
            for scope in resource_metrics.scope_metrics:
                for metric in scope.metrics:
                    if metric.name.startswith("fp_"):
                        found[metric.name] = (scope.scope.name, _shape(metric))
    lines = sorted(line for line in scraped.splitlines() if line.startswith("fp_") or " fp_" in line)
    return found, "\n".join(lines)


def _shape(metric: Metric) -> dict[str, Any]:
    data = metric.data
    points = {}
    for point in data.data_points:
        key = tuple(sorted(point.attributes.items()))
        if hasattr(point, "bucket_counts"):
            points[key] = (
                point.count, round(point.sum, 9), tuple(point.bucket_counts), tuple(point.explicit_bounds),
                point.min, point.max,
            )
        else:
            points[key] = point.value
    return {
        "unit": metric.unit,
        "description": metric.description,
        "type": type(data).__name__,
        "monotonic": getattr(data, "is_monotonic", None),
        "temporality": data.aggregation_temporality,
        "points": points,
    }


def test_readers_hand_over_the_local_instruments_and_both_ways_agree(
    local_instruments: tuple[LocalCounter, LocalHistogram],
) -> None:
    fast_export, fast_scrape = _metrics_both_ways(fast=True)
    assert {"fp_checks", "fp_check_duration", "fp_reloads"} <= set(fast_export), (
        f"the metric readers of {installed_versions()} no longer call _receive_metrics: "
        f"the per-check instruments are missing from the OTLP export ({sorted(fast_export)})"
    )
    assert "fp_checks_total{" in fast_scrape and "fp_check_duration_seconds_bucket{" in fast_scrape, (
        f"the Prometheus reader of {installed_versions()} no longer calls _receive_metrics"
    )
    plain_export, plain_scrape = _metrics_both_ways(fast=False)
    assert plain_export == fast_export
    assert plain_scrape == fast_scrape
    assert fast_export["fp_checks"][0] == "authz-gateway"
    assert fast_export["fp_checks"][1]["temporality"] == AggregationTemporality.CUMULATIVE
    assert fast_export["fp_check_duration"][1]["points"][(("decision", "allow"),)][3] == (0.001, 0.01, 0.1)


# ---------------------------------------------------------------------------------------
# The same spans both ways, in-process.
# ---------------------------------------------------------------------------------------


class AttributingSampler(Sampler):
    """Drops, records only or samples, by trace id; adds attributes (one the span overrides) and state."""

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Any = None,
        links: Any = None,
        trace_state: Any = None,
    ) -> SamplingResult:
        from opentelemetry.trace import TraceState

        if trace_id % 3 == 0:
            return SamplingResult(SamplingDecision.DROP)
        decision = SamplingDecision.RECORD_ONLY if trace_id % 3 == 1 else SamplingDecision.RECORD_AND_SAMPLE
        attributes = {"sampler.rule": "thirds", "authz.decision": "?"}
        return SamplingResult(decision, attributes, TraceState([("s", str(trace_id % 10))]))

    def get_description(self) -> str:
        return "AttributingSampler"


def _parent(traceparent: str, tracestate: str | None = None) -> Context:
    carrier = {"traceparent": traceparent, **({"tracestate": tracestate} if tracestate else {})}
    return TraceContextTextMapPropagator().extract(carrier)


def _checks(checks: CheckSpans, tracer: trace.Tracer) -> None:
    """A spread of Check spans: every attribute, event and status kind, parents, a child span."""
    calls = (McpCall("tools/call", "get_weather"),)
    post = RequestContext(method="POST", path="/mcp/ü", headers={}, parsed_mcp=calls)
    get = RequestContext(method="GET", path="/mcp", headers={})
    sampled = _parent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "envoy=1,b=two")
    unsampled = _parent("00-0af7651916cd43dd8448eb211c80319d-b7ad6b7169203332-00")
    checks.record(Decision(True, "allowed", session_new=True), post, sampled, 1_000, 2_000)
    checks.record(Decision(True, "allowed"), post, unsampled, 1_500, 2_500)
    checks.record(
        Decision(False, "subject_mismatch", 404, "mcp-session-binding", "same-subject",
                 mismatch=Mismatch("sub", "alice", "mallory")),
        post, None, 3_000, 4_000,
    )
    checks.record(
        Decision(False, "issuer_mismatch", 404, "p", "same-issuer", mismatch=Mismatch("iss", "https://a", "https://b")),
        get, None, 3_100, 4_100,
    )
    audit = (AuditDeny("audit-example", "no-audit-header", "audit_example", 403),)
    checks.record(Decision(True, "allowed", audit_denies=audit), get, sampled, 5_000, 6_000)
    checks.record(Decision(False, "token_missing", 401), get, None, 7_000, 8_000)
    checks.record(Decision(False, "policy_error", 403, "broken", "r", error="no such key"), post, None, 9, 10)
    checks.record(Decision(False, "store_unavailable", 503, error="timeout"), post, None, 11, 12)
    checks.record(Decision(False, "internal_error", 500), None, None, 13, 14, error=ValueError("boom"))
    # A span made current, with an I/O child span (a JWKS fetch, a store round trip) under it.
    span = checks.start(sampled, 20_000)
    token = checks.enter(span)
    try:
        tracer.start_span("jwks.fetch", kind=SpanKind.CLIENT, start_time=20_100).end(end_time=20_200)
    finally:
        checks.leave(token)
    checks.finish(span, Decision(True, "allowed"), get, 21_000)


def _spans(lean: bool, sampler: Sampler | None) -> list[ReadableSpan]:
    collected = Collect()
    provider = TracerProvider(
        resource=RESOURCE, sampler=sampler, id_generator=CountingIds(), shutdown_on_exit=False
    )
    processor = SimpleSpanProcessor(collected)
    provider.add_span_processor(processor)
    tracer = provider.get_tracer(TRACER_NAME)
    if lean:
        fast_path.install_lean_spans(LeanSpans.of(provider, processor, RESOURCE, TRACER_NAME))
    try:
        _checks(CheckSpans(SubjectHasher(False, "k"), tracer), tracer)
    finally:
        fast_path.install_lean_spans(None)
    return collected.spans


@pytest.mark.parametrize(
    "sampler",
    [None, ParentBasedTraceIdRatio(0.5), AttributingSampler()],
    ids=["default-sampler", "ratio-sampler", "attributing-sampler"],
)
def test_lean_and_plain_spans_are_the_same(sampler: Sampler | None) -> None:
    lean, plain = _spans(True, sampler), _spans(False, sampler)
    assert len(plain) >= 3
    if isinstance(sampler, AttributingSampler):
        checks = [s for s in lean if s.name != "jwks.fetch"]
        assert checks and all(s.attributes["sampler.rule"] == "thirds" for s in checks)
        assert all(s.attributes["authz.decision"] in ("allow", "deny") for s in checks)
    assert [s.name for s in lean] == [s.name for s in plain]
    for one, other in zip(lean, plain, strict=True):
        assert one.get_span_context() == other.get_span_context()
        assert one.parent == other.parent
        assert dict(one.attributes or {}) == dict(other.attributes or {})
        assert list(one.attributes or {}) == list(other.attributes or {})
        assert [(e.name, dict(e.attributes or {}), e.timestamp) for e in one.events] == [
            (e.name, dict(e.attributes or {}), e.timestamp) for e in other.events
        ]
        assert (one.status.status_code, one.status.description) == (
            other.status.status_code, other.status.description
        )
        assert (one.kind, one.start_time, one.end_time) == (other.kind, other.start_time, other.end_time)
        assert one.instrumentation_scope == other.instrumentation_scope
        assert one.resource == other.resource
    # What goes over the wire: the SDK's own encoding of both, and the gateway's encoder's.
    assert encode_spans(lean) == encode_spans(plain)
    assert SpanEncoder().request(lean) == SpanEncoder().request(plain)


def test_default_sampler_decisions_match_the_sdk() -> None:
    """The inlined ParentBased(ALWAYS_ON): what is dropped, and the ids, as the SDK decides."""
    lean = _spans(True, None)
    assert "/mcp/ü" in {s.attributes.get("url.path") for s in lean}
    assert not [s for s in lean if s.get_span_context().trace_id == 0x0AF7651916CD43DD8448EB211C80319D]
    child = next(s for s in lean if s.name == "jwks.fetch")
    parent = next(s for s in lean if s.get_span_context().span_id == child.parent.span_id)
    assert parent.attributes["authz.decision"] == "allow"
    assert parent.get_span_context().trace_state.get("envoy") == "1"


# ---------------------------------------------------------------------------------------
# setup_telemetry, one way and the other (a process of its own: the providers are global).
# ---------------------------------------------------------------------------------------

_SETUP = """
import json, sys
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.trace import TracerProvider
from gateway.telemetry import fast_path, local_metrics, setup

# What setup_telemetry hands to the SDK, seen through its public constructors.
readers, processors = [], []
_meter_provider_init, _add_span_processor = MeterProvider.__init__, TracerProvider.add_span_processor

def meter_provider_init(self, *args, metric_readers=(), **kwargs):
    readers.extend(metric_readers)
    _meter_provider_init(self, *args, metric_readers=metric_readers, **kwargs)

def add_span_processor(self, processor):
    processors.append(processor)
    _add_span_processor(self, processor)

MeterProvider.__init__, TracerProvider.add_span_processor = meter_provider_init, add_span_processor
if sys.argv[2] == "missing-hook":
    fast_path.HOOKS = (fast_path.Hook("SomeReader._gone", lambda: "SomeReader._gone is gone"),)
telemetry = setup.setup_telemetry(metrics_http=True, fast_path=sys.argv[1] == "fast")
state = local_metrics._state
print(json.dumps({
    "fast_path": telemetry.fast_path,
    "lean_spans": fast_path.lean_spans is not None,
    "exporter": type(processors[0].span_exporter).__name__,
    "readers": sorted(type(reader).__name__ for reader in readers),
    "local_instruments": "local" if state.enabled else "sdk" if state.meter else "off",
}))
telemetry.shutdown()
"""


_FAST = {
    "fast_path": True,
    "lean_spans": True,
    "exporter": "OtlpSpanExporter",
    "readers": ["PeriodicReader", "PrometheusReader"],
    "local_instruments": "local",
}
_PLAIN = {
    "fast_path": False,
    "lean_spans": False,
    "exporter": "OtlpSpanExporter",
    "readers": ["PeriodicExportingMetricReader", "PrometheusMetricReader"],
    "local_instruments": "sdk",
}


@pytest.mark.parametrize("mode", ["fast", "plain"])
@pytest.mark.parametrize("hooks", ["all-hooks", "missing-hook"])
def test_setup_wires_each_mode(mode: str, hooks: str) -> None:
    env = {
        "OTEL_SDK_DISABLED": "false",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9",  # nothing is sent: shut down at once
        "OTEL_METRIC_EXPORT_INTERVAL": "3600000",
    }
    done = subprocess.run(
        [sys.executable, "-c", _SETUP, mode, hooks],
        env={**os.environ, **env}, cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    expected = _FAST if mode == "fast" and hooks == "all-hooks" else _PLAIN
    assert json.loads(done.stdout.splitlines()[-1]) == expected
    # A fast path asked for but not possible: one warning naming the versions and what is missing.
    warned = "fast path off, the plain SDK is used instead" in done.stderr
    assert warned == (mode == "fast" and hooks == "missing-hook"), done.stderr
    if warned:
        assert "opentelemetry-sdk 1." in done.stderr and "SomeReader._gone is gone" in done.stderr


# ---------------------------------------------------------------------------------------
# The config key.
# ---------------------------------------------------------------------------------------


def test_config_key() -> None:
    assert config_from_mapping({}).telemetry.fast_path is True
    assert config_from_mapping({"telemetry": {"fast_path": False}}).telemetry.fast_path is False
    with pytest.raises(ConfigError, match=r"telemetry\.fast_path: must be true or false"):
        config_from_mapping({"telemetry": {"fast_path": "off"}}, "conf.yaml")


def test_plain_gateway_process(tmp_path: Path, issuer: TestIssuer) -> None:
    """TelemetryGateway really starts a gateway on the plain path (its start-up line says so)."""
    receiver = OtlpReceiver()
    jwks_file = issuer.write_jwks(tmp_path / "jwks.json")
    config = {"auth": {"issuers": [issuer.issuer_config(jwks_file=jwks_file)]}}
    gateway = TelemetryGateway(config, tmp_path, fast_path=False, env=receiver.exporter_env("grpc"))
    try:
        assert "fast path off (plain SDK)" in gateway.log_text()
    finally:
        gateway.stop()
        receiver.stop()

