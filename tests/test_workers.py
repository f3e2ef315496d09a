"""`serve --workers N`: N processes on one port (SO_REUSEPORT), sharing a SQLite store;
memory:// refused; SIGTERM to the parent stops every worker gracefully (exit 0)."""

from __future__ import annotations

import signal
import uuid
from pathlib import Path

from tests.support.checks import CheckClient
from tests.support.issuer import TestIssuer
from tests.support.processes import GatewayProcess, child_pids, tcp_sockets, wait_until


def _workers(parent: int) -> list[int]:
    # Besides the workers, multiprocessing runs a resource tracker child.
    return [pid for pid in child_pids(parent) if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]


def _config(tmp_path: Path, issuer: TestIssuer, store: str) -> dict[str, object]:
    jwks = issuer.write_jwks(tmp_path / "jwks.json")
    return {"store": store, "auth": {"issuers": [issuer.issuer_config(jwks_file=jwks)]}}


def test_two_workers_share_the_port_and_the_sessions(tmp_path: Path, issuer: TestIssuer) -> None:
    config = _config(tmp_path, issuer, f"sqlite:///{tmp_path / 'sessions.db'}")
    gateway = GatewayProcess(config, tmp_path, extra_args=["--workers", "2"])
    clients: list[CheckClient] = []
    try:
        workers = wait_until(lambda: len(_workers(gateway.proc.pid)) == 2 and _workers(gateway.proc.pid))
        # Each worker has its own listening socket on the same port (SO_REUSEPORT).
        wait_until(
            lambda: all(
                ("127.0.0.1", gateway.port, "LISTEN") in tcp_sockets(pid) for pid in workers
            ),
            what="both workers listening",
        )
        assert not any(state == "LISTEN" for *_, state in tcp_sockets(gateway.proc.pid))
        # Separate connections are spread over the workers by the kernel.
        own_connection = [("grpc.use_local_subchannel_pool", 1)]
        clients = [CheckClient(gateway.address, own_connection) for _ in range(16)]
        session = f"s-{uuid.uuid4()}"
        alice, bob = issuer.token("alice"), issuer.token("bob")
        assert clients[0].status(token=alice, session_id=session) == 200
        for client in clients:  # every worker sees the one binding
            assert client.status(token=alice, session_id=session) == 200
            assert client.status(token=bob, session_id=session) == 404
        connection = ("127.0.0.1", gateway.port, "ESTABLISHED")
        served_by = {pid: tcp_sockets(pid).count(connection) for pid in workers}
        assert all(count > 0 for count in served_by.values()), served_by
        assert sum(served_by.values()) == 16
        # SIGHUP to the parent reaches every worker: each reloads its policies.
        gateway.send(signal.SIGHUP)
        wait_until(lambda: gateway.log_text().count("policies reloaded") == 2, what="both workers reloaded")
    finally:
        for client in clients:
            client.close()
        gateway.send(signal.SIGTERM)
        code = gateway.proc.wait(20)
        log = gateway.log_text()
        gateway.stop()
    assert code == 0, log
    assert log.count("stopped") >= 2 and "all workers stopped" in log
    for pid in workers:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


def test_memory_store_with_several_workers_is_refused(tmp_path: Path, issuer: TestIssuer) -> None:
    config = _config(tmp_path, issuer, "memory://")
    gateway = GatewayProcess(config, tmp_path, extra_args=["--workers", "3"], wait=False)
    code = gateway.proc.wait(20)
    log = gateway.log_text()
    gateway.stop()
    assert code == 2
    assert "--workers 3 needs a session store shared by the processes: memory:// is private" in log
