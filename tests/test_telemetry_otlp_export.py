"""The gateway's own OTLP exporters (gateway/telemetry/otlp_export.py), against a real receiver.

- The OTEL_EXPORTER_OTLP_* variables are read as the SDK's exporters read them.
- Over gRPC and over HTTP/protobuf, with and without gzip: spans and metrics arrive with
  their content, the configured headers are sent, and no header value is ever logged; over
  TLS, the collector's certificate is verified (OTEL_EXPORTER_OTLP_CERTIFICATE).
- Transient failures are retried; others are not; a collector that is down, or that never
  answers, costs an export at most its timeout, and after shutdown begins at most the timeout
  in all.
- A gateway process whose collector is down answers its checks at once and exits within the
  timeout, in both telemetry modes.
- A header no request can carry (CR, LF, NUL, a -bin key) is skipped, or fails its export,
  and never reaches the log, in-process or a gateway's stderr; an endpoint the exporters cannot
  use (an HTTP one without http(s):// and a host, a gRPC one without a host) or a TLS file that
  cannot be read turns that signal off with one error line; an HTTP export ends by its deadline
  even against a collector that trickles; the exporter's framing headers win over a user's;
  the span encoder's cache keeps -0.0 apart from 0.0.
"""

from __future__ import annotations

import logging
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, MetricExportResult
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.trace import SpanKind, Status, StatusCode

from gateway.telemetry.otlp_export import OtlpMetricExporter, OtlpSpanExporter, ShutdownClock
from gateway.telemetry.otlp_settings import GRPC, HTTP, OtlpSettings, parse_headers, settings
from tests.support.checks import CheckClient, check_request
from tests.support.issuer import TestIssuer
from tests.support.otlp import OtlpReceiver
from tests.support.processes import free_port
from tests.test_telemetry_encoding import Collect
from tests.test_telemetry_fast_path import MODES, TelemetryGateway

SECRET = "Bearer s3cr3t-otlp-token"
RESOURCE = Resource.create({"service.name": "export-test"})
PROTOCOLS = [pytest.param(GRPC, id="grpc"), pytest.param(HTTP, id="http")]


# ---------------------------------------------------------------------------------------
# Settings.
# ---------------------------------------------------------------------------------------


def test_endpoints_protocols_and_tls_as_the_sdk_reads_them() -> None:
    assert settings({}, "TRACES").target == "localhost:4317"
    assert settings({}, "TRACES").tls is False  # http://localhost:4317, the default
    general = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/", "OTEL_EXPORTER_OTLP_PROTOCOL": HTTP}
    assert settings(general, "TRACES").target == "http://collector:4318/v1/traces"
    assert settings(general, "METRICS").target == "http://collector:4318/v1/metrics"
    assert settings({"OTEL_EXPORTER_OTLP_PROTOCOL": HTTP}, "METRICS").target == "http://localhost:4318/v1/metrics"
    # A signal's own endpoint is used as it is, and its protocol wins over the general one.
    signal_only = {
        **general,
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://traces.example/custom",
        "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "grpc",
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "https://metrics.example:4317",
    }
    traces, metrics = settings(signal_only, "TRACES"), settings(signal_only, "METRICS")
    assert (traces.protocol, traces.target, traces.tls) == (HTTP, "https://traces.example/custom", True)
    assert (metrics.protocol, metrics.target, metrics.tls) == (GRPC, "metrics.example:4317", True)
    # gRPC TLS: https always; else OTEL_EXPORTER_OTLP_(TRACES_)INSECURE; else off only for http.
    grpc_env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}
    assert settings({**grpc_env, "OTEL_EXPORTER_OTLP_INSECURE": "false"}, "TRACES").tls is True
    assert settings({**grpc_env, "OTEL_EXPORTER_OTLP_TRACES_INSECURE": "true",
                     "OTEL_EXPORTER_OTLP_INSECURE": "false"}, "TRACES").tls is False
    assert settings({"OTEL_EXPORTER_OTLP_ENDPOINT": "c:4317"}, "TRACES").tls is True
    assert settings({"OTEL_EXPORTER_OTLP_ENDPOINT": "c:4317", "OTEL_EXPORTER_OTLP_INSECURE": "true"},
                    "TRACES").target == "c:4317"
    assert settings({"OTEL_EXPORTER_OTLP_ENDPOINT": "https://c:4317",
                     "OTEL_EXPORTER_OTLP_INSECURE": "true"}, "TRACES").tls is True


