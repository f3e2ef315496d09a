"""The gateway's OTLP span and metric exporters, on the SDK's public exporter interfaces.

They import nothing from `opentelemetry.proto` or `opentelemetry.exporter.otlp*`: the
messages are gateway.otlp_api's (a descriptor pool of its own), so an installed
opentelemetry-proto, in whatever version, and xds-protos' older copy of its files over it,
make no difference (proto/README.md).

Both protocols the gateway documents: OTLP/gRPC, a unary call on a plain grpc channel with
the request already serialized; OTLP/HTTP with protobuf bodies, a POST with http.client.
Settings come from the OTEL_EXPORTER_OTLP_* variables (otlp_settings.py).

Transient failures (gRPC UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, …; HTTP 429,
502, 503, 504; a refused or dropped connection) are retried with exponential backoff
(1 s, 2 s, 4 s, … ±20 %, or the collector's Retry-After) while the export's timeout lasts;
other failures are not. Once shutdown begins (ShutdownClock), every export, retries
included, ends within the timeout of its start: a collector that is down delays the exit by
at most that. Checks never wait for an export: spans reach it through the batch
processor's queue, which drops when full.

Header values are sent, never logged: they can hold credentials. An unexpected error in a
send (a header the transport refuses, …) fails that export and is logged by its type only, as
its text could quote a header; it never escapes export(), where the SDK would log it in full.
A TLS file that cannot be read raises UnusableSettings when the exporter is made: no silent
fall-back to the system's roots.
"""

from __future__ import annotations

import contextlib
import gzip
import http.client
import logging
import random
import socket
import ssl
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any
from urllib.parse import urlsplit

import grpc
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    MetricExporter,
    MetricExportResult,
    MetricsData,
)
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from gateway.telemetry.otlp_encoding import SpanEncoder
from gateway.telemetry.otlp_metric_encoding import MetricEncoder
from gateway.telemetry.otlp_settings import GRPC, GRPC_METHODS, OtlpSettings, UnusableSettings

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 6
RETRYABLE_GRPC = frozenset(
    {
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)
RETRYABLE_HTTP = frozenset({429, 502, 503, 504})


def _user_agent() -> str:
    try:
        return f"authz-gateway/{version('authz-gateway')}"
    except PackageNotFoundError:
        return "authz-gateway"


@dataclass(frozen=True)
class Attempt:
    """One try at sending: ok, or what went wrong, whether it may pass on a retry, and how
    long the collector asked to wait (Retry-After) if it did."""

    ok: bool
    retryable: bool = False
    problem: str = ""
    retry_after_s: float | None = None
    connection_lost: bool = False  # the connection failed or dropped (HTTP)


class ShutdownClock:
    """When shutdown began, shared by the exporters of one setup_telemetry: from then on each
    export must end within its timeout of that moment, however many batches are left."""

    def __init__(self) -> None:
        self.began: float | None = None
        self.event = threading.Event()

    def begin(self) -> None:
        if self.began is None:
            self.began = time.monotonic()
        self.event.set()


def _read(path: str | None, what: str) -> bytes | None:
    """A TLS file the settings name; one that cannot be read makes the exporter unusable (never
    a silent fall-back to the system's roots or to no client certificate)."""
    if not path:
        return None
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise UnusableSettings(f"cannot read the OTLP {what} {path} ({reason})") from None


def _unexpected(exc: Exception) -> str:
    """An unexpected error, by its type only: its text can quote a header value."""
    return f"{type(exc).__name__} (unexpected)"


class GrpcSender:
    """Unary Export calls on one grpc channel, reopened after UNAVAILABLE (so a collector that
    comes back is reached at once, not after the channel's own reconnect backoff)."""

    def __init__(self, settings: OtlpSettings) -> None:
        self._settings = settings
        self._metadata = settings.headers
        self._credentials = None
        if settings.tls:
            self._credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(settings.certificate, "certificate"),
                private_key=_read(settings.client_key, "client key"),
                certificate_chain=_read(settings.client_certificate, "client certificate"),
            )
        self._lock = threading.Lock()
        self._channel: grpc.Channel | None = None
        self._call: Any = None
        self._closed = False

    def _open(self) -> Any:
        options = [("grpc.primary_user_agent", _user_agent())]
        compression = grpc.Compression.Gzip if self._settings.compression == "gzip" else None
        if self._credentials is not None:
            channel = grpc.secure_channel(
                self._settings.target, self._credentials, options=options, compression=compression
            )
        else:
            channel = grpc.insecure_channel(self._settings.target, options=options, compression=compression)
        self._channel = channel
        # No serializers: the request goes out as the bytes given, the response comes back as bytes.
        self._call = channel.unary_unary(
            GRPC_METHODS[self._settings.signal], request_serializer=None, response_deserializer=None
        )
        return self._call

    def send(self, payload: bytes, timeout_s: float) -> Attempt:
        with self._lock:
            if self._closed:
                return Attempt(False, problem="exporter shut down")
            try:
                call = self._call if self._call is not None else self._open()
            except Exception as exc:
                return Attempt(False, problem=_unexpected(exc))
        try:
            call(payload, timeout=timeout_s, metadata=self._metadata)
        except grpc.RpcError as error:
            code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
            if code == grpc.StatusCode.UNAVAILABLE:
                self._reset(call)
            # The status code only: the details are the collector's text, which may echo headers.
            return Attempt(False, retryable=code in RETRYABLE_GRPC, problem=f"gRPC {code.name}")
        except Exception as exc:  # e.g. metadata grpc refuses: never out of export(), never its text
            return Attempt(False, problem=_unexpected(exc))
        return Attempt(True)

    def _reset(self, failed_call: Any) -> None:
        with self._lock:
            if self._call is failed_call and self._channel is not None:
                self._channel.close()
                self._channel, self._call = None, None

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._channel is not None:
                self._channel.close()  # cancels a call in flight
                self._channel, self._call = None, None


