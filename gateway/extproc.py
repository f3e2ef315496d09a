"""The response path: Envoy's external processing, `envoy.service.ext_proc.v3.ExternalProcessor/Process`.

One bidirectional stream per HTTP request, on the same listener as Check. With
`session.bind_on: response` (docs/sessions.md):
- request headers (Envoy only sends them once ext_authz has allowed the request): kept, and
  read only when the response needs the request's identity, which then comes through the same
  verifier and cache as Check (`ResponsePath.identify`), at the time the request headers came
  (a token that expires during a slow tool call does not undo what the upstream did);
- response headers: a session id the upstream issued is bound to that identity before the
  response goes on (`ResponsePath.bind_issued`); one it may not have is refused with 502
  `session_reissued`, and the response never reaches the client;
- a 404 to a request that carried a session id: only then is the body asked for
  (`mode_override`, buffered: a 404 is small), and when it is the MCP server's own "session not
  found" (`responses.session_not_found`) the session ends (`ResponsePath.forget_sessions`).
Bodies are never asked for otherwise, so long-lived SSE streams pass untouched. Once nothing
more is needed the gateway ends the stream (OK), which Envoy reads as "no more processing".

A stream that starts with response headers is a local reply (an ext_authz deny, Envoy
issue #38261): it passes untouched and binds nothing. Anything a processor must not receive
(an empty or unknown message, a second request headers, a session header repeated or not
visible ASCII) ends the stream with INVALID_ARGUMENT; Envoy, with failure_mode_allow: false,
then answers the client itself (the example config's status_on_error, 503) and delivers
nothing of the response.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from gateway import decision
from gateway.decision import Decision
from gateway.envoy_api.envoy.config.core.v3 import base_pb2
from gateway.envoy_api.envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from gateway.envoy_api.envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc_pb2
from gateway.envoy_api.envoy.type.v3 import http_status_pb2
from gateway.extproc_handles import EVENT_STREAM, PASSED, ResponseMinting, may_mint, with_body
from gateway.identity.verifier import Identity
from gateway.pipeline import ResponsePath
from gateway.pipeline.minting import unreadable
from gateway.request import RequestContext, RequestError, from_header_map, redact_secrets
from gateway.response import ResponseBuilder
from gateway.session.record import valid_session_id
from gateway.telemetry.tracing import CheckSpans, parent_from

log = logging.getLogger(__name__)

SERVICE_NAME = "envoy.service.ext_proc.v3.ExternalProcessor"
METHOD = "Process"

_UNPARSABLE = ext_proc_pb2.ProcessingRequest()
_CONTINUE = ext_proc_pb2.CommonResponse()
_BUFFER_RESPONSE_BODY = processing_mode_pb2.ProcessingMode(
    response_body_mode=processing_mode_pb2.ProcessingMode.BUFFERED
)
# Replies that change nothing, built once (never mutated: grpc only serializes them).
_REQUEST_HEADERS_DONE = ext_proc_pb2.ProcessingResponse(
    request_headers=ext_proc_pb2.HeadersResponse(response=_CONTINUE)
)
_RESPONSE_HEADERS_DONE = ext_proc_pb2.ProcessingResponse(
    response_headers=ext_proc_pb2.HeadersResponse(response=_CONTINUE)
)
_RESPONSE_BODY_DONE = ext_proc_pb2.ProcessingResponse(
    response_body=ext_proc_pb2.BodyResponse(response=_CONTINUE)
)
# Handles (gateway/extproc_handles.py): the request's body, then the response's.
_ASK_FOR_REQUEST_BODY = ext_proc_pb2.ProcessingResponse(
    request_headers=ext_proc_pb2.HeadersResponse(response=_CONTINUE),
    mode_override=processing_mode_pb2.ProcessingMode(
        request_body_mode=processing_mode_pb2.ProcessingMode.BUFFERED
    ),
)
_REQUEST_BODY_DONE = ext_proc_pb2.ProcessingResponse(
    request_body=ext_proc_pb2.BodyResponse(response=_CONTINUE)
)
_STREAM_RESPONSE_BODY = ext_proc_pb2.ProcessingResponse(
    response_headers=ext_proc_pb2.HeadersResponse(response=_CONTINUE),
    mode_override=processing_mode_pb2.ProcessingMode(
        response_body_mode=processing_mode_pb2.ProcessingMode.STREAMED
    ),
)
# The response's body, buffered: a 404's (a session not found?) or a minting answer's (non-SSE).
_ASK_FOR_BODY = ext_proc_pb2.ProcessingResponse(
    response_headers=ext_proc_pb2.HeadersResponse(response=_CONTINUE),
    mode_override=_BUFFER_RESPONSE_BODY,
)
_MAX_BODY = 64 * 1024  # a "session not found" answer is tens of bytes


def lenient_parse(data: bytes) -> ext_proc_pb2.ProcessingRequest:
    """Bytes that do not parse end the stream with INVALID_ARGUMENT, not grpc's INTERNAL."""
    try:
        return ext_proc_pb2.ProcessingRequest.FromString(data)
    except (DecodeError, ValueError):
        return _UNPARSABLE