def test_headers_timeout_compression_and_certificates() -> None:
    assert parse_headers("Authorization=Bearer%20abc , x-tenant=a=b,,broken, =x") == (
        ("authorization", "Bearer abc"), ("x-tenant", "a=b"),
    )
    env = {
        "OTEL_EXPORTER_OTLP_HEADERS": "x-general=1",
        "OTEL_EXPORTER_OTLP_METRICS_HEADERS": "x-metrics=2",
        "OTEL_EXPORTER_OTLP_TIMEOUT": "2.5",
        "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "nonsense",
        "OTEL_EXPORTER_OTLP_COMPRESSION": "GZIP",
        "OTEL_EXPORTER_OTLP_METRICS_COMPRESSION": "none",
        "OTEL_EXPORTER_OTLP_CERTIFICATE": "/ca.pem",
        "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE": "/traces-ca.pem",
    }
    traces, metrics = settings(env, "TRACES"), settings(env, "METRICS")
    assert traces.headers == (("x-general", "1"),) and metrics.headers == (("x-metrics", "2"),)
    assert traces.timeout_s == 10.0 and metrics.timeout_s == 2.5  # an unreadable value: the default
    assert traces.compression == "gzip" and metrics.compression is None
    assert traces.certificate == "/traces-ca.pem" and metrics.certificate == "/ca.pem"
    assert SECRET not in repr(settings({"OTEL_EXPORTER_OTLP_HEADERS": f"authorization={SECRET}"}, "TRACES"))


# ---------------------------------------------------------------------------------------
# Exporting to a real receiver.
# ---------------------------------------------------------------------------------------


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    found = OtlpReceiver()
    try:
        yield found
    finally:
        found.stop()


def _settings(receiver: OtlpReceiver, protocol: str, signal: str, **env: str) -> OtlpSettings:
    endpoint = receiver.grpc_endpoint if protocol == GRPC else receiver.http_endpoint
    return settings(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
            "OTEL_EXPORTER_OTLP_HEADERS": f"authorization={SECRET},x-tenant=edge",
            **env,
        },
        signal,  # type: ignore[arg-type]
    )


def _spans() -> list[ReadableSpan]:
    collected = Collect()
    provider = TracerProvider(resource=RESOURCE, shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(collected))
    tracer = provider.get_tracer("authz-gateway")
    with tracer.start_as_current_span("parent", kind=SpanKind.SERVER) as parent:
        parent.set_attributes({"authz.decision": "deny", "authz.reason": "subject_mismatch", "n": 3,
                               "list": ("a", "b")})
        parent.add_event("authz.binding_mismatch", {"claim": "sub"})
        parent.set_status(Status(StatusCode.ERROR, "denied"))
        tracer.start_span("child", kind=SpanKind.CLIENT).end()
    return collected.spans


