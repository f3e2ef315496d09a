"""The gRPC edge: Envoy's Authorization/Check, and the gRPC health service.

The servicer reads the clock once per check, hands plain data to the Authorizer, and
turns the decision into a CheckResponse and one span. Anything unexpected becomes a
500 `internal_error` deny: the gateway never answers an allow it did not decide.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Callable
from concurrent import futures
from dataclasses import replace
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opentelemetry.trace import INVALID_SPAN

from gateway import decision
from gateway.decision import Decision
from gateway.envoy_api.envoy.service.auth.v3 import external_auth_pb2
from gateway.extproc import SERVICE_NAME as PROCESS_SERVICE_NAME
from gateway.extproc import ProcessService
from gateway.extproc import handler as process_handler
from gateway.pipeline import Authorizer
from gateway.request import RequestContext, RequestError, from_check_request, redact_secrets
from gateway.response import ResponseBuilder
from gateway.telemetry import metrics
from gateway.telemetry.tracing import CheckSpans, parent_from, request_line

log = logging.getLogger(__name__)

SERVICE_NAME = "envoy.service.auth.v3.Authorization"
DecisionListener = Callable[[Decision, RequestContext | None, Any], None]


# grpc answers INTERNAL when a deserializer returns None, so a request that does not parse
# is marked by this object instead, and reaches Check to be denied as request_invalid.
UNPARSABLE = external_auth_pb2.CheckRequest()


def _lenient_parse(data: bytes) -> external_auth_pb2.CheckRequest:
    # A request that does not parse (non-UTF-8 strings, garbage) becomes a deny, not a gRPC error.
    try:
        return external_auth_pb2.CheckRequest.FromString(data)
    except (DecodeError, ValueError):
        return UNPARSABLE


class FailureLog:
    """One log line per distinct cause of an internal error, at most once per `every` seconds.

    A cause is the exception's type and the line that raised it. Neither the message nor the
    stack is logged: a message may quote request data, and a stack per request floods a log.
    """

    def __init__(self, every: float = 60.0, max_causes: int = 1024) -> None:
        self._every = every
        self._max_causes = max_causes
        self._causes: dict[tuple[str, str], tuple[float, int]] = {}
        self._lock = threading.Lock()

    def report(self, exc: BaseException, now: float | None = None) -> bool:
        """Logs the failure unless its cause was logged recently; returns whether it logged."""
        frames = traceback.extract_tb(exc.__traceback__)
        where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
        cause = (type(exc).__name__, where)
        now = time.monotonic() if now is None else now
        with self._lock:
            last, suppressed = self._causes.get(cause, (-float("inf"), 0))
            if now - last < self._every:
                self._causes[cause] = (last, suppressed + 1)
                return False
            if len(self._causes) >= self._max_causes:
                self._causes.clear()
            self._causes[cause] = (now, 0)
        more = f" ({suppressed} more since the last report)" if suppressed else ""
        log.error("check failed with %s at %s%s", cause[0], where, more)
        return True


class CheckService:
    def __init__(
        self,
        authorizer: Authorizer,
        responses: ResponseBuilder,
        spans: CheckSpans,
        max_request_bytes: int,
        listeners: tuple[DecisionListener, ...] = (),
    ) -> None:
        self.authorizer = authorizer
        self._responses = responses
        self._spans = spans
        self._max_request_bytes = max_request_bytes
        self._listeners = listeners
        self._failures = FailureLog()

    def _parse(self, request: external_auth_pb2.CheckRequest | None) -> RequestContext | Decision:
        if request is None or request is UNPARSABLE:
            return decision.deny(decision.REQUEST_INVALID, error="the CheckRequest does not parse")
        try:
            return from_check_request(request, self._max_request_bytes)
        except RequestError as exc:
            return decision.deny(exc.reason, error=str(exc))

    def Check(self, request: external_auth_pb2.CheckRequest | None, rpc: grpc.ServicerContext) -> Any:
        start_ns = time.time_ns()
        context: RequestContext | None = None
        error: BaseException | None = None
        span = None
        try:
            parsed = self._parse(request)
            context = parsed if isinstance(parsed, RequestContext) else None
            # The span starts once its parent is known (metadata, else the request's headers),
            # and is current during the decision so I/O child spans (JWKS, store) nest under it.
            if self._spans.active():
                headers = context.headers if context else None
                span = self._spans.start(parent_from(rpc.invocation_metadata(), headers), start_ns)
            else:
                span = INVALID_SPAN  # no tracer: no parent to parse, no span to build
            if isinstance(parsed, Decision):
                outcome = parsed
            else:
                token = self._spans.enter(span)
                try:
                    outcome = self.authorizer.check(parsed, start_ns / 1e9)
                finally:
                    self._spans.leave(token)
        except Exception as exc:  # fail closed on anything unforeseen
            self._failures.report(exc)
            error = exc
            outcome = decision.deny(decision.INTERNAL_ERROR, error=type(exc).__name__)
        if outcome.error:
            outcome = replace(outcome, error=redact_secrets(outcome.error, context))
        try:
            self._record(outcome, context, request, span, start_ns, error)
        except Exception as exc:  # telemetry must never change, or lose, the decided answer
            log.error("recording a decision failed with %s", type(exc).__name__)
        return self._responses.build(outcome)

    def _record(
        self,
        outcome: Decision,
        context: RequestContext | None,
        request: external_auth_pb2.CheckRequest | None,
        span: Any,
        start_ns: int,
        error: BaseException | None,
    ) -> None:
        """The decision's span, metrics and listeners (the decision log)."""
        end_ns = time.time_ns()
        if span is None:  # failed before the span began
            span = self._spans.start(None, start_ns) if self._spans.active() else INVALID_SPAN
        if context is None:
            context = request_line(request)
        self._spans.finish(span, outcome, context, end_ns, error)
        verdict = "allow" if outcome.allowed else "deny"
        metrics.checks.add(1, {"decision": verdict, "reason": outcome.reason, "policy": outcome.policy})
        metrics.check_duration.record((end_ns - start_ns) / 1e9, {"decision": verdict})
        for listener in self._listeners:
            listener(outcome, context, span)


def build_server(
    service: CheckService,
    health_servicer: health.HealthServicer,
    max_workers: int,
    reuse_port: bool = False,
    processor: ProcessService | None = None,
) -> grpc.Server:
    handler = grpc.unary_unary_rpc_method_handler(
        service.Check,
        request_deserializer=_lenient_parse,
        response_serializer=external_auth_pb2.CheckResponse.SerializeToString,
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="check"),
        options=[("grpc.so_reuseport", 1 if reuse_port else 0)],
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, {"Check": handler}),))
    if processor is not None:  # the response path (gateway/extproc.py), on the same listener
        processing = grpc.method_handlers_generic_handler(
            PROCESS_SERVICE_NAME, {"Process": process_handler(processor)}
        )
        server.add_generic_rpc_handlers((processing,))
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    return server


def set_serving(health_servicer: health.HealthServicer, serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", SERVICE_NAME, PROCESS_SERVICE_NAME):
        health_servicer.set(name, status)
