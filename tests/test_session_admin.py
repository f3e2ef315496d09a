"""Operators: the `authz-gateway sessions` command and the gRPC admin API of a served
gateway, and the generated admin code matching proto/ (regenerated here and compared)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.support.checks import CheckClient
from tests.support.issuer import TestIssuer
from tests.support.processes import REPO, GatewayProcess, free_port, tcp_sockets

GENERATED = ("admin_pb2.py", "admin_pb2.pyi", "admin_pb2_grpc.py")


def test_checked_in_admin_code_is_what_the_proto_generates(tmp_path: Path) -> None:
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "gen-proto.sh"), str(tmp_path)],
        env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    for name in GENERATED:
        fresh = (tmp_path / name).read_bytes()
        checked_in = (REPO / "gateway" / "adminpb" / name).read_bytes()
        assert fresh == checked_in, f"gateway/adminpb/{name} differs: run scripts/gen-proto.sh"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "gateway", "sessions", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=REPO)


@pytest.fixture
def served(tmp_path: Path, issuer: TestIssuer) -> tuple[GatewayProcess, int, str]:
    """A gateway process on a SQLite store, its admin API on loopback."""
    admin_port = free_port()
    store = f"sqlite:///{tmp_path / 'sessions.db'}"
    config = {
        "store": store,
        "auth": {"issuers": [issuer.issuer_config(jwks_file=issuer.write_jwks(tmp_path / "jwks.json"))]},
        "admin": {"listen": f":{admin_port}"},
    }
    gateway = GatewayProcess(config, tmp_path)
    yield gateway, admin_port, store
    assert gateway.stop() == 0


def test_sessions_cli_on_the_store_and_through_the_admin_api(
    served: tuple[GatewayProcess, int, str], issuer: TestIssuer
) -> None:
    gateway, admin_port, store = served
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
        admin = f"127.0.0.1:{admin_port}"
        by_subject = cli("revoke-subject", "--iss", issuer.issuer, "--sub", "alice", "--admin", admin)
        assert by_subject.returncode == 0 and by_subject.stdout.strip() == "revoked 1 session", by_subject
        assert client.status(token=alice_token, session_id=ids[1]) == 404
        assert client.status(token=issuer.token("bob"), session_id=ids[2]) == 200
        through_api = cli("list", "--admin", admin, "--json")
        states = {row["id"]: row["state"] for row in map(json.loads, through_api.stdout.splitlines())}
        assert states == {ids[0]: "revoked", ids[1]: "revoked", ids[2]: "live"}
        assert cli("show", f"s-{uuid.uuid4()}", "--admin", admin).returncode == 1
        invalid = cli("revoke", "not valid", "--admin", admin)
        assert invalid.returncode == 2 and "visible ASCII" in invalid.stderr
    finally:
        client.close()
    # Log lines carry no session id and no token.
    log = gateway.log_text()
    assert "admin: revoked 1 session(s) of one identity" in log
    assert not any(session in log for session in ids) and alice_token not in log


def test_admin_api_listens_on_loopback_only_when_configured(
    served: tuple[GatewayProcess, int, str], tmp_path: Path, issuer: TestIssuer
) -> None:
    gateway, admin_port, _ = served
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
