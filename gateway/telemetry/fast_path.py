"""The telemetry fast paths: the only code that leans on OTel SDK internals.

Two measured speed-ups (bench/bench_telemetry.py), each relying on something the SDK
does not promise to keep:

1. The lean Check span (LeanSpans): the SDK's id generator and sampler decide as its
   Tracer.start_span would, and one finished ReadableSpan goes straight to the batch
   processor, without the SDK's general-purpose span object (locks, limits, validation).
2. The metric readers that add the per-check local instruments (local_metrics.py) to each
   collection: they override the readers' private `_receive_metrics`.

(The OTLP span encoding needs no hook: the exporter is the gateway's own,
gateway.telemetry.otlp_export, in both modes.) Plus one private logger name, set to ERROR in
both modes (quiet_queue_full_warnings).

With `telemetry.fast_path: false` neither is used: the SDK's own tracer and spans, plain
readers (the local instruments then record through SDK instruments of the same names).
HOOKS lists what each fast path relies on; missing_hooks() checks it against the installed
packages: setup_telemetry turns the fast path off, with a warning, when a hook it needs is
missing (a hook marked not required only costs speed or log noise), and
tests/test_telemetry_fast_path.py fails on any of them, naming the installed versions.
pyproject.toml pins the OTel packages to the minor versions checked.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.metrics.export import MetricsData
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.sdk.trace.sampling import Decision, Sampler
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, TraceFlags

from gateway.telemetry.local_metrics import with_local_metrics

PACKAGES = (
    "opentelemetry-api",
    "opentelemetry-sdk",
    "opentelemetry-exporter-prometheus",
)


def installed_versions() -> str:
    """The OTel packages the hooks depend on, as installed: for warnings and test failures."""
    found = []
    for package in PACKAGES:
        try:
            found.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            found.append(f"{package} (not installed)")
    return ", ".join(found)


# ---------------------------------------------------------------------------------------
# 1. The lean Check span.
#
# Relies on (checked by HOOKS):
#  - TracerProvider.sampler and TracerProvider.id_generator: the provider's sampler and id
#    generator as instance attributes (undocumented, not underscored);
#  - IdGenerator.is_trace_id_random() and TraceFlags.RANDOM_TRACE_ID / .random_trace_id, as
#    Tracer.start_span uses them to set the random-trace-id flag;
#  - ReadableSpan(...) accepting the finished span's fields as keywords (the SDK says users
#    should not build these), and the batch processor needing only on_end (its on_start and
#    private _on_ending do nothing; the lean path calls neither);
#  - the text of ParentBased(ALWAYS_ON).get_description(), to inline the default sampler
#    (without it the lean path still works, through sampler.should_sample, only slower).
# Not replicated: span limits, the private tracer configurator and the SDK's own span
# metrics (OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED). The Check span is far inside the
# default limits, but with OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT (or the SPAN_ variants) set,
# only the plain SDK span would truncate its values.
# ---------------------------------------------------------------------------------------

# The SDK's default sampler, ParentBased(ALWAYS_ON): its decision is simple enough to inline.
DEFAULT_SAMPLER = (
    "ParentBased{root:AlwaysOnSampler,remoteParentSampled:AlwaysOnSampler,remoteParentNotSampled:"
    "AlwaysOffSampler,localParentSampled:AlwaysOnSampler,localParentNotSampled:AlwaysOffSampler}"
)


class PendingCheckSpan(trace.NonRecordingSpan):
    """A Check span in flight on the lean path: its context (for child spans) and start."""

    def __init__(
        self,
        context: SpanContext,
        parent: SpanContext | None,
        start_ns: int,
        recording: bool,
        sampler_attributes: Mapping[str, Any] | None,
    ) -> None:
        super().__init__(context)
        self.parent = parent
        self.start_ns = start_ns
        self.recording = recording
        self.sampler_attributes = sampler_attributes

    def is_recording(self) -> bool:
        return self.recording


@dataclass(frozen=True, slots=True)
class LeanSpans:
    """The SDK parts the lean Check span uses, taken from the tracer provider by setup_telemetry."""

    processor: SpanProcessor
    sampler: Sampler
    id_generator: IdGenerator
    resource: Resource
    scope: InstrumentationScope
    default_sampling: bool

    @classmethod
    def of(cls, provider: Any, processor: SpanProcessor, resource: Resource, tracer_name: str) -> LeanSpans:
        """From an SDK TracerProvider and the span processor added to it."""
        sampler: Sampler = provider.sampler
        return cls(
            processor=processor,
            sampler=sampler,
            id_generator=provider.id_generator,
            resource=resource,
            # The scope provider.get_tracer(tracer_name) has: no version is "".
            scope=InstrumentationScope(tracer_name, ""),
            default_sampling=sampler.get_description() == DEFAULT_SAMPLER,
        )

    def start(self, name: str, parent: Context | None, start_ns: int) -> PendingCheckSpan:
        """What the SDK's Tracer.start_span decides for a SERVER span, without building its span object."""
        parent_context: SpanContext | None = trace.get_current_span(parent).get_span_context()
        if parent_context is None or not parent_context.is_valid:
            parent_context = None
            trace_id = self.id_generator.generate_trace_id()
            random_trace_id = self.id_generator.is_trace_id_random()
        else:
            trace_id = parent_context.trace_id
            random_trace_id = parent_context.trace_flags.random_trace_id
        if self.default_sampling:
            # ParentBased(ALWAYS_ON): sample a root, follow a parent's sampled flag, keep its state.
            sampled = parent_context is None or parent_context.trace_flags.sampled
            recording, trace_state, sampler_attributes = sampled, None, None
            if parent_context is not None:
                trace_state = parent_context.trace_state
        else:
            result = self.sampler.should_sample(parent, trace_id, name, SpanKind.SERVER)
            sampled = result.decision == Decision.RECORD_AND_SAMPLE
            recording = result.decision != Decision.DROP
            trace_state, sampler_attributes = result.trace_state, result.attributes
        flags = TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT
        if random_trace_id:
            flags |= TraceFlags.RANDOM_TRACE_ID
        context = SpanContext(
            trace_id,
            self.id_generator.generate_span_id(),
            is_remote=False,
            trace_flags=TraceFlags(flags),
            trace_state=trace_state,
        )
        return PendingCheckSpan(context, parent_context, start_ns, recording, sampler_attributes)

    def finish(
        self,
        span: PendingCheckSpan,
        name: str,
        attributes: dict[str, Any],
        events: Sequence[Event],
        status: Status,
        end_ns: int,
    ) -> None:
        """Hand the finished span to the processor, as the SDK's span.end() would."""
        if span.sampler_attributes:
            # As on the SDK's span: the sampler's attributes first, the span's own win.
            attributes = {**span.sampler_attributes, **attributes}
        self.processor.on_end(
            ReadableSpan(
                name=name,
                context=span.get_span_context(),
                parent=span.parent,
                resource=self.resource,
                attributes=attributes,
                events=events,
                kind=SpanKind.SERVER,
                status=status,
                start_time=span.start_ns,
                end_time=end_ns,
                instrumentation_scope=self.scope,
            )
        )


