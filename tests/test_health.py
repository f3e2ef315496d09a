"""gRPC health (grpc.health.v1): SERVING only once the policies and the keys are loaded."""

from __future__ import annotations

import time
from pathlib import Path

from tests.support.checks import CheckClient, check_request, denied_headers, http_status
from tests.support.issuer import TestIssuer
from tests.support.processes import GatewayProcess, health_status, wait_until

CHECK_SERVICE = "envoy.service.auth.v3.Authorization"


def test_serving_with_a_jwks_file(tmp_path: Path) -> None:
    idp = TestIssuer("ES256", serve=False)
    config = {"auth": {"issuers": [idp.issuer_config(jwks_file=idp.write_jwks(tmp_path / "jwks.json"))]}}
    gateway = GatewayProcess(config, tmp_path)  # waits for SERVING on ""
    try:
        assert health_status(gateway.address, CHECK_SERVICE) == "SERVING"
        assert health_status(gateway.address, "no.such.Service") == "NOT_FOUND"
    finally:
        assert gateway.stop() == 0


def test_not_serving_until_the_jwks_endpoint_answers(tmp_path: Path, issuer: TestIssuer) -> None:
    issuer.fail_jwks = True  # the IdP is down when the gateway starts
    gateway = GatewayProcess({"auth": {"issuers": [issuer.issuer_config()]}}, tmp_path, wait=False)
    client = CheckClient(gateway.address)
    try:
        wait_until(lambda: health_status(gateway.address) != "UNAVAILABLE", timeout=20, what="health answers")
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:  # it keeps trying, and keeps saying so
            assert health_status(gateway.address) == "NOT_SERVING"
            assert health_status(gateway.address, CHECK_SERVICE) == "NOT_SERVING"
            time.sleep(0.2)
        assert issuer.jwks_requests >= 2
        # Without keys, a check with a perfectly good token is refused, never allowed.
        response = client.check(check_request(token=issuer.token()))
        assert http_status(response) == 401
        assert 'error="invalid_token"' in denied_headers(response)["www-authenticate"]

        issuer.fail_jwks = False  # the IdP comes back
        wait_until(lambda: health_status(gateway.address) == "SERVING", timeout=10, what="SERVING")
        assert health_status(gateway.address, CHECK_SERVICE) == "SERVING"
        assert http_status(client.check(check_request(token=issuer.token()))) == 200
    finally:
        client.close()
        assert gateway.stop() == 0


def test_a_broken_policy_directory_never_serves(tmp_path: Path) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "10-broken.yaml").write_text("name: broken\nrules: [\n")
    gateway = GatewayProcess({"policies": str(policies)}, tmp_path, wait=False)
    try:
        wait_until(lambda: not gateway.alive(), timeout=20, what="the gateway exits")
        assert gateway.proc.returncode == 2
        assert "10-broken.yaml" in gateway.log_text()
    finally:
        gateway.stop()