class StreamError(Exception):
    """Input no processor may receive: the stream ends with INVALID_ARGUMENT."""


class StreamsExhausted(Exception):
    """One credential holds its whole share of the open streams: RESOURCE_EXHAUSTED."""


class _Exchange:
    """What one stream learns of its request and response."""

    __slots__ = (
        "requested", "request", "context", "identity", "status", "outcome", "extra", "error", "body",
        "credential", "mint", "mint_kinds", "request_body", "request_whole", "minting", "started",
    )

    def __init__(self) -> None:
        self.requested = False
        self.request: Any = None  # the request's HeaderMap (bind_on: response)
        self.context: RequestContext | None = None
        self.identity: Identity | None = None
        self.status = 0
        self.outcome: Decision = PASSED
        self.extra: dict[str, Any] = {}
        self.error: BaseException | None = None
        self.body = b""
        self.credential: bytes | None = None  # whose share of the streams this one holds
        # When the request's headers came: the exchange is judged at that time, as Check judged
        # it, so a token that expires during a slow tool call does not lose what the upstream did.
        self.started = 0.0
        # Handles (gateway/extproc_handles.py): Check said the response may mint one, of these
        # kinds ("policy/kind" pairs, comma-joined).
        self.mint = False
        self.mint_kinds = ""
        self.request_body = b""
        # The request's body was seen whole: its headers ended the stream, or a request_body
        # with end_of_stream came. Without it a minting response is refused (Envoy that ignores
        # mode_override, allow_mode_override unset, sends none: never taken as empty).
        self.request_whole = False
        self.minting: ResponseMinting | None = None


_FORGOTTEN = Decision(True, decision.SESSION_TERMINATED)


