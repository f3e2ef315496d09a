"""The decision log (`telemetry.decision_log: true`): one JSON line per decision on stdout.

Fields: time, trace_id, span_id, decision, reason, policy, rule, status, method, path.
Nothing else: no headers, no token, no session id, no claims, no error text. The path
is the request path without its query string (queries may carry secrets).

trace_id/span_id are the Check span's. When the gateway exports no traces, they are the
caller's (Envoy's ext_authz span), and empty when there is no caller trace either.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any, TextIO

from opentelemetry.trace import INVALID_SPAN_CONTEXT, format_span_id, format_trace_id

from gateway.decision import Decision
from gateway.request import RequestContext


def decision_record(
    outcome: Decision, context: RequestContext | None, span: Any, now: float
) -> dict[str, Any]:
    span_context = span.get_span_context() if span is not None else INVALID_SPAN_CONTEXT
    valid = span_context.is_valid
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z",
        "trace_id": format_trace_id(span_context.trace_id) if valid else "",
        "span_id": format_span_id(span_context.span_id) if valid else "",
        "decision": "allow" if outcome.allowed else "deny",
        "reason": outcome.reason,
        "policy": outcome.policy,
        "rule": outcome.rule,
        "status": 200 if outcome.allowed else outcome.status,
        "method": context.method if context is not None else "",
        "path": context.path if context is not None else "",
    }


class DecisionLog:
    """A DecisionListener: writes each record as one line, whole, even from many threads."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def __call__(self, outcome: Decision, context: RequestContext | None, span: Any) -> None:
        line = json.dumps(decision_record(outcome, context, span, time.time()), separators=(",", ":")) + "\n"
        stream = self._stream or sys.stdout  # looked up late, so a redirected stdout is honoured
        with self._lock:
            stream.write(line)
            stream.flush()
