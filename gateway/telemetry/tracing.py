"""One SERVER span per Check, named and attributed as DESIGN.md §5 says.

The span starts at the measured start time, once the request is parsed, with its parent
taken from the W3C trace context in the gRPC call metadata (Envoy's ext_authz egress
span), else from the request headers inside the CheckRequest, else none (a new root).
While the decision runs the span is the current one, so the only child spans, those of
real I/O (a JWKS fetch, a store round trip), nest under it. A span that does not record
(no exporter, or sampled out) costs no attribute building at all.

When setup_telemetry installed the SDK with its fast path on (the default), the Check
span takes the lean path of gateway.telemetry.fast_path: its ids and sampling decision come
from the provider's own id generator and sampler, and at the end one finished ReadableSpan
goes straight to the batch processor. The SDK's general-purpose span object (locks, limits,
validation per attribute) cost more than the check itself; the exported span is the same.
With `telemetry.fast_path: false` the span is the SDK tracer's own.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import Event
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from gateway.decision import Decision
from gateway.request import RequestContext, redact_secrets
from gateway.telemetry import fast_path
from gateway.telemetry.fast_path import PendingCheckSpan

SPAN_NAME = "envoy.service.auth.v3.Authorization/Check"
# One per ext_proc stream (gateway/extproc.py), built the same way as the Check span.
PROCESS_SPAN_NAME = "envoy.service.ext_proc.v3.ExternalProcessor/Process"
TRACER_NAME = "authz-gateway"
_propagator = TraceContextTextMapPropagator()
_TRACE_KEYS = ("traceparent", "tracestate")
# W3C traceparent, version 00, exactly as the propagator accepts it (it also takes other forms).
_TRACEPARENT_00 = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_ERROR_REASONS = frozenset({"policy_error", "store_unavailable", "internal_error"})
_UNSET = Status(StatusCode.UNSET)
# For the exception event of an error that the pipeline turned into a deny: what failed.
_ERROR_TYPES = {
    "policy_error": "gateway.policy.evaluate.PolicyFailure",
    "store_unavailable": "gateway.session.store.StoreUnavailable",
    "internal_error": "InternalError",
}


def parent_from(
    metadata: Iterable[tuple[str, Any]] | None, headers: Mapping[str, str] | None
) -> Context | None:
    carrier: dict[str, str] = {}
    if metadata:
        for key, value in metadata:
            if key in _TRACE_KEYS and isinstance(value, str):
                carrier[key] = value
    if "traceparent" not in carrier and headers:
        for key in _TRACE_KEYS:
            if key in headers:
                carrier[key] = headers[key]
    if "traceparent" not in carrier:
        return None
    if "tracestate" not in carrier:
        fast = _version_00_parent(carrier["traceparent"])
        if fast is not None:
            return fast
    return _propagator.extract(carrier)


def _version_00_parent(traceparent: str) -> Context | None:
    """The common case (what Envoy sends) without the general propagator's work; None: use it."""
    match = _TRACEPARENT_00.fullmatch(traceparent)
    if match is None:
        return None
    trace_id, span_id = int(match.group(1), 16), int(match.group(2), 16)
    if not trace_id or not span_id:
        return None  # invalid ids: the propagator decides (it ignores them)
    flags = TraceFlags(int(match.group(3), 16))
    return trace.set_span_in_context(trace.NonRecordingSpan(SpanContext(trace_id, span_id, True, flags)))


def request_line(request: Any) -> RequestContext | None:
    """Method and path of a CheckRequest that failed validation, so its span still says what it was.

    Headers are left out: they are what failed, and they may hold the token.
    """
    try:
        http = request.attributes.request.http
    except AttributeError:
        return None
    if not http.method:
        return None
    return RequestContext(method=str(http.method).upper(), path=str(http.path).partition("?")[0], headers={})


class SubjectHasher:
    """Subjects in telemetry are keyed hashes unless record_subject is on: correlatable, not readable."""

    def __init__(self, record_subject: bool, key: str | None) -> None:
        self._record = record_subject
        self._key = (key or "").encode() or os.urandom(32)

    def __call__(self, value: Any) -> str:
        text = "" if value is None else str(value)
        if self._record:
            return text
        return self.keyed(text)

    def keyed(self, text: str) -> str:
        """The keyed hash whatever record_subject says: for what is never shown (handles)."""
        return "hmac-sha256:" + hmac.new(self._key, text.encode(), hashlib.sha256).hexdigest()[:32]


def decision_attributes(outcome: Decision, context: RequestContext | None) -> dict[str, Any]:
    """Every attribute of DESIGN.md §5 that applies to this decision."""
    attributes: dict[str, Any] = {
        "authz.decision": "allow" if outcome.allowed else "deny",
        "authz.reason": outcome.reason,
        "authz.session.new": outcome.session_new,
    }
    if outcome.policy:
        attributes["authz.policy"] = outcome.policy
    if outcome.rule:
        attributes["authz.rule"] = outcome.rule
    if not outcome.allowed:
        attributes["http.response.status_code"] = outcome.status
    if context is not None:
        attributes["http.request.method"] = context.method
        attributes["url.path"] = context.path
        call = context.mcp_for_telemetry()
        if call.method:
            attributes["mcp.method.name"] = call.method
            if call.method == "tools/call" and call.name:
                attributes["gen_ai.tool.name"] = call.name
    if outcome.mismatch is not None:
        attributes["authz.mismatch.claim"] = outcome.mismatch.claim
    if outcome.dpop_failure:
        attributes["authz.dpop.failure"] = outcome.dpop_failure  # the check's name, never the proof
    if outcome.handle_kind:
        attributes["authz.handle.kind"] = outcome.handle_kind
        attributes["authz.handle.new"] = outcome.handle_new
    return attributes


