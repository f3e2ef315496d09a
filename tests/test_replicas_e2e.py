"""Two gateway replicas behind one real Envoy (round robin), sharing one real redis-server.

Which replica answered each request is read from Envoy's own per-host counters, so every
claim below ("on both replicas") is checked on both, not assumed.
"""

from __future__ import annotations

import http.client
import json
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gateway.config import MCP_SDK_SESSION_NOT_FOUND_BODY
from tests.support.issuer import TestIssuer
from tests.support.processes import (
    EnvoyProcess,
    GatewayProcess,
    IssuingUpstream,
    RecordingUpstream,
    RedisServer,
    envoy_config,
    free_port,
    split_process_cluster,
    wait_for_port,
)


@dataclass
class Stack:
    idp: TestIssuer
    redis: RedisServer
    replicas: dict[int, GatewayProcess]  # by port
    envoy: EnvoyProcess
    upstream: Any
    listener_port: int
    admin_port: int

    def _served(self, cluster: str = "authz_gateway") -> dict[int, int]:
        """Requests per replica: Checks (`authz_gateway`) or Process streams (`authz_gateway_process`)."""
        connection = http.client.HTTPConnection("127.0.0.1", self.admin_port, timeout=5)
        connection.request("GET", "/clusters")
        text = connection.getresponse().read().decode()
        connection.close()
        counts = {}
        for port in self.replicas:
            found = re.search(rf"^{cluster}::127\.0\.0\.1:{port}::rq_total::(\d+)$", text, re.MULTILINE)
            counts[port] = int(found.group(1)) if found else 0
        return counts

    def send(
        self, session: str, subject: str | None, method: str = "POST", extra: dict[str, str] | None = None
    ) -> tuple[int, bytes, int]:
        """(status, body, the port of the replica that answered the check)."""
        before = self._served()
        headers = {"content-type": "application/json", **(extra or {})}
        if session:
            headers["mcp-session-id"] = session
        if subject is not None:
            headers["authorization"] = f"Bearer {self.idp.token(subject)}"  # a fresh token every time
        body = b'{"jsonrpc":"2.0","id":1,"method":"tools/list"}' if method == "POST" else None
        connection = http.client.HTTPConnection("127.0.0.1", self.listener_port, timeout=10)
        connection.request(method, "/mcp", body=body, headers=headers)
        response = connection.getresponse()
        reply = response.status, response.read()
        connection.close()
        after = self._served()
        replica = [port for port in self.replicas if after[port] > before[port]]
        assert len(replica) == 1, (before, after)
        return reply[0], reply[1], replica[0]

    def on_both(self, session: str, subject: str | None, method: str = "POST") -> set[tuple[int, bytes]]:
        """Send until each replica has answered at least once; the distinct (status, body) seen."""
        seen: set[int] = set()
        answers = set()
        for _ in range(8):
            status, body, replica = self.send(session, subject, method)
            seen.add(replica)
            answers.add((status, body))
            if seen == set(self.replicas):
                return answers
        raise AssertionError(f"round robin reached only {seen}")


def _stack(tmp_path: Path, upstream: Any, **session: Any) -> Stack:
    idp = TestIssuer(serve=False)
    jwks = idp.write_jwks(tmp_path / "jwks.json")
    redis = RedisServer(tmp_path)
    config = {
        "store": redis.url,
        "auth": {"issuers": [idp.issuer_config(jwks_file=jwks)]},
        "session": {"store_timeout": "250ms", **session},
    }
    replicas = [GatewayProcess(config, tmp_path, name=f"replica-{i}") for i in (1, 2)]
    listener_port, admin_port = free_port(), free_port()
    text = envoy_config(
        listener_port=listener_port, admin_port=admin_port,
        gateway_ports=[r.port for r in replicas], upstream_port=upstream.port,
    )
    # Checks and Process streams counted apart: each request opens both.
    envoy = EnvoyProcess(split_process_cluster(text), tmp_path)
    wait_for_port(admin_port, 30)
    wait_for_port(listener_port, 30)
    return Stack(idp, redis, {r.port: r for r in replicas}, envoy, upstream, listener_port, admin_port)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    built = _stack(tmp_path, RecordingUpstream())
    yield built
    _stop(built)


