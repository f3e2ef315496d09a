"""One SERVER span per Check, named and attributed as DESIGN.md §5 says.

The span is created after the decision with the measured start time, so the hot path
pays for one span and no context switching. Its parent is the W3C trace context from
the gRPC call metadata (Envoy's ext_authz egress span), else from the request headers
inside the CheckRequest, else none.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterable, Mapping
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from gateway.decision import Decision
from gateway.request import RequestContext

SPAN_NAME = "envoy.service.auth.v3.Authorization/Check"
_propagator = TraceContextTextMapPropagator()
_TRACE_KEYS = ("traceparent", "tracestate")


def parent_from(metadata: Iterable[tuple[str, Any]] | None, headers: Mapping[str, str] | None) -> Context | None:
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


class CheckSpans:
    def __init__(self, hasher: SubjectHasher, tracer: trace.Tracer | None = None) -> None:
        self._tracer = tracer or trace.get_tracer("authz-gateway")
        self._hash = hasher

    def record(
        self,
        outcome: Decision,
        context: RequestContext | None,
        parent: Context | None,
        start_ns: int,
        end_ns: int,
        error: BaseException | None = None,
    ) -> trace.Span:
        attributes: dict[str, Any] = {
            "authz.decision": "allow" if outcome.allowed else "deny",
            "authz.reason": outcome.reason,
        }
        if outcome.policy:
            attributes["authz.policy"] = outcome.policy
        if outcome.rule:
            attributes["authz.rule"] = outcome.rule
        if not outcome.allowed:
            attributes["http.response.status_code"] = outcome.status
        if outcome.session_new:
            attributes["authz.session.new"] = True
        if context is not None:
            attributes["http.request.method"] = context.method
            attributes["url.path"] = context.path
            call = context.mcp
            if call.method:
                attributes["mcp.method.name"] = call.method
                if call.method == "tools/call" and call.name:
                    attributes["gen_ai.tool.name"] = call.name
        mismatch = outcome.mismatch
        if mismatch is not None:
            attributes["authz.mismatch.claim"] = mismatch.claim
        span = self._tracer.start_span(
            SPAN_NAME, context=parent, kind=SpanKind.SERVER, attributes=attributes, start_time=start_ns
        )
        if mismatch is not None:
            bound, presented = mismatch.bound, mismatch.presented
            if mismatch.claim != "iss":
                bound, presented = self._hash(bound), self._hash(presented)
            span.add_event(
                "authz.binding_mismatch",
                {"authz.mismatch.claim": mismatch.claim, "authz.bound": str(bound), "authz.presented": str(presented)},
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
        if outcome.error and outcome.reason in _ERROR_REASONS or error is not None:
            span.set_status(Status(StatusCode.ERROR, outcome.error or type(error).__name__))
        span.end(end_time=end_ns)
        return span


_ERROR_REASONS = frozenset({"policy_error", "store_unavailable", "internal_error"})
