"""A policy set without a single enforcing policy protects nothing: it is refused, not served.

Start, reload and `policy check`, each through the installed command in a subprocess (and
one reload in process), with real keys and policies.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gateway.policy.loader import default_policy_dir
from tests.support.inprocess import InProcessGateway
from tests.support.issuer import TestIssuer
from tests.support.processes import REPO, GatewayProcess, free_port

COMMAND = [sys.executable, "-m", "gateway"]
AUDIT_ONLY = (REPO / "examples/policies/audit-mode/30-protocol-version-audit.yaml").read_text()


def _unprotected(tmp_path: Path, kind: str) -> Path:
    directory = tmp_path / kind
    directory.mkdir()
    if kind == "only-test-files":
        shutil.copy(default_policy_dir() / "10-mcp-session-binding_test.yaml", directory)
    elif kind == "only-audit":
        (directory / "30-audit.yaml").write_text(AUDIT_ONLY)
    return directory


def _serve(tmp_path: Path, policies: Path, **settings: object) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "gateway.yaml"
    listen = f"127.0.0.1:{free_port()}"
    config.write_text(yaml.safe_dump({"policies": str(policies), "listen": listen, **settings}))
    return subprocess.run(
        [*COMMAND, "serve", "--config", str(config)], capture_output=True, text=True, timeout=60, cwd=REPO
    )


@pytest.mark.parametrize("kind", ["empty", "only-test-files", "only-audit"])
def test_serving_an_unprotected_directory_is_refused(tmp_path: Path, kind: str) -> None:
    result = _serve(tmp_path, _unprotected(tmp_path, kind))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if not line[:4].isdigit()]
    assert len(errors) == 1 and "no enforcing policy" in errors[0], result.stderr
    assert "allow_no_enforcing_policy: true" in errors[0]


def test_a_policies_path_that_is_a_file_is_refused(tmp_path: Path) -> None:
    file = tmp_path / "policy.yaml"
    file.write_text(AUDIT_ONLY)
    result = _serve(tmp_path, file)
    assert result.returncode == 2 and "not a directory" in result.stderr and "Traceback" not in result.stderr


def test_the_explicit_switch_serves_it_and_says_so(tmp_path: Path) -> None:
    policies = _unprotected(tmp_path, "only-audit")
    gateway = GatewayProcess({"policies": str(policies), "allow_no_enforcing_policy": True}, tmp_path)
    try:
        log = gateway.log_text()
        assert "WARNING" in log and "no enforcing policy in" in log
        assert f"policy protocol-version-audit loaded (audit) from {policies / '30-audit.yaml'}" in log
    finally:
        assert gateway.stop() == 0


def test_each_policy_is_named_at_start(tmp_path: Path) -> None:
    directory = REPO / "examples/policies/tool-scopes"
    gateway = GatewayProcess({"policies": str(directory)}, tmp_path)
    try:
        log = gateway.log_text().splitlines()
        lines = [line.split(" policy ", 1)[1] for line in log if " policy " in line and " loaded " in line]
        assert lines == [
            f"mcp-session-binding loaded (enforce) from {directory}/10-mcp-session-binding.yaml",
            f"tool-scopes loaded (enforce) from {directory}/20-tool-scopes.yaml",
        ]
    finally:
        assert gateway.stop() == 0


def test_a_reload_that_would_empty_the_set_keeps_the_last_good_one(tmp_path: Path) -> None:
    idp = TestIssuer(serve=False)
    policies = tmp_path / "policies"
    policies.mkdir()
    shutil.copy(default_policy_dir() / "10-mcp-session-binding.yaml", policies)
    config = {
        "auth": {"issuers": [idp.issuer_config(jwks_file=idp.write_jwks(tmp_path / "jwks.json"))]},
        "policies": str(policies),
    }
    gateway = InProcessGateway(config, tmp_path)
    try:
        alice, mallory = idp.token("alice"), idp.token("mallory")
        assert gateway.client.status(token=alice, session_id="s-1") == 200
        (policies / "10-mcp-session-binding.yaml").unlink()
        assert gateway.gateway.reload_policies() is False
        # Still bound: another identity on alice's session is refused, as before the edit.
        assert gateway.client.status(token=mallory, session_id="s-1") == 404
        assert [p.name for p in gateway.gateway.policies.current.policies] == ["mcp-session-binding"]
    finally:
        gateway.stop()


@pytest.mark.parametrize("kind", ["empty", "only-audit"])
def test_policy_check_says_it_would_be_refused(tmp_path: Path, kind: str) -> None:
    directory = _unprotected(tmp_path, kind)
    result = subprocess.run(
        [*COMMAND, "policy", "check", str(directory)], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "no enforcing policy" in result.stdout and "the set would be rejected" in result.stdout