class CheckSpans:
    def __init__(
        self, hasher: SubjectHasher, tracer: trace.Tracer | None = None, name: str = SPAN_NAME
    ) -> None:
        self._tracer = tracer or trace.get_tracer(TRACER_NAME)
        self._hash = hasher
        self._name = name

    @staticmethod
    def active() -> bool:
        """Whether anything would record a span: the lean path, or another SDK provider."""
        return fast_path.lean_spans is not None or not isinstance(
            trace.get_tracer_provider(), trace.ProxyTracerProvider
        )

    def start(self, parent: Context | None, start_ns: int) -> trace.Span:
        lean = fast_path.lean_spans
        if lean is None:
            return self._tracer.start_span(
                self._name, context=parent, kind=SpanKind.SERVER, start_time=start_ns
            )
        return lean.start(self._name, parent, start_ns)

    @staticmethod
    def enter(span: trace.Span) -> object | None:
        """Make the span current for the decision's I/O child spans; None when it records nothing."""
        if not span.is_recording():
            return None
        return otel_context.attach(trace.set_span_in_context(span))

    @staticmethod
    def leave(token: object | None) -> None:
        if token is not None:
            otel_context.detach(token)  # type: ignore[arg-type]

    def _events(
        self, outcome: Decision, context: RequestContext | None, end_ns: int, error: BaseException | None
    ) -> tuple[list[Event], Status]:
        """The span's events (binding mismatch, audit denies, exception) and its status."""
        events = []
        attributes: dict[str, Any]
        mismatch = outcome.mismatch
        if mismatch is not None:
            bound, presented = mismatch.bound, mismatch.presented
            if mismatch.claim != "iss":  # the issuer is public; anything else may identify a person
                bound, presented = self._hash(bound), self._hash(presented)
            attributes = {
                "authz.mismatch.claim": mismatch.claim,
                "authz.bound": str(bound),
                "authz.presented": str(presented),
            }
            if outcome.handle_kind:
                attributes["authz.handle.kind"] = outcome.handle_kind
            events.append(Event("authz.binding_mismatch", attributes, end_ns))
        for audited in outcome.audit_denies:
            attributes = {
                "authz.policy": audited.policy,
                "authz.rule": audited.rule,
                "authz.reason": audited.reason,
                "http.response.status_code": audited.status,
            }
            events.append(Event("authz.audit_deny", attributes, end_ns))
        status = _UNSET
        if error is not None:
            events.append(Event("exception", _exception_attributes(error, context), end_ns))
            status = Status(StatusCode.ERROR, outcome.error or type(error).__name__)
        elif outcome.reason in _ERROR_REASONS:
            # The pipeline caught the exception and kept its (scrubbed) message: record it as one.
            message = outcome.error or outcome.reason
            attributes = {"exception.type": _ERROR_TYPES[outcome.reason], "exception.message": message}
            events.append(Event("exception", attributes, end_ns))
            status = Status(StatusCode.ERROR, message)
        return events, status

    def finish(
        self,
        span: trace.Span,
        outcome: Decision,
        context: RequestContext | None,
        end_ns: int,
        error: BaseException | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> trace.Span:
        if not span.is_recording():
            return span
        attributes = decision_attributes(outcome, context)
        if outcome.handle_id:
            # A keyed hash even with record_subject: a handle is a credential to its state, never shown.
            attributes["authz.handle.id"] = self._hash.keyed(outcome.handle_id)
        if extra:
            attributes.update(extra)
        events, status = self._events(outcome, context, end_ns, error)
        if isinstance(span, PendingCheckSpan):
            lean = fast_path.lean_spans
            if lean is not None:  # else telemetry was shut down while this check ran
                lean.finish(span, self._name, attributes, events, status, end_ns)
            return span
        span.set_attributes(attributes)
        for event in events:
            span.add_event(event.name, event.attributes, timestamp=event.timestamp)
        if status is not _UNSET:
            span.set_status(status)
        span.end(end_time=end_ns)
        return span

    def record(
        self,
        outcome: Decision,
        context: RequestContext | None,
        parent: Context | None,
        start_ns: int,
        end_ns: int,
        error: BaseException | None = None,
    ) -> trace.Span:
        """Start and finish in one go, for a check whose decision is already known."""
        return self.finish(self.start(parent, start_ns), outcome, context, end_ns, error)


def _exception_attributes(error: BaseException, context: RequestContext | None) -> dict[str, Any]:
    kind = type(error)
    return {
        "exception.type": f"{kind.__module__}.{kind.__qualname__}",
        "exception.message": redact_secrets(str(error), context),
    }