@pytest.mark.parametrize("gzip", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_spans_and_metrics_arrive_with_headers_never_logged(
    receiver: OtlpReceiver, protocol: str, gzip: bool, caplog: pytest.LogCaptureFixture
) -> None:
    compression = {"OTEL_EXPORTER_OTLP_COMPRESSION": "gzip"} if gzip else {}
    caplog.set_level(logging.DEBUG)
    spans = OtlpSpanExporter(_settings(receiver, protocol, "TRACES", **compression))
    assert spans.export(_spans()) == SpanExportResult.SUCCESS
    parent = receiver.wait_for_span(lambda s: True, name="parent", service="export-test")
    child = receiver.wait_for_span(lambda s: True, name="child")
    assert parent.attributes == {"authz.decision": "deny", "authz.reason": "subject_mismatch", "n": 3,
                                 "list": ["a", "b"]}
    assert parent.events == [("authz.binding_mismatch", {"claim": "sub"})]
    assert (parent.kind, parent.status_code, parent.raw.status.message) == (2, 2, "denied")
    assert child.parent_span_id == parent.span_id and child.trace_id == parent.trace_id

    reader = InMemoryMetricReader()
    provider = MeterProvider(resource=RESOURCE, metric_readers=[reader])
    meter = provider.get_meter("authz-gateway")
    meter.create_counter("authz_checks").add(5, {"reason": "allowed"})
    meter.create_histogram("authz_check_duration", "s").record(0.002, {"decision": "allow"})
    data = reader.get_metrics_data()
    provider.shutdown()
    metrics = OtlpMetricExporter(_settings(receiver, protocol, "METRICS", **compression))
    assert data is not None and metrics.export(data) == MetricExportResult.SUCCESS
    ((attributes, point),) = receiver.metric_points("authz_checks", service="export-test")
    assert attributes == {"reason": "allowed"} and point.as_int == 5
    ((attributes, point),) = receiver.metric_points("authz_check_duration")
    assert attributes == {"decision": "allow"} and point.count == 1 and point.sum == pytest.approx(0.002)

    assert len(receiver.request_headers) == 2
    for headers in receiver.request_headers:
        assert headers["authorization"] == SECRET and headers["x-tenant"] == "edge"
    if protocol == HTTP:
        assert receiver.content_encodings == (["gzip", "gzip"] if gzip else ["", ""])
        assert {h["content-type"] for h in receiver.request_headers} == {"application/x-protobuf"}
    # A failing export logs its problem and where it went: never a header value.
    receiver.fail_next = 100
    failing = _settings(receiver, protocol, "TRACES", OTEL_EXPORTER_OTLP_TIMEOUT="0.5")
    spans_fast_fail = OtlpSpanExporter(failing)
    assert spans_fast_fail.export(_spans()) == SpanExportResult.FAILURE
    assert "not exported" in caplog.text
    assert "s3cr3t" not in caplog.text
    for exporter in (spans, metrics, spans_fast_fail):
        exporter.shutdown()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_transient_failures_are_retried(receiver: OtlpReceiver, protocol: str) -> None:
    receiver.fail_next = 2
    exporter = OtlpSpanExporter(_settings(receiver, protocol, "TRACES"))
    started = time.monotonic()
    assert exporter.export(_spans()) == SpanExportResult.SUCCESS
    elapsed = time.monotonic() - started
    assert receiver.failed_requests == 2
    assert 0.8 * (1 + 2) <= elapsed < 10  # backoff 1 s, then 2 s (±20 %)
    assert {s.name for s in receiver.spans()} == {"parent", "child"}
    exporter.shutdown()


def test_a_permanent_failure_is_not_retried(receiver: OtlpReceiver) -> None:
    env = {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{receiver.http_endpoint}/no-such-path"}
    exporter = OtlpSpanExporter(_settings(receiver, HTTP, "TRACES", **env))
    started = time.monotonic()
    assert exporter.export(_spans()) == SpanExportResult.FAILURE
    assert time.monotonic() - started < 1
    assert len(receiver.request_headers) == 1  # one request, answered 404: no retry
    exporter.shutdown()


@pytest.fixture
def silent_listener() -> Iterator[int]:
    """A port that accepts TCP connections (the kernel's backlog) and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    try:
        yield int(listener.getsockname()[1])
    finally:
        listener.close()


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("collector", ["down", "silent"])
def test_a_collector_down_or_silent_costs_at_most_the_timeout(
    protocol: str, collector: str, silent_listener: int
) -> None:
    port = free_port() if collector == "down" else silent_listener
    scheme_env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
        "OTEL_EXPORTER_OTLP_TIMEOUT": "1.5",
    }
    clock = ShutdownClock()
    exporter = OtlpSpanExporter(settings(scheme_env, "TRACES"), clock)
    started = time.monotonic()
    assert exporter.export(_spans()) == SpanExportResult.FAILURE
    assert time.monotonic() - started < 1.5 + 0.5
    # Once shutdown begins, every further export ends within the timeout of that moment.
    clock.begin()
    started = time.monotonic()
    for _ in range(5):
        assert exporter.export(_spans()) == SpanExportResult.FAILURE
    assert time.monotonic() - started < 1.5 + 0.5
    exporter.shutdown()


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for localhost and 127.0.0.1, signed by its own key: (cert file, key file)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "collector.pem", tmp_path / "collector.key"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_file, key_file


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_tls_to_a_collector_its_certificate_verified(tmp_path: Path, protocol: str) -> None:
    cert_file, key_file = _self_signed(tmp_path)
    receiver = OtlpReceiver(tls=(cert_file, key_file))
    try:
        port = receiver.port if protocol == GRPC else receiver.http_port
        env = {"OTEL_EXPORTER_OTLP_PROTOCOL": protocol, "OTEL_EXPORTER_OTLP_TIMEOUT": "2"}
        https = {**env, "OTEL_EXPORTER_OTLP_ENDPOINT": f"https://localhost:{port}"}
        # Not trusted: the collector's certificate is its own, not in the system's roots.
        untrusted = OtlpSpanExporter(settings(https, "TRACES"))
        assert untrusted.export(_spans()) == SpanExportResult.FAILURE
        untrusted.shutdown()
        assert receiver.spans() == []
        trusted_env = {**https, "OTEL_EXPORTER_OTLP_CERTIFICATE": str(cert_file)}
        trusted = OtlpSpanExporter(settings(trusted_env, "TRACES"))
        assert trusted.settings.tls
        assert trusted.export(_spans()) == SpanExportResult.SUCCESS
        trusted.shutdown()
        assert {s.name for s in receiver.spans()} == {"parent", "child"}
        if protocol == GRPC:  # an http:// endpoint with INSECURE=false is TLS too, as the SDK reads it
            insecure_false = {
                **env, "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://localhost:{port}",
                "OTEL_EXPORTER_OTLP_INSECURE": "false", "OTEL_EXPORTER_OTLP_CERTIFICATE": str(cert_file),
            }
            exporter = OtlpSpanExporter(settings(insecure_false, "TRACES"))
            assert exporter.export(_spans()) == SpanExportResult.SUCCESS
            exporter.shutdown()
            assert len(receiver.spans()) == 4
    finally:
        receiver.stop()


# ---------------------------------------------------------------------------------------
# A gateway process whose collector is down.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fast_path", MODES)
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_gateway_with_its_collector_down_answers_and_exits_in_time(
    tmp_path: Path, issuer: TestIssuer, protocol: str, fast_path: bool
) -> None:
    timeout_s = 2.0
    env = {
        "OTEL_SDK_DISABLED": "false",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}",
        "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
        "OTEL_EXPORTER_OTLP_HEADERS": f"authorization={SECRET}",
        "OTEL_EXPORTER_OTLP_TIMEOUT": str(timeout_s),
        "OTEL_BSP_SCHEDULE_DELAY": "50",
        "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "8",  # many batches pending at exit
        "OTEL_METRIC_EXPORT_INTERVAL": "200",
    }
    jwks_file = issuer.write_jwks(tmp_path / "jwks.json")
    config = {"auth": {"issuers": [issuer.issuer_config(jwks_file=jwks_file)]}}
    gateway = TelemetryGateway(config, tmp_path, fast_path=fast_path, env=env)
    client = CheckClient(gateway.address)
    try:
        token = issuer.token("alice")
        slowest = 0.0
        for n in range(200):
            started = time.monotonic()
            client.check(check_request(path=f"/mcp/{n}", token=token))
            slowest = max(slowest, time.monotonic() - started)
        assert slowest < 0.5, f"a check waited {slowest:.2f}s on the collector"
        started = time.monotonic()
        assert gateway.stop(signum=signal.SIGTERM) == 0
        stopped_in = time.monotonic() - started
    finally:
        client.close()
    log = gateway.log_text()
    # The process's own exit (grace for checks in flight, interpreter shutdown) plus at most the
    # OTLP timeout for everything the collector did not take.
    assert stopped_in < timeout_s + 3, f"exit took {stopped_in:.1f}s:\n{log}"
    assert "not exported to OTLP" in log, log
    assert "s3cr3t" not in log and "Traceback" not in log, log


def test_the_attribute_cache_keeps_the_sign_of_a_zero() -> None:
    from gateway.telemetry.otlp_encoding import SpanEncoder

    encoder = SpanEncoder()
    positive = encoder.attribute(b"\x0a", "x", 0.0)
    negative = encoder.attribute(b"\x0a", "x", -0.0)  # -0.0 == 0.0: a cache on the value returns 0.0's
    assert positive != negative and negative == SpanEncoder().attribute(b"\x0a", "x", -0.0)


# ---------------------------------------------------------------------------------------
# Settings a collector must never see, or that must never reach the log.
# ---------------------------------------------------------------------------------------

NEWLINE_SECRET = "Bearer%20s3cret-nl%0Ax"  # URL-decoded: "Bearer s3cret-nl\nx"


def test_a_header_a_request_cannot_carry_is_skipped_unquoted(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    found = parse_headers(
        f"authorization={NEWLINE_SECRET},x-nul=s3cret-nul%00,x-token-bin=s3cret-bin,"
        "bad%0Akey=s3cret-key,x-utf=s3cret-%C3%A9,x-tenant=edge"
    )
    assert found == (("x-tenant", "edge"),)
    assert "s3cret" not in caplog.text
    assert "authorization ignored" in caplog.text and "x-token-bin ignored" in caplog.text


@pytest.mark.parametrize(
    ("protocol", "header"),
    [
        pytest.param(HTTP, ("authorization", "Bearer s3cret-nl\nx"), id="http-newline"),
        pytest.param(GRPC, ("authorization", "Bearer s3cret-nl\nx"), id="grpc-newline"),
        pytest.param(GRPC, ("x-token-bin", "s3cret-bin"), id="grpc-bin"),
    ],
)
def test_a_header_the_transport_refuses_fails_the_export_unquoted(
    receiver: OtlpReceiver, protocol: str, header: tuple[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    """Past parse_headers (built by hand here): the sender's catch-all, not the SDK's logger."""
    import dataclasses

    caplog.set_level(logging.DEBUG)
    good = _settings(receiver, protocol, "TRACES", OTEL_EXPORTER_OTLP_TIMEOUT="1")
    exporter = OtlpSpanExporter(dataclasses.replace(good, headers=(header,)))
    result = exporter.export(_spans())  # must not raise
    exporter.shutdown()
    assert "s3cret" not in caplog.text
    # http.client raises on the value (ValueError), grpc on a -bin key with a str (TypeError) or
    # fails the call on a bad value (INTERNAL, "Invalid metadata"): each a failed export.
    assert result == SpanExportResult.FAILURE and "not exported" in caplog.text
    if header[0].endswith("-bin") or protocol == HTTP:
        assert "(unexpected)" in caplog.text


def test_a_gateway_with_a_newline_in_a_header_exports_and_never_logs_it(
    tmp_path: Path, issuer: TestIssuer, receiver: OtlpReceiver
) -> None:
    env = {
        "OTEL_SDK_DISABLED": "false",
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.http_endpoint,
        "OTEL_EXPORTER_OTLP_PROTOCOL": HTTP,
        "OTEL_EXPORTER_OTLP_HEADERS": f"authorization={NEWLINE_SECRET},x-tenant=edge",
        "OTEL_BSP_SCHEDULE_DELAY": "50",
    }
    jwks_file = issuer.write_jwks(tmp_path / "jwks.json")
    config = {"auth": {"issuers": [issuer.issuer_config(jwks_file=jwks_file)]}}
    gateway = TelemetryGateway(config, tmp_path, fast_path=True, env=env)
    client = CheckClient(gateway.address)
    try:
        client.check(check_request(path="/mcp", token=issuer.token("alice")))
        receiver.wait_for_span(lambda s: True)
        assert gateway.stop(signum=signal.SIGTERM) == 0
    finally:
        client.close()
    log = gateway.log_text()
    assert "s3cret" not in log and "Traceback" not in log, log
    assert "OTLP header authorization ignored" in log, log
    assert receiver.request_headers and all(
        h["x-tenant"] == "edge" and "authorization" not in h for h in receiver.request_headers
    )


def test_endpoints_the_exporters_cannot_use_are_refused(caplog: pytest.LogCaptureFixture) -> None:
    from gateway.telemetry.otlp_settings import UnusableSettings

    http = {"OTEL_EXPORTER_OTLP_PROTOCOL": HTTP}
    # `collector:4318` reads as the scheme "collector": once plaintext to localhost:80.
    for endpoint in ("collector:4318", "ftp://collector:4318", "http:///v1", "http://collector:port"):
        with pytest.raises(UnusableSettings, match="not an http:// or https:// URL"):
            settings({**http, "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint}, "TRACES")
    with pytest.raises(UnusableSettings, match="traces is not an http"):
        settings({**http, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "collector:4318/v1/traces"}, "TRACES")
    for endpoint in ("http://", "collector:port", "/just/a/path", "http://:4317"):
        with pytest.raises(UnusableSettings, match="grpc endpoint for metrics does not name a host"):
            settings({"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint}, "METRICS")
    # gRPC needs no scheme, as in the SDK; gRPC's own target schemes pass as they are.
    assert settings({"OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4317"}, "TRACES").target == "collector:4317"
    assert settings({"OTEL_EXPORTER_OTLP_ENDPOINT": "dns:///c:4317"}, "TRACES").target == "dns:///c:4317"
    # user:password@ is not sent, and said so without the password.
    caplog.set_level(logging.DEBUG)
    with_userinfo = {**http, "OTEL_EXPORTER_OTLP_ENDPOINT": "https://otel:pa55word@collector:4318"}
    assert settings(with_userinfo, "TRACES").target == "https://collector:4318/v1/traces"
    grpc_userinfo = {"OTEL_EXPORTER_OTLP_ENDPOINT": "https://otel:pa55word@collector:4317"}
    assert settings(grpc_userinfo, "TRACES").target == "collector:4317"
    assert caplog.text.count("user:password@ is ignored") == 2 and "pa55word" not in caplog.text


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_missing_certificate_file_makes_the_exporter_unusable(tmp_path: Path, protocol: str) -> None:
    from gateway.telemetry.otlp_settings import UnusableSettings

    env = {
        "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
        "OTEL_EXPORTER_OTLP_ENDPOINT": "https://localhost:4317",
        "OTEL_EXPORTER_OTLP_CERTIFICATE": str(tmp_path / "missing-ca.pem"),
    }
    # Never the system's roots instead of the CA asked for, and no traceback.
    with pytest.raises(UnusableSettings, match="cannot read the OTLP certificate .*missing-ca.pem"):
        OtlpSpanExporter(settings(env, "TRACES"))
    cert_file, _ = _self_signed(tmp_path)
    client_env = {**env, "OTEL_EXPORTER_OTLP_CERTIFICATE": str(cert_file),
                  "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE": str(cert_file),
                  "OTEL_EXPORTER_OTLP_CLIENT_KEY": str(tmp_path / "missing.key")}
    with pytest.raises(UnusableSettings, match="cannot read the OTLP client key"):
        OtlpMetricExporter(settings(client_env, "METRICS"))


def test_a_gateway_with_unusable_otlp_settings_starts_with_those_signals_off(
    tmp_path: Path, issuer: TestIssuer
) -> None:
    env = {
        "OTEL_SDK_DISABLED": "false",
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": HTTP,
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"localhost:{free_port()}/v1/traces",
        "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": GRPC,
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": f"https://localhost:{free_port()}",
        "OTEL_EXPORTER_OTLP_METRICS_CERTIFICATE": str(tmp_path / "missing-ca.pem"),
        "OTEL_EXPORTER_OTLP_HEADERS": f"authorization={SECRET}",
        "OTEL_METRIC_EXPORT_INTERVAL": "200",
    }
    jwks_file = issuer.write_jwks(tmp_path / "jwks.json")
    config = {"auth": {"issuers": [issuer.issuer_config(jwks_file=jwks_file)]}}
    gateway = TelemetryGateway(config, tmp_path, fast_path=True, env=env)
    client = CheckClient(gateway.address)
    try:
        client.check(check_request(path="/mcp", token=issuer.token("alice")))
        assert gateway.stop(signum=signal.SIGTERM) == 0
    finally:
        client.close()
    log = gateway.log_text()
    assert "s3cr3t" not in log and "Traceback" not in log, log
    assert "the OTLP http/protobuf endpoint for traces is not an http:// or https:// URL" in log, log
    assert "cannot read the OTLP certificate" in log and "metrics are not exported" in log, log
    assert "telemetry: traces not exported, metrics not pushed" in log, log
    assert "not exported to OTLP" not in log, log  # nothing was tried, at localhost:80 or elsewhere


@pytest.fixture
def trickling_collector() -> Iterator[int]:
    """An HTTP server that answers 200 with a 100-byte body, one byte every 0.1 s."""
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            with connection:
                connection.recv(65536)
                try:
                    connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
                    for _ in range(100):
                        if stop.wait(0.1):
                            return
                        connection.sendall(b"x")
                except OSError:
                    continue  # the client gave up

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        stop.set()
        listener.close()
        thread.join(5)


def test_a_trickling_collector_costs_an_http_export_at_most_its_timeout(trickling_collector: int) -> None:
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{trickling_collector}",
        "OTEL_EXPORTER_OTLP_PROTOCOL": HTTP,
        "OTEL_EXPORTER_OTLP_TIMEOUT": "1",
    }
    exporter = OtlpSpanExporter(settings(env, "TRACES"))
    started = time.monotonic()
    assert exporter.export(_spans()) == SpanExportResult.FAILURE  # 10 s of trickle: cut at 1 s
    assert time.monotonic() - started < 1 + 0.3
    exporter.shutdown()


def test_the_exporters_framing_headers_win_over_a_users(receiver: OtlpReceiver) -> None:
    exporter = OtlpSpanExporter(
        _settings(receiver, HTTP, "TRACES", OTEL_EXPORTER_OTLP_HEADERS=(
            "content-type=text/plain,content-encoding=br,content-length=1,user-agent=custom-agent,x-tenant=edge"
        ))
    )
    assert exporter.export(_spans()) == SpanExportResult.SUCCESS
    exporter.shutdown()
    ((headers),) = receiver.request_headers
    assert headers["content-type"] == "application/x-protobuf" and receiver.content_encodings == [""]
    assert headers["user-agent"] == "custom-agent" and headers["x-tenant"] == "edge"
    assert {s.name for s in receiver.spans()} == {"parent", "child"}


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_failed_export_logs_no_endpoint_query_nor_collector_text(
    receiver: OtlpReceiver, protocol: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An endpoint's query can hold an API key (http.client's InvalidURL quotes it), and a
    collector's gRPC status details can echo headers: the log names the error's type or status
    code only."""
    caplog.set_level(logging.DEBUG)
    if protocol == HTTP:
        # A space in the query: http.client refuses the request line and quotes it in its error.
        endpoint = f"{receiver.http_endpoint}/v1/traces?api_key=q5ecret-key x"
        env = {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": endpoint, "OTEL_EXPORTER_OTLP_TIMEOUT": "1"}
        marker = "q5ecret"
    else:
        receiver.fail_next = 100  # UNAVAILABLE, with the receiver's own details text
        env = {"OTEL_EXPORTER_OTLP_TIMEOUT": "1"}
        marker = "failing on purpose"
    exporter = OtlpSpanExporter(_settings(receiver, protocol, "TRACES", **env))
    result = exporter.export(_spans())
    exporter.shutdown()
    receiver.fail_next = 0
    assert result == SpanExportResult.FAILURE and "not exported" in caplog.text
    assert marker not in caplog.text, caplog.text
    assert ("InvalidURL" if protocol == HTTP else "gRPC UNAVAILABLE") in caplog.text
