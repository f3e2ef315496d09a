"""Nothing lost at shutdown: SIGTERM flushes every pending span and metric before exit.

The batch delay and the metric interval are set far beyond the test's length, so
whatever reaches the receiver was sent by the shutdown flush itself. With the telemetry
fast path and without it (the plain SDK).
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from gateway.telemetry.tracing import SPAN_NAME
from tests.support.checks import CheckClient, check_request
from tests.support.issuer import TestIssuer
from tests.support.otlp import OtlpReceiver
from tests.test_telemetry_fast_path import MODES, TelemetryGateway

CHECKS = 300


@pytest.mark.parametrize("fast_path", MODES)
@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_sigterm_flushes_every_span_and_metric(
    tmp_path: Path, issuer: TestIssuer, protocol: str, fast_path: bool
) -> None:
    receiver = OtlpReceiver()
    env = {
        **receiver.exporter_env(protocol),
        "OTEL_BSP_SCHEDULE_DELAY": "60000",
        "OTEL_BSP_MAX_QUEUE_SIZE": str(CHECKS * 2),
        "OTEL_METRIC_EXPORT_INTERVAL": "60000",
    }
    jwks_file = issuer.write_jwks(tmp_path / "jwks.json")
    config = {"auth": {"issuers": [issuer.issuer_config(jwks_file=jwks_file)]}}
    gateway = TelemetryGateway(config, tmp_path, fast_path=fast_path, env=env)
    client = CheckClient(gateway.address)
    try:
        token = issuer.token("alice")
        for n in range(CHECKS):
            client.check(check_request(path=f"/mcp/{n}", token=token if n % 2 else None))
        assert receiver.spans(name=SPAN_NAME) == []  # nothing exported yet: all of it is pending
        started = time.monotonic()
        assert gateway.stop(signum=signal.SIGTERM) == 0
        assert time.monotonic() - started < 10
    finally:
        client.close()
    try:
        spans = receiver.spans(service="authz-gateway", name=SPAN_NAME)
        assert sorted(s.attributes["url.path"] for s in spans) == sorted(f"/mcp/{n}" for n in range(CHECKS))
        counts = {
            attrs["reason"]: point.as_int
            for attrs, point in receiver.metric_points("authz_checks", service="authz-gateway")
        }
        assert counts == {"allowed": CHECKS // 2, "token_missing": CHECKS // 2}
    finally:
        receiver.stop()