def _tls_context(settings: OtlpSettings) -> ssl.SSLContext:
    """The HTTPS context: the CA file to trust (else the system's roots), a client certificate."""
    for path, what in (
        (settings.certificate, "certificate"),
        (settings.client_certificate, "client certificate"),
        (settings.client_key, "client key"),
    ):
        _read(path, what)  # a missing file is reported as such, not as an SSL error
    try:
        context = ssl.create_default_context(cafile=settings.certificate or None)
        if settings.client_certificate:
            # No password prompt on the terminal for an encrypted key: it fails instead.
            context.load_cert_chain(settings.client_certificate, settings.client_key or None, password=b"")
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        reason = exc.reason if isinstance(exc, ssl.SSLError) else type(exc).__name__
        raise UnusableSettings(f"the OTLP TLS files are not usable ({reason})") from None
    return context


# The exporter's own framing headers win over a user header of the same name.
_FRAMING_HEADERS = frozenset({"content-type", "content-encoding", "content-length", "transfer-encoding"})


class _DeadlineMixin(http.client.HTTPConnection):
    """Keeps a duplicate of the TCP socket once it is connected (before any TLS handshake), so
    a timer can shut the connection down at the request's deadline: http.client's timeout is
    per socket operation, and a collector trickling bytes would otherwise hold it for longer."""

    cutter: socket.socket | None = None
    was_cut = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # cut() runs on the timer's thread: it must never reach a duplicate release() has closed.
        self._cutter_lock = threading.Lock()

    def connect(self) -> None:
        super().connect()
        self.release()  # http.client reconnects by itself after a Connection: close
        with self._cutter_lock:
            self.cutter = self.sock.dup()

    def cut(self) -> None:
        """Ends whatever the connection is blocked in: the handshake, a send or a read. (The
        duplicate is not closed by close(): a response being read outlives that.)"""
        with self._cutter_lock:
            if self.cutter is not None:
                self.was_cut = True
                with contextlib.suppress(OSError):  # already closed by the other side
                    self.cutter.shutdown(socket.SHUT_RDWR)

    def release(self) -> None:
        with self._cutter_lock:
            cutter, self.cutter = self.cutter, None
            if cutter is not None:
                cutter.close()


class _Connection(_DeadlineMixin, http.client.HTTPConnection):
    pass


