"""The standard OTEL_* variables, each honoured by a real gateway process exporting to a real receiver."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.telemetry.setup import service_resource
from gateway.telemetry.tracing import SPAN_NAME
from tests.support.checks import CheckClient, check_request
from tests.support.issuer import TestIssuer
from tests.support.otlp import OtlpReceiver
from tests.support.processes import GatewayProcess, wait_until
from tests.test_telemetry_fast_path import MODES, TelemetryGateway


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    found = OtlpReceiver()
    yield found
    found.stop()


def start(tmp_path: Path, issuer: TestIssuer, env: dict[str, str], fast_path: bool = True) -> GatewayProcess:
    jwks_file = issuer.write_jwks(tmp_path / "jwks.json")
    config = {"auth": {"issuers": [issuer.issuer_config(jwks_file=jwks_file)]}}
    return TelemetryGateway(config, tmp_path, fast_path=fast_path, env={"OTEL_SDK_DISABLED": "false", **env})


def resource_of(receiver: OtlpReceiver) -> dict[str, object]:
    from gateway.demo.receiver import any_value

    request = receiver.trace_requests[0] if receiver.trace_requests else receiver.metric_requests[0]
    groups = request.resource_spans if receiver.trace_requests else request.resource_metrics
    return {kv.key: any_value(kv.value) for kv in groups[0].resource.attributes}


def test_default_service_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    assert service_resource().attributes["service.name"] == "authz-gateway"
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "service.name=from-attributes,team=edge")
    assert service_resource().attributes["service.name"] == "from-attributes"
    monkeypatch.setenv("OTEL_SERVICE_NAME", "from-variable")
    assert service_resource().attributes["service.name"] == "from-variable"
    assert service_resource().attributes["team"] == "edge"


@pytest.mark.parametrize("fast_path", MODES)
def test_per_signal_traces_endpoint_over_http_with_parent_based_sampler(
    tmp_path: Path, issuer: TestIssuer, receiver: OtlpReceiver, fast_path: bool
) -> None:
    env = {
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{receiver.http_endpoint}/v1/traces",
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
        "OTEL_TRACES_SAMPLER": "parentbased_always_off",
        "OTEL_RESOURCE_ATTRIBUTES": "service.name=gw-from-attributes,deployment.environment=test",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    gateway = start(tmp_path, issuer, env, fast_path)
    client = CheckClient(gateway.address)
    try:
        # No parent: the sampler drops it. A sampled parent: the span is kept.
        client.check(check_request(path="/unsampled"))
        trace_id = uuid.uuid4().hex
        sampled_parent = [("traceparent", f"00-{trace_id}-{'1' * 16}-01")]
        client.check(check_request(path="/sampled"), metadata=sampled_parent)
        receiver.wait_for_spans(1, name=SPAN_NAME)
        time.sleep(0.5)
        spans = receiver.spans(name=SPAN_NAME)
        assert [(s.trace_id, s.attributes["url.path"]) for s in spans] == [(trace_id, "/sampled")]
        assert spans[0].service == "gw-from-attributes"
        assert resource_of(receiver)["deployment.environment"] == "test"
        assert receiver.metric_requests == []  # only traces have an endpoint
        assert "-> OTLP http/protobuf" in gateway.log_text()
    finally:
        client.close()
        gateway.stop()


@pytest.mark.parametrize("fast_path", MODES)
def test_per_signal_metrics_endpoint_and_service_name(
    tmp_path: Path, issuer: TestIssuer, receiver: OtlpReceiver, fast_path: bool
) -> None:
    env = {
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": receiver.grpc_endpoint,
        "OTEL_SERVICE_NAME": "gw-custom",
        "OTEL_METRIC_EXPORT_INTERVAL": "200",
    }
    gateway = start(tmp_path, issuer, env, fast_path)
    client = CheckClient(gateway.address)
    try:
        client.check(check_request(path="/one"))
        wait_until(lambda: receiver.metric_points("authz_checks", service="gw-custom"), what="metrics")
        assert receiver.trace_requests == []  # only metrics have an endpoint
    finally:
        client.close()
        gateway.stop()


def test_sdk_disabled_exports_nothing(tmp_path: Path, issuer: TestIssuer, receiver: OtlpReceiver) -> None:
    env = {**receiver.exporter_env("grpc"), "OTEL_SDK_DISABLED": "true"}
    gateway = start(tmp_path, issuer, env)
    client = CheckClient(gateway.address)
    try:
        for _ in range(10):
            client.check(check_request(path="/x"))
        time.sleep(1.0)  # ten times the batch delay and twice the metric interval
    finally:
        client.close()
        gateway.stop()
    assert receiver.raw_payloads == []