class ProcessService:
    def __init__(
        self,
        response_path: ResponsePath,
        responses: ResponseBuilder,
        spans: CheckSpans,
        max_request_bytes: int,
        not_found_body: str,
        max_id_length: int = 256,
        max_streams: int = 256,
    ) -> None:
        self.response_path = response_path
        # A stream holds a pool thread until its response headers come (the whole of a slow tool
        # call): past this many at once a stream is refused (Envoy answers status_on_error), so
        # the threads kept for Check are never taken (gateway.server.build_server).
        self.max_streams = max_streams
        self._streams = threading.BoundedSemaphore(max_streams)
        # A client decides how long its stream stays open (a body it never finishes sending keeps
        # the upstream from answering): one credential may hold only a share of the streams, so
        # one token (or the anonymous callers together) cannot take them all from everyone else.
        self._credential_share = max(1, max_streams // 8)
        self._held: dict[bytes, int] = {}
        self._held_lock = threading.Lock()
        self._responses = responses
        self._spans = spans
        self._max_request_bytes = max_request_bytes
        self._not_found = not_found_body.encode("utf-8")
        self._max_id_length = max_id_length

    def Process(
        self, requests: Iterator[ext_proc_pb2.ProcessingRequest], rpc: grpc.ServicerContext
    ) -> Iterator[ext_proc_pb2.ProcessingResponse]:
        if not self._streams.acquire(blocking=False):
            rpc.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"more than {self.max_streams} processing streams")
        try:
            yield from self._process(requests, rpc)
        finally:
            self._streams.release()

    def _process(
        self, requests: Iterator[ext_proc_pb2.ProcessingRequest], rpc: grpc.ServicerContext
    ) -> Iterator[ext_proc_pb2.ProcessingResponse]:
        start_ns = time.time_ns()
        exchange = _Exchange()
        span = self._spans.start(parent_from(rpc.invocation_metadata(), None), start_ns) if (
            self._spans.active()
        ) else None
        token = self._spans.enter(span) if span is not None else None
        try:
            for message in requests:
                reply, more = self._handle(message, exchange)
                yield reply
                if not more:
                    return  # nothing more to process: Envoy reads the OK close as "carry on"
        except StreamsExhausted as exc:
            exchange.outcome = decision.deny(decision.REQUEST_INVALID, error=str(exc))
            rpc.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except StreamError as exc:
            exchange.error = exc
            exchange.outcome = decision.deny(decision.REQUEST_INVALID, error=str(exc))
            rpc.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except grpc.RpcError:
            exchange.extra["authz.stream.cancelled"] = True  # Envoy went away mid-stream
        except Exception as exc:
            exchange.error = exc
            exchange.outcome = decision.deny(decision.INTERNAL_ERROR, error=type(exc).__name__)
            log.error("ext_proc stream failed with %s", type(exc).__name__)
            rpc.abort(grpc.StatusCode.INTERNAL, "internal error")
        finally:
            if exchange.credential is not None:
                self._release(exchange.credential)
            self._spans.leave(token)
            if span is not None:
                self._finish(span, exchange)

    def _finish(self, span: Any, exchange: _Exchange) -> None:
        outcome = exchange.outcome
        if outcome.error:
            outcome = replace(outcome, error=redact_secrets(outcome.error, exchange.context))
        try:
            self._spans.finish(
                span, outcome, exchange.context, time.time_ns(), exchange.error, exchange.extra or None
            )
        except Exception as exc:  # telemetry must never change the answer
            log.error("recording an ext_proc stream failed with %s", type(exc).__name__)

    # ---- one message ----
    def _handle(
        self, message: ext_proc_pb2.ProcessingRequest, exchange: _Exchange
    ) -> tuple[ext_proc_pb2.ProcessingResponse, bool]:
        """The reply to one message, and whether the stream goes on."""
        kind = message.WhichOneof("request")
        if kind == "request_headers":
            if exchange.requested or exchange.status:
                raise StreamError("request headers twice on one stream")
            exchange.requested = True
            exchange.started = time.time()
            exchange.request_whole = message.request_headers.end_of_stream
            kinds = may_mint(message.metadata_context)
            if kinds is not None:
                # Check allowed it, and its response may mint a handle: the request's body is
                # needed to read the response as Check read the request.
                exchange.mint = True
                exchange.mint_kinds = kinds
                exchange.credential = self._hold(message.request_headers.headers)
                exchange.request = message.request_headers.headers
                return _ASK_FOR_REQUEST_BODY, True
            return self._request_headers(message.request_headers, exchange)
        if kind == "request_body":
            if not exchange.mint or exchange.status:
                raise StreamError("a request body that was not asked for")
            if exchange.request_whole:
                raise StreamError("a request body after the request ended")
            exchange.request_body += message.request_body.body
            exchange.request_whole = message.request_body.end_of_stream
            if len(exchange.request_body) > self._max_request_bytes:
                raise StreamError("the request body is larger than max_request_bytes")
            return _REQUEST_BODY_DONE, True
        if kind == "response_headers":
            if exchange.status:
                raise StreamError("response headers twice on one stream")
            return self._response_headers(message.response_headers, exchange)
        if kind == "response_body" and exchange.minting is not None:
            return self._minted_body(message.response_body, exchange)
        if kind == "response_body":
            if exchange.status != 404 or exchange.context is None:
                raise StreamError("a response body that was not asked for")
            return self._response_body(message.response_body, exchange)
        raise StreamError(f"a message the gateway never asks for: {kind or 'empty'}")

    def _request_headers(
        self, headers: ext_proc_pb2.HttpHeaders, exchange: _Exchange
    ) -> tuple[ext_proc_pb2.ProcessingResponse, bool]:
        if not self.response_path.binds_on_response:
            # bind_on: first_use: nothing to learn from the response; ending the stream here frees
            # its thread at once instead of holding it for the whole upstream call.
            return _REQUEST_HEADERS_DONE, False
        exchange.credential = self._hold(headers.headers)
        exchange.request = headers.headers  # read when the response needs it, not before
        return _REQUEST_HEADERS_DONE, True

    def _hold(self, request: Any) -> bytes:
        """Counts the stream against its holder's share: the identity of a token Check verified
        (its refreshed tokens count as one), else the Authorization value; anonymous requests
        share one."""
        value = b""
        for entry in request.headers:
            if entry.key.lower() == "authorization":
                value = entry.raw_value or entry.value.encode("utf-8", "surrogatepass")
                break
        holder = self.response_path.holder_of(value.decode("latin-1")) if value else None
        credential = hashlib.sha256(value if holder is None else "\n".join(holder).encode()).digest()
        with self._held_lock:
            held = self._held.get(credential, 0)
            if held >= self._credential_share:
                raise StreamsExhausted(f"one credential holds {held} processing streams, its whole share")
            self._held[credential] = held + 1
        return credential

    def _release(self, credential: bytes) -> None:
        with self._held_lock:
            held = self._held.pop(credential, 1) - 1
            if held > 0:
                self._held[credential] = held

    def _identify(self, exchange: _Exchange) -> Decision | None:
        """The request's context and identity, through the same verifier and cache as Check (a
        cache hit: Check verified the token a moment ago); a deny when they cannot be had. Only
        a response that issues an id, or a 404 in a session, needs them."""
        assert exchange.request is not None
        try:
            context = from_header_map(exchange.request, self._max_request_bytes)
        except RequestError as exc:
            return decision.deny(exc.reason, error=str(exc))
        exchange.context = context
        # Envoy opens the stream at the request only once ext_authz allowed it (a local reply
        # starts at the response): the proof of possession was checked there, and is not again.
        identity = self.response_path.identify(context, exchange.started, admitted=True)
        if isinstance(identity, Decision):  # Check allowed it a moment ago; fail closed all the same
            return identity
        exchange.identity = identity
        return None

    def _response_headers(
        self, headers: ext_proc_pb2.HttpHeaders, exchange: _Exchange
    ) -> tuple[ext_proc_pb2.ProcessingResponse, bool]:
        if exchange.request is None:
            # A local reply (ext_authz's deny; Envoy opens the stream at the response), or
            # bind_on: first_use: passed untouched, not even read.
            exchange.status = -1
            return _RESPONSE_HEADERS_DONE, False
        status, issued, content_type = self._read_response(headers)
        exchange.status = status or -1
        if exchange.mint and not exchange.request_whole:
            # Minting reads the response as Check read the request: without the whole body it
            # would be judged as another request (an empty body is no MCP call), and pass unbound.
            return self._refuse(unreadable("the request's body was not seen whole"), exchange)
        presented = self._presented(exchange.request)
        new = {header: value for header, value in issued.items() if presented.get(header) != value}
        # Whether the server forgot the session, or the path is wrong: only the body tells.
        ask_body = status == 404 and bool(presented) and not content_type.startswith(EVENT_STREAM)
        ask_body = ask_body and not exchange.mint  # the body goes to the handles then
        if not new and not ask_body and not exchange.mint:
            return _RESPONSE_HEADERS_DONE, False  # the steady state: the session's own id, repeated
        refused = self._identify(exchange)
        if refused is not None:
            return self._refuse(refused, exchange)
        assert exchange.context is not None
        if new:
            outcome = self.response_path.bind_issued(
                exchange.context, exchange.identity, new, exchange.started
            )
            exchange.outcome = outcome
            if not outcome.allowed:
                return self._refuse(outcome, exchange)
            if outcome.session_new:
                exchange.extra["authz.session.bound_at"] = "response"
        if exchange.mint:
            return self._start_minting(headers, exchange, status)
        if ask_body:
            return _ASK_FOR_BODY, True
        return _RESPONSE_HEADERS_DONE, False

    def _presented(self, request: Any) -> dict[str, str]:
        """The session ids the request carried (session header → value, repeats comma-joined)."""
        watched = self.response_path.session_headers()
        presented: dict[str, str] = {}
        for entry in request.headers:
            key = entry.key.lower()
            if key in watched:
                value = (entry.raw_value or entry.value.encode()).decode("latin-1")
                presented[key] = f"{presented[key]},{value}" if key in presented else value
        return presented

    def _response_body(
        self, body: ext_proc_pb2.HttpBody, exchange: _Exchange
    ) -> tuple[ext_proc_pb2.ProcessingResponse, bool]:
        if len(exchange.body) + len(body.body) <= _MAX_BODY:
            exchange.body += body.body
        else:
            exchange.body = b"\0"  # too long to be the "session not found" answer
        if not body.end_of_stream:
            return _RESPONSE_BODY_DONE, True
        assert exchange.context is not None
        if exchange.body == self._not_found:
            try:
                ended = self.response_path.forget_sessions(exchange.context, exchange.identity, time.time())
            except Exception as exc:  # the 404 still goes to the client; the span says what failed
                exchange.error = exc
                exchange.outcome = decision.deny(decision.STORE_UNAVAILABLE, error=type(exc).__name__)
                return _RESPONSE_BODY_DONE, False
            if ended:
                # The upstream's own 404 goes on to the client: the session ends, nothing is refused.
                exchange.outcome = _FORGOTTEN
        return _RESPONSE_BODY_DONE, False

    def _start_minting(
        self, headers: ext_proc_pb2.HttpHeaders, exchange: _Exchange, status: int
    ) -> tuple[ext_proc_pb2.ProcessingResponse, bool]:
        """The response to a request that may mint a handle: its body is asked for (streamed
        for SSE, buffered otherwise), or without a body, judged now."""
        assert exchange.context is not None
        context = with_body(exchange.context, exchange.request_body)
        response_headers: dict[str, str] = {}
        for entry in headers.headers.headers:
            key = entry.key.lower()
            if not key.startswith(":"):
                raw = entry.raw_value or entry.value.encode("utf-8", "replace")
                value = raw.decode("latin-1")
                known = response_headers.get(key)
                response_headers[key] = value if known is None else f"{known},{value}"
        binder = self.response_path.handle_binder
        minting = ResponseMinting(
            self.response_path, context, exchange.identity, status, response_headers,
            binder.settings.max_response_bytes, exchange.started, exchange.mint_kinds,
        )
        exchange.minting = minting
        if headers.end_of_stream:
            refused = minting.no_body()
            exchange.outcome = minting.outcome
            if refused is not None:
                return self._refuse(refused, exchange)
            return _RESPONSE_HEADERS_DONE, False
        return (_STREAM_RESPONSE_BODY if minting.streamed else _ASK_FOR_BODY), True

    def _minted_body(
        self, body: ext_proc_pb2.HttpBody, exchange: _Exchange
    ) -> tuple[ext_proc_pb2.ProcessingResponse, bool]:
        minting = exchange.minting
        assert minting is not None
        if minting.streamed:
            released, refused = minting.streamed_chunk(body.body, body.end_of_stream)
            exchange.outcome = minting.outcome
            if refused is not None:
                # Headers are out: the stream ends here, without this event or any after it.
                return self._refuse(refused, exchange)
            if released == body.body:
                return _RESPONSE_BODY_DONE, not body.end_of_stream
            mutation = ext_proc_pb2.BodyMutation(body=released)
            reply = ext_proc_pb2.ProcessingResponse(
                response_body=ext_proc_pb2.BodyResponse(response=ext_proc_pb2.CommonResponse(body_mutation=mutation))
            )
            return reply, not body.end_of_stream
        refused = minting.buffered(body.body)
        exchange.outcome = minting.outcome
        if refused is not None:
            return self._refuse(refused, exchange)
        return _RESPONSE_BODY_DONE, False

    def _read_response(self, headers: ext_proc_pb2.HttpHeaders) -> tuple[int, dict[str, str], str]:
        """The status, the session ids issued (header → id; none read with bind_on: first_use,
        where a response binds no session, even one read for handles), and the content type."""
        binds = self.response_path.binds_on_response
        watched = self.response_path.session_headers() if binds else frozenset[str]()
        status = 0
        content_type = ""
        issued: dict[str, str] = {}
        for entry in headers.headers.headers:
            key = entry.key.lower()
            raw = entry.raw_value if entry.raw_value else entry.value.encode("utf-8", "replace")
            if key == ":status":
                status = int(raw) if raw.isdigit() and len(raw) == 3 else 0
            elif key == "content-type":
                content_type = raw.decode("latin-1").strip().lower()
            elif key in watched:
                if key in issued:
                    raise StreamError(f"the response carries {key} twice")
                if not raw.isascii() or not valid_session_id(raw.decode("ascii"), self._max_id_length):
                    raise StreamError(f"the response's {key} is not a session id (visible ASCII, no comma)")
                issued[key] = raw.decode("ascii")
        return status, issued, content_type

    def _refuse(
        self, outcome: Decision, exchange: _Exchange
    ) -> tuple[ext_proc_pb2.ProcessingResponse, bool]:
        exchange.outcome = outcome
        body, headers = self._responses.denial(outcome)
        immediate = ext_proc_pb2.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=outcome.status),
            headers=ext_proc_pb2.HeaderMutation(
                set_headers=[
                    base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=k, raw_value=v.encode()))
                    for k, v in headers
                ]
            ),
            body=body.encode("utf-8"),
            details=outcome.reason,
        )
        return ext_proc_pb2.ProcessingResponse(immediate_response=immediate), False


def handler(service: ProcessService) -> grpc.RpcMethodHandler[Any, Any]:
    return grpc.stream_stream_rpc_method_handler(
        service.Process,
        request_deserializer=lenient_parse,
        response_serializer=ext_proc_pb2.ProcessingResponse.SerializeToString,
    )