class _TlsConnection(http.client.HTTPSConnection, _DeadlineMixin):
    # HTTPSConnection.connect calls _DeadlineMixin.connect for the TCP socket, then wraps it.
    pass


class HttpSender:
    """POSTs on one kept-alive http.client connection, reopened after any connection error.
    Once the TCP connection is up, each POST (TLS handshake included) ends by its deadline: a
    timer shuts the socket down then. Before that, the name lookup is not bounded, and each
    address tried may take the time left (http.client's per-operation timeout)."""

    def __init__(self, settings: OtlpSettings) -> None:
        self._settings = settings
        url = urlsplit(settings.target)
        self._https = url.scheme == "https"
        self._host = url.hostname or "localhost"
        self._port = url.port
        self._path = (url.path or "/") + (f"?{url.query}" if url.query else "")
        self._context: ssl.SSLContext | None = None
        if self._https:
            self._context = _tls_context(settings)
        # Lower-case names throughout, so a user's header replaces ours rather than joining it.
        self._headers = {"user-agent": _user_agent()}
        self._headers.update((k, v) for k, v in settings.headers if k not in _FRAMING_HEADERS)
        self._headers["content-type"] = "application/x-protobuf"
        if settings.compression == "gzip":
            self._headers["content-encoding"] = "gzip"
        self._lock = threading.Lock()
        self._connection: _DeadlineMixin | None = None
        self._closed = False

    def _connect(self, timeout_s: float) -> _DeadlineMixin:
        if self._https:
            return _TlsConnection(self._host, self._port, timeout=timeout_s, context=self._context)
        return _Connection(self._host, self._port, timeout=timeout_s)

    def send(self, payload: bytes, timeout_s: float) -> Attempt:
        body = gzip.compress(payload) if self._settings.compression == "gzip" else payload
        with self._lock:  # one request at a time on the one connection
            if self._closed:
                return Attempt(False, problem="exporter shut down")
            deadline = time.monotonic() + timeout_s
            reused = self._connection is not None
            attempt = self._post(body, timeout_s)
            remaining = deadline - time.monotonic()
            if reused and attempt.connection_lost and remaining > 0:
                # A kept-alive connection the collector had closed: once more on a new one, at once.
                attempt = self._post(body, remaining)
            return attempt

    def _post(self, body: bytes, timeout_s: float) -> Attempt:
        connection = self._connection
        if connection is None:
            connection = self._connection = self._connect(timeout_s)
        else:
            connection.timeout = timeout_s
            if connection.sock is not None:
                connection.sock.settimeout(timeout_s)
        deadline = threading.Timer(timeout_s, connection.cut)
        deadline.daemon = True
        deadline.start()
        try:
            connection.request("POST", self._path, body=body, headers=self._headers)
            response = connection.getresponse()
            response.read()
        except (OSError, http.client.HTTPException) as exc:
            connection.close()
            connection.release()
            self._connection = None
            # OS and TLS errors quote no request header nor URL; http.client's own errors may quote
            # the request line (InvalidURL: its query can hold an API key) or the collector's
            # status line, so those go by their type only.
            problem = f"{type(exc).__name__}" if isinstance(exc, http.client.HTTPException) else (
                f"{type(exc).__name__}: {exc}"
            )
            if connection.was_cut:
                problem = f"no complete answer within {timeout_s:.1f}s ({problem})"
            return Attempt(False, retryable=True, problem=problem, connection_lost=True)
        except Exception as exc:  # e.g. a header http.client refuses: never out of export(), never its text
            connection.close()
            connection.release()
            self._connection = None
            return Attempt(False, problem=_unexpected(exc))
        finally:
            deadline.cancel()
            if connection.sock is None:  # closed, by us or for the collector's Connection: close
                connection.release()
        if 200 <= response.status < 300:
            return Attempt(True)
        retry_after = None
        header = response.getheader("retry-after")
        if header is not None and header.strip().isdigit():
            retry_after = float(header.strip())
        return Attempt(
            False,
            retryable=response.status in RETRYABLE_HTTP,
            problem=f"HTTP {response.status} {response.reason}",
            retry_after_s=retry_after,
        )

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._connection is not None:
                self._connection.close()
                self._connection.release()
                self._connection = None