# Read on every Check by gateway.telemetry.tracing: None means the SDK's own tracer is used.
lean_spans: LeanSpans | None = None


def install_lean_spans(spans: LeanSpans | None) -> None:
    global lean_spans
    lean_spans = spans


# ---------------------------------------------------------------------------------------
# 3. Metric readers that add the local per-check instruments.
#
# Relies on (checked by HOOKS): MetricReader.collect() handing each collection to
# `self._receive_metrics(metrics_data, timeout_millis=..., **kwargs)`, which
# PeriodicExportingMetricReader (export over OTLP) and PrometheusMetricReader (the
# /metrics registry) implement. Renamed, the override is never called and authz_checks,
# authz_check_duration and authz_store_operation_duration silently vanish from both.
# ---------------------------------------------------------------------------------------


def metric_readers() -> tuple[type[Any], type[Any]]:
    """PeriodicExportingMetricReader and PrometheusMetricReader that add the local instruments."""
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

    class PeriodicReader(PeriodicExportingMetricReader):
        def _receive_metrics(
            self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
        ) -> None:
            merged = with_local_metrics(metrics_data)
            if merged is not None:
                super()._receive_metrics(merged, timeout_millis, **kwargs)

    class PrometheusReader(PrometheusMetricReader):
        def _receive_metrics(
            self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
        ) -> None:
            merged = with_local_metrics(metrics_data)
            if merged is not None:
                super()._receive_metrics(merged, timeout_millis, **kwargs)

    return PeriodicReader, PrometheusReader


# ---------------------------------------------------------------------------------------
# 4. The batch processor's "Queue full" warning (both modes).
#
# Relies on: the warning being logged by the logger of the private module
# opentelemetry.sdk._shared_internal. When the collector is down the span queue fills, and
# the SDK builds a warning record for every dropped span: per request, and costly. Renamed,
# setting the level does nothing and those warnings come back; nothing else changes.
# ---------------------------------------------------------------------------------------

QUEUE_FULL_LOGGER = "opentelemetry.sdk._shared_internal"


def quiet_queue_full_warnings() -> None:
    # Exporter failures are still logged (once per batch) by the exporter's own logger.
    logging.getLogger(QUEUE_FULL_LOGGER).setLevel(logging.ERROR)


# ---------------------------------------------------------------------------------------
# What the hooks rely on, checked against the installed packages.
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hook:
    """One thing a fast path relies on; `check` returns what is wrong, or None."""

    name: str
    check: Callable[[], str | None]
    # False: losing it costs speed or log noise, not correctness; the fast path stays on.
    required: bool = True


def _load(path: str) -> Any:
    module, _, attribute = path.rpartition(".")
    return getattr(importlib.import_module(module), attribute)


