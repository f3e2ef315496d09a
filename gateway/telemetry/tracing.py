"""One SERVER span per Check, named and attributed as DESIGN.md §5 says.

The span starts at the measured start time, once the request is parsed, with its parent
taken from the W3C trace context in the gRPC call metadata (Envoy's ext_authz egress
span), else from the request headers inside the CheckRequest, else none (a new root).
While the decision runs the span is the current one, so the only child spans, those of
real I/O (a JWKS fetch, a store round trip), nest under it. The decision's attributes
are set in one call at the end. A span that does not record (no exporter, or sampled
out) costs no attribute building at all.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterable, Mapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from gateway.decision import Decision
from gateway.request import RequestContext

SPAN_NAME = "envoy.service.auth.v3.Authorization/Check"
_propagator = TraceContextTextMapPropagator()
_TRACE_KEYS = ("traceparent", "tracestate")
_ERROR_REASONS = frozenset({"policy_error", "store_unavailable", "internal_error"})
# For the exception event of an error that check.py turned into a deny: what failed.
_ERROR_TYPES = {
    "policy_error": "gateway.policy.PolicyFailure",
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
    return _propagator.extract(carrier)


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
        call = context.mcp
        if call.method:
            attributes["mcp.method.name"] = call.method
            if call.method == "tools/call" and call.name:
                attributes["gen_ai.tool.name"] = call.name
    if outcome.mismatch is not None:
        attributes["authz.mismatch.claim"] = outcome.mismatch.claim
    return attributes


class CheckSpans:
    def __init__(self, hasher: SubjectHasher, tracer: trace.Tracer | None = None) -> None:
        self._tracer = tracer or trace.get_tracer("authz-gateway")
        self._hash = hasher

    def start(self, parent: Context | None, start_ns: int) -> trace.Span:
        return self._tracer.start_span(SPAN_NAME, context=parent, kind=SpanKind.SERVER, start_time=start_ns)

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

    def finish(
        self,
        span: trace.Span,
        outcome: Decision,
        context: RequestContext | None,
        end_ns: int,
        error: BaseException | None = None,
    ) -> trace.Span:
        if not span.is_recording():
            return span
        span.set_attributes(decision_attributes(outcome, context))
        mismatch = outcome.mismatch
        if mismatch is not None:
            bound, presented = mismatch.bound, mismatch.presented
            if mismatch.claim != "iss":  # the issuer is public; anything else may identify a person
                bound, presented = self._hash(bound), self._hash(presented)
            span.add_event(
                "authz.binding_mismatch",
                {
                    "authz.mismatch.claim": mismatch.claim,
                    "authz.bound": str(bound),
                    "authz.presented": str(presented),
                },
                timestamp=end_ns,
            )
        for audited in outcome.audit_denies:
            span.add_event(
                "authz.audit_deny",
                {
                    "authz.policy": audited.policy,
                    "authz.rule": audited.rule,
                    "authz.reason": audited.reason,
                    "http.response.status_code": audited.status,
                },
                timestamp=end_ns,
            )
        if error is not None:
            span.record_exception(error, timestamp=end_ns)
            span.set_status(Status(StatusCode.ERROR, outcome.error or type(error).__name__))
        elif outcome.reason in _ERROR_REASONS:
            message = outcome.error or outcome.reason
            # check.py caught the exception and kept its (scrubbed) message: record it as one.
            span.add_event(
                "exception",
                {"exception.type": _ERROR_TYPES[outcome.reason], "exception.message": message},
                timestamp=end_ns,
            )
            span.set_status(Status(StatusCode.ERROR, message))
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