class OtlpSender:
    """Sends one serialized export request, retrying as the module doc says."""

    def __init__(self, settings: OtlpSettings, clock: ShutdownClock) -> None:
        self.settings = settings
        self._clock = clock
        self._transport: GrpcSender | HttpSender = (
            GrpcSender(settings) if settings.protocol == GRPC else HttpSender(settings)
        )
        self._stopped = False

    def _deadline(self, timeout_s: float) -> float:
        deadline = time.monotonic() + min(timeout_s, self.settings.timeout_s)
        if self._clock.began is not None:
            deadline = min(deadline, self._clock.began + self.settings.timeout_s)
        return deadline

    def send(self, payload: bytes, what: str, timeout_s: float = float("inf")) -> bool:
        if self._stopped:
            log.warning("telemetry: %s not exported: the exporter is shut down", what)
            return False
        deadline = self._deadline(timeout_s)
        attempt = Attempt(False, problem="no time left")
        for number in range(MAX_ATTEMPTS):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            attempt = self._transport.send(payload, remaining)
            if attempt.ok:
                return True
            if not attempt.retryable:
                break
            backoff = attempt.retry_after_s
            if backoff is None:
                backoff = 2**number * random.uniform(0.8, 1.2)
            if number + 1 == MAX_ATTEMPTS or backoff >= deadline - time.monotonic():
                break
            # Woken early when shutdown begins: the next attempt then runs on the shutdown clock.
            self._clock.event.wait(backoff)
        log.warning(
            "telemetry: %s not exported to OTLP %s %s: %s",
            what, self.settings.protocol, self.settings.destination, attempt.problem,
        )
        return False

    def shutdown(self) -> None:
        self._stopped = True
        self._transport.close()


class OtlpSpanExporter(SpanExporter):
    def __init__(self, settings: OtlpSettings, clock: ShutdownClock | None = None) -> None:
        self._sender = OtlpSender(settings, clock or ShutdownClock())
        self._encoder = SpanEncoder()

    @property
    def settings(self) -> OtlpSettings:
        return self._sender.settings

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if not spans:
            return SpanExportResult.SUCCESS
        payload = self._encoder.request(spans)
        sent = self._sender.send(payload, f"{len(spans)} spans")
        return SpanExportResult.SUCCESS if sent else SpanExportResult.FAILURE

    def shutdown(self) -> None:
        self._sender.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True  # nothing is buffered here


def _temporality(preference: str) -> dict[type, AggregationTemporality]:
    """OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE, as the SDK's OTLP exporters read it."""
    from opentelemetry.sdk.metrics import (
        Counter,
        Histogram,
        ObservableCounter,
        ObservableGauge,
        ObservableUpDownCounter,
        UpDownCounter,
    )

    cumulative, delta = AggregationTemporality.CUMULATIVE, AggregationTemporality.DELTA
    chosen = preference.strip().upper() or "CUMULATIVE"
    if chosen not in ("CUMULATIVE", "DELTA", "LOWMEMORY"):
        log.warning("telemetry: metrics temporality preference %r unknown; CUMULATIVE is used", preference)
        chosen = "CUMULATIVE"
    counters = cumulative if chosen == "CUMULATIVE" else delta
    return {
        Counter: counters,
        UpDownCounter: cumulative,
        Histogram: counters,
        ObservableCounter: delta if chosen == "DELTA" else cumulative,
        ObservableUpDownCounter: cumulative,
        ObservableGauge: cumulative,
    }


class OtlpMetricExporter(MetricExporter):
    def __init__(
        self, settings: OtlpSettings, clock: ShutdownClock | None = None, temporality_preference: str = ""
    ) -> None:
        super().__init__(preferred_temporality=_temporality(temporality_preference))
        self._sender = OtlpSender(settings, clock or ShutdownClock())
        self._encoder = MetricEncoder()

    @property
    def settings(self) -> OtlpSettings:
        return self._sender.settings

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        payload = self._encoder.request(metrics_data)
        sent = self._sender.send(payload, "metrics", timeout_millis / 1000)
        return MetricExportResult.SUCCESS if sent else MetricExportResult.FAILURE

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self._sender.shutdown()
