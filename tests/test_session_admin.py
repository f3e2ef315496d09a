"""Operators: the `authz-gateway sessions` command and the gRPC admin API of a served
gateway, and the generated code matching proto/ (regenerated here and compared): the admin
API's (gateway/adminpb), Envoy's (gateway/envoy_api) and OTLP's (gateway/otlp_api)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.checks import CheckClient
from tests.support.issuer import TestIssuer
from tests.support.processes import REPO, GatewayProcess, free_port, tcp_sockets

GENERATED = ("admin_pb2.py", "admin_pb2.pyi", "admin_pb2_grpc.py")


def _generated_files(root: Path) -> dict[str, bytes]:
    """Every file under root but its own __init__.py (written by hand), by relative path."""
    return {
        path.relative_to(root).as_posix(): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file() and "__pycache__" not in path.parts and path != root / "__init__.py"
    }


def test_checked_in_generated_code_is_what_the_protos_generate(tmp_path: Path) -> None:
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "gen-proto.sh"), str(tmp_path)],
        env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    for name in GENERATED:
        fresh = (tmp_path / "adminpb" / name).read_bytes()
        checked_in = (REPO / "gateway" / "adminpb" / name).read_bytes()
        assert fresh == checked_in, f"gateway/adminpb/{name} differs: run scripts/gen-proto.sh"
    # gateway/envoy_api and gateway/otlp_api: the whole trees, so a module missing, left over or
    # edited is caught.
    expected = {
        "envoy_api": ("envoy/service/auth/v3/external_auth_pb2_grpc.py",
                      "envoy/service/ext_proc/v3/external_processor_pb2_grpc.py"),
        "otlp_api": ("opentelemetry/proto/collector/trace/v1/trace_service_pb2.py",
                     "opentelemetry/proto/collector/metrics/v1/metrics_service_pb2.py"),
    }
    for package, must_have in expected.items():
        fresh_tree = _generated_files(tmp_path / package)
        checked_in_tree = _generated_files(REPO / "gateway" / package)
        for name in must_have:
            assert name in fresh_tree, name
        assert sorted(fresh_tree) == sorted(checked_in_tree), f"gateway/{package}: run scripts/gen-proto.sh"
        for name, content in fresh_tree.items():
            differs = f"gateway/{package}/{name} differs: run scripts/gen-proto.sh"
            assert content == checked_in_tree[name], differs


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "gateway", "sessions", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=REPO)


Served = tuple[GatewayProcess, int, str, Path]


@pytest.fixture
def served(tmp_path: Path, issuer: TestIssuer) -> Iterator[Served]:
    """A gateway process on a SQLite store, its admin API on loopback, and a file holding an
    admin token (the issuer's, with the admin scope). tests/test_admin_auth.py has every way
    into the admin API and out of it."""
    admin_port = free_port()
    store = f"sqlite:///{tmp_path / 'sessions.db'}"
    config = {
        "store": store,
        "auth": {"issuers": [issuer.issuer_config(jwks_file=issuer.write_jwks(tmp_path / "jwks.json"))]},
        "admin": {"listen": f":{admin_port}", "token_issuer": issuer.issuer},
    }
    token_file = tmp_path / "admin.token"
    token_file.write_text(issuer.token("operator", scope="authz-gateway:admin"))
    gateway = GatewayProcess(config, tmp_path)
    yield gateway, admin_port, store, token_file
    assert gateway.stop() == 0


def test_sessions_cli_on_the_store_and_through_the_admin_api(served: Served, issuer: TestIssuer) -> None:
    gateway, admin_port, store, token_file = served
    client = CheckClient(gateway.address)
    alice_token = issuer.token("alice")
    ids = [f"s-{uuid.uuid4()}" for _ in range(3)]
    try:
        for session in ids[:2]:
            assert client.status(token=alice_token, session_id=session) == 200
        assert client.status(token=issuer.token("bob"), session_id=ids[2]) == 200

        listed = cli("list", "--store", store)
        assert listed.returncode == 0, listed.stderr
        lines = listed.stdout.splitlines()
        assert lines[0].split() == ["ID", "STATE", "CREATED", "ISSUER", "SUBJECT"]
        rows = {line.split()[0]: line.split() for line in lines[1:]}
        assert set(rows) == set(ids)
        assert rows[ids[0]][1] == "live" and rows[ids[0]][3:] == [issuer.issuer, "alice"]
        assert alice_token not in listed.stdout

        shown = cli("show", ids[2], "--store", store, "--json")
        assert json.loads(shown.stdout)["bound"] == {"iss": issuer.issuer, "sub": "bob"}

        # Revoke one through the CLI on the store, the others through the admin API.
        revoked = cli("revoke", ids[0], "--store", store)
        assert revoked.returncode == 0 and "was live" in revoked.stdout
        assert client.status(token=alice_token, session_id=ids[0]) == 404
        # The admin API refuses a caller without the token.
        admin_address = f"127.0.0.1:{admin_port}"
        all_of_alice = ["revoke-subject", "--iss", issuer.issuer, "--sub", "alice"]
        unauthenticated = cli(*all_of_alice, "--admin", admin_address)
        assert unauthenticated.returncode == 2 and "UNAUTHENTICATED" in unauthenticated.stderr
        assert client.status(token=alice_token, session_id=ids[1]) == 200
        admin = [admin_address, "--admin-token-file", str(token_file)]
        by_subject = cli(*all_of_alice, "--admin", *admin)
        assert by_subject.returncode == 0 and by_subject.stdout.strip() == "revoked 1 session", by_subject
        assert client.status(token=alice_token, session_id=ids[1]) == 404
        assert client.status(token=issuer.token("bob"), session_id=ids[2]) == 200
        through_api = cli("list", "--admin", *admin, "--json")
        states = {row["id"]: row["state"] for row in map(json.loads, through_api.stdout.splitlines())}
        assert states == {ids[0]: "revoked", ids[1]: "revoked", ids[2]: "live"}
        assert cli("show", f"s-{uuid.uuid4()}", "--admin", *admin).returncode == 1
        invalid = cli("revoke", "not valid", "--admin", *admin)
        assert invalid.returncode == 2 and "visible ASCII" in invalid.stderr
    finally:
        client.close()
    # Log lines carry no session id and no token; a revoke names who asked for it.
    log = gateway.log_text()
    caller = f"token of iss={issuer.issuer} sub=operator"
    assert f"admin: revoked 1 session(s) of one identity, asked by {caller}" in log
    assert not any(session in log for session in ids) and alice_token not in log
    assert token_file.read_text() not in log


def test_admin_api_listens_on_loopback_only_when_configured(
    served: Served, tmp_path: Path, issuer: TestIssuer
) -> None:
    gateway, admin_port, _, _ = served
    listening = {(host, port) for host, port, state in tcp_sockets(gateway.proc.pid) if state == "LISTEN"}
    assert listening == {("127.0.0.1", gateway.port), ("127.0.0.1", admin_port)}
    config = {"auth": {"issuers": [issuer.issuer_config(jwks_file=issuer.write_jwks(tmp_path / "j2.json"))]}}
    plain = GatewayProcess(config, tmp_path, name="no-admin")
    try:
        ports = {port for _, port, state in tcp_sockets(plain.proc.pid) if state == "LISTEN"}
        assert ports == {plain.port}  # no admin API unless admin.listen is set
    finally:
        assert plain.stop() == 0


def test_memory_store_needs_the_admin_api() -> None:
    result = cli("list", "--store", "memory://")
    assert result.returncode == 2
    assert "memory:// lives inside one gateway process" in result.stderr and "--admin" in result.stderr