def _stop(built: Stack) -> None:
    built.envoy.stop()
    built.upstream.stop()
    for replica in built.replicas.values():
        assert replica.stop() == 0, replica.log_text()
    built.redis.stop()


UNAVAILABLE = json.dumps({"error": "unavailable"}, separators=(",", ":")).encode()
NOT_FOUND = MCP_SDK_SESSION_NOT_FOUND_BODY.encode()


def test_two_replicas_share_sessions_and_fail_closed_together(stack: Stack, tmp_path: Path) -> None:
    session = f"s-{uuid.uuid4()}"
    status, _, bound_by = stack.send(session, "alice")
    assert status == 200
    # A refreshed token (new jti and iat, same iss + sub) through the other replica.
    for _ in range(4):
        status, _, replica = stack.send(session, "alice")
        assert status == 200
        if replica != bound_by:
            break
    else:
        raise AssertionError("the other replica never answered")

    # Another identity is refused on both, with the same 404 an unknown session gets.
    assert stack.on_both(session, "mallory") == {(404, NOT_FOUND)}
    assert stack.on_both(session, "alice") == {(200, b'{"ok": true, "path": "/mcp"}')}

    # The owner's DELETE through one replica ends the session for both.
    status, _, _ = stack.send(session, "alice", method="DELETE")
    assert status == 200
    assert stack.on_both(session, "alice") == {(404, NOT_FOUND)}
    assert stack.on_both(session, "bob") == {(404, NOT_FOUND)}  # never re-bound
    passed = len(stack.upstream.requests)

    # redis-server gone: both replicas deny with the gateway's own 503 (fail closed).
    port = stack.redis.port
    stack.redis.kill()
    assert stack.on_both(f"s-{uuid.uuid4()}", "alice") == {(503, UNAVAILABLE)}
    assert stack.on_both(session, "alice") == {(503, UNAVAILABLE)}
    assert len(stack.upstream.requests) == passed  # nothing reached the upstream

    # redis-server back on the same port (empty: no persistence): both recover, no restart.
    stack.redis = RedisServer(tmp_path, port=port, name="redis-restarted")
    fresh = f"s-{uuid.uuid4()}"
    status, _, _ = stack.send(fresh, "alice")
    assert status == 200
    assert stack.on_both(fresh, "alice") == {(200, b'{"ok": true, "path": "/mcp"}')}
    assert stack.on_both(fresh, "mallory") == {(404, NOT_FOUND)}
    for replica in stack.replicas.values():
        assert replica.alive()


@pytest.fixture
def issuing_stack(tmp_path: Path) -> Iterator[Stack]:
    built = _stack(tmp_path, IssuingUpstream(), bind_on="response")
    yield built
    _stop(built)


def test_a_bind_at_issuance_by_one_replica_is_honoured_by_the_other(issuing_stack: Stack) -> None:
    stack = issuing_stack
    for attempt in range(4):
        session = f"issued-{uuid.uuid4()}"
        # Unknown until a response issues it: on both replicas.
        assert stack.on_both(session, "alice") == {(404, NOT_FOUND)}
        before = stack._served("authz_gateway_process")
        status, _, checked_by = stack.send("", "alice", extra={"x-issue": session})
        after = stack._served("authz_gateway_process")
        assert status == 200
        processed_by = [port for port in stack.replicas if after[port] > before[port]]
        assert len(processed_by) == 1, (before, after)
        if processed_by[0] != checked_by or attempt == 3:
            break
    # Bound by the replica that saw the response; honoured by both, for alice only.
    assert stack.on_both(session, "alice") == {(200, b'{"jsonrpc":"2.0","id":1,"result":{}}')}
    assert stack.on_both(session, "mallory") == {(404, NOT_FOUND)}
    # Issued again to someone else, through either replica: never delivered.
    for _ in range(2):
        status, body, _ = stack.send("", "mallory", extra={"x-issue": session})
        assert status == 502 and session.encode() not in body
    assert stack.on_both(session, "alice") == {(200, b'{"jsonrpc":"2.0","id":1,"result":{}}')}