def _method(
    owner: str, name: str, parameters: tuple[str, ...], var_keyword: bool = False, concrete: bool = True
) -> Hook:
    """`owner.name` is a method whose parameters are named `parameters` (in order), implemented
    there or in a base class (`concrete`), or at least declared (an abstract method)."""
    label = f"{owner.rpartition('.')[2]}.{name}"

    def check() -> str | None:
        try:
            cls = _load(owner)
        except (ImportError, AttributeError) as exc:
            return f"{owner} cannot be imported ({exc})"
        method = inspect.getattr_static(cls, name, None)
        if method is None or not callable(method):
            return f"{label} is gone (from {owner})"
        if concrete and getattr(method, "__isabstractmethod__", False):
            return f"{label} is gone: only an abstract declaration is left (in {owner}'s bases)"
        signature = inspect.signature(method)
        kinds = [p.kind for p in signature.parameters.values()]
        named = tuple(p.name for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD)
        if named != parameters or var_keyword != (inspect.Parameter.VAR_KEYWORD in kinds):
            expected = ", ".join((*parameters, "**kwargs") if var_keyword else parameters)
            return f"{label}{signature} no longer takes ({expected})"
        return None

    return Hook(label, check)


def _provider_attributes() -> str | None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON

    # Sampler and resource given: nothing read from OTEL_* variables, nothing logged twice.
    provider = TracerProvider(sampler=ALWAYS_ON, resource=Resource.get_empty(), shutdown_on_exit=False)
    sampler = getattr(provider, "sampler", None)
    id_generator = getattr(provider, "id_generator", None)
    if not isinstance(sampler, Sampler):
        return f"TracerProvider().sampler is {type(sampler).__name__}, not a Sampler"
    if not isinstance(id_generator, IdGenerator):
        return f"TracerProvider().id_generator is {type(id_generator).__name__}, not an IdGenerator"
    return None


def _random_trace_id_flag() -> str | None:
    if not hasattr(TraceFlags, "RANDOM_TRACE_ID"):
        return "TraceFlags.RANDOM_TRACE_ID is gone"
    if not isinstance(inspect.getattr_static(TraceFlags, "random_trace_id", None), property):
        return "TraceFlags.random_trace_id is not a property"
    if not callable(getattr(IdGenerator, "is_trace_id_random", None)):
        return "IdGenerator.is_trace_id_random is gone"
    return None


_READABLE_SPAN_FIELDS = (
    "name", "context", "parent", "resource", "attributes", "events", "kind", "status",
    "start_time", "end_time", "instrumentation_scope",
)


def _readable_span_fields() -> str | None:
    parameters = inspect.signature(ReadableSpan.__init__).parameters
    missing = [name for name in _READABLE_SPAN_FIELDS if name not in parameters]
    return f"ReadableSpan() takes no {', '.join(missing)}" if missing else None


def _default_sampler_description() -> str | None:
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased

    found: str = ParentBased(ALWAYS_ON).get_description()  # type: ignore[no-untyped-call]
    return None if found == DEFAULT_SAMPLER else f"ParentBased(ALWAYS_ON) is now described as {found!r}"


def _queue_full_logger() -> str | None:
    if importlib.util.find_spec(QUEUE_FULL_LOGGER) is None:
        return f"no module {QUEUE_FULL_LOGGER} (its logger warns of a full span queue)"
    return None


HOOKS: tuple[Hook, ...] = (
    # 1. The lean Check span.
    Hook("TracerProvider.sampler / .id_generator", _provider_attributes),
    Hook("TraceFlags.RANDOM_TRACE_ID / IdGenerator.is_trace_id_random", _random_trace_id_flag),
    Hook("ReadableSpan(...) keywords", _readable_span_fields),
    Hook("ParentBased(ALWAYS_ON).get_description()", _default_sampler_description, required=False),
    # 3. The metric readers.
    _method(  # what MetricReader.collect() calls
        "opentelemetry.sdk.metrics.export.MetricReader",
        "_receive_metrics",
        ("self", "metrics_data", "timeout_millis"),
        var_keyword=True,
        concrete=False,
    ),
    _method(
        "opentelemetry.sdk.metrics.export.PeriodicExportingMetricReader",
        "_receive_metrics",
        ("self", "metrics_data", "timeout_millis"),
        var_keyword=True,
    ),
    _method(
        "opentelemetry.exporter.prometheus.PrometheusMetricReader",
        "_receive_metrics",
        ("self", "metrics_data", "timeout_millis"),
        var_keyword=True,
    ),
    # 4. The queue-full logger.
    Hook("logger " + QUEUE_FULL_LOGGER, _queue_full_logger, required=False),
)


def hook_problem(hook: Hook) -> str | None:
    try:
        return hook.check()
    except Exception as exc:  # a check that cannot even run is a missing hook too
        return f"{hook.name}: checking it failed ({type(exc).__name__}: {exc})"


def missing_hooks(required_only: bool = False) -> list[str]:
    """What the installed OTel packages no longer provide, one line per hook; [] when all is there."""
    problems = []
    for hook in HOOKS:
        if required_only and not hook.required:
            continue
        problem = hook_problem(hook)
        if problem is not None:
            problems.append(problem)
    return problems
