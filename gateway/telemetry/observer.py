"""The Observer that steps report to (gateway/observe.py), over OpenTelemetry."""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode

from gateway.observe import NOTHING, Operation
from gateway.telemetry import metrics

_COUNTERS = {"authz_jwks_refreshes": metrics.jwks_refreshes, "authz_store_errors": metrics.store_errors}


class _SpanOperation:
    __slots__ = ("_span",)

    def __init__(self, span: trace.Span) -> None:
        self._span = span

    def __enter__(self) -> _SpanOperation:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        if value is not None:
            self.failed(value)
        self._span.end()

    def failed(self, error: BaseException) -> None:
        self._span.set_status(StatusCode.ERROR, type(error).__name__)


class TelemetryObserver:
    def __init__(self, tracer: trace.Tracer | None = None) -> None:
        self._tracer = tracer or trace.get_tracer("authz-gateway")

    def operation(
        self, name: str, attributes: Mapping[str, Any], *, within_check: bool = False
    ) -> AbstractContextManager[Operation]:
        if within_check and not trace.get_current_span().is_recording():
            return NOTHING
        span = self._tracer.start_span(name, kind=SpanKind.CLIENT, attributes=dict(attributes))
        return _SpanOperation(span)

    def count(self, counter: str, attributes: Mapping[str, str]) -> None:
        _COUNTERS[counter].add(1, attributes)
