"""The session lifecycle through real gRPC Check, on each store: terminate by the owner's
DELETE, DELETE by someone else, expiry, legacy records, the per-identity cap, malformed
ids, and revocation through the admin API.

The HTTP status comes from the CheckResponse on the wire; the reason code from the
gateway's recorded decision (clients only see the public error).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from gateway import decision
from gateway.adminpb import admin_pb2, admin_pb2_grpc
from gateway.session.admin_api import Refused, start_admin_server
from tests.support.checks import check_request, http_status
from tests.support.inprocess import InProcessGateway
from tests.support.issuer import TestIssuer

KINDS = ("memory", "sqlite", "redis")


@pytest.fixture(scope="module")
def idp() -> TestIssuer:
    return TestIssuer(serve=False)


class Client:
    """Asks one in-process gateway; returns (status on the wire, reason code)."""

    def __init__(self, gateway: InProcessGateway, idp: TestIssuer) -> None:
        self.gateway = gateway
        self.idp = idp

    def ask(
        self, session_id: str | None, subject: str | None = "alice", method: str = "POST"
    ) -> tuple[int, str]:
        token = self.idp.token(subject) if subject is not None else None
        response = self.gateway.client.check(check_request(method=method, token=token, session_id=session_id))
        return http_status(response), self.gateway.last.reason


Start = Callable[..., Client]


@pytest.fixture(params=KINDS)
def start(request: pytest.FixtureRequest, tmp_path: Path, idp: TestIssuer) -> Iterator[Start]:
    kind = request.param
    jwks_file = idp.write_jwks(tmp_path / "jwks.json")
    running: list[InProcessGateway] = []

    def factory(**session: Any) -> Client:
        if kind == "memory":
            store = "memory://"
        elif kind == "sqlite":
            store = f"sqlite:///{tmp_path / f'sessions-{len(running)}.db'}"
        else:
            store = request.getfixturevalue("redis_server").url
        config = {
            "store": store,
            "auth": {"issuers": [idp.issuer_config(jwks_file=jwks_file)]},
            "session": {"key_prefix": f"lifecycle:{uuid.uuid4().hex[:8]}:", **session},
        }
        gateway = InProcessGateway(config)
        running.append(gateway)
        return Client(gateway, idp)

    yield factory
    for gateway in running:
        gateway.stop()


def new_id() -> str:
    return str(uuid.uuid4())


def test_owner_delete_terminates_and_the_id_is_never_rebound(start: Start) -> None:
    c = start()
    session = new_id()
    assert c.ask(session, "alice") == (200, decision.ALLOWED)
    assert c.ask(session, "alice", method="DELETE") == (200, decision.ALLOWED)
    assert c.ask(session, "alice") == (404, decision.SESSION_TERMINATED)
    assert c.ask(session, "bob") == (404, decision.SESSION_TERMINATED)
    assert c.ask(session, "alice", method="DELETE") == (404, decision.SESSION_TERMINATED)


def test_delete_by_another_identity_is_404_and_the_session_stays(start: Start) -> None:
    c = start()
    session = new_id()
    assert c.ask(session, "alice") == (200, decision.ALLOWED)
    assert c.ask(session, "mallory", method="DELETE") == (404, decision.SUBJECT_MISMATCH)
    assert c.ask(session, None, method="DELETE") == (401, decision.TOKEN_MISSING)
    assert c.ask(session, "alice") == (200, decision.ALLOWED)
    assert c.ask(session, "alice", method="DELETE") == (200, decision.ALLOWED)


def test_ttl_expiry_is_404_session_expired_for_a_whole_further_ttl(start: Start) -> None:
    c = start(ttl="2s", idle_timeout="20s")
    session = new_id()
    assert c.ask(session, "alice") == (200, decision.ALLOWED)
    time.sleep(0.8)
    assert c.ask(session, "alice") == (200, decision.ALLOWED)
    time.sleep(1.6)
    assert c.ask(session, "alice") == (404, decision.SESSION_EXPIRED)
    written = time.time()
    # Past the session's own created_at + ttl, the id is still refused to everyone.
    for who in ("bob", "alice", "bob"):
        time.sleep(0.4)
        assert c.ask(session, who) == (404, decision.SESSION_EXPIRED), who
    assert time.time() - written < 2.0
    time.sleep(max(0.0, written + 2.6 - time.time()))
    assert c.ask(session, "bob") == (200, decision.ALLOWED)  # a ttl after the 404: a new id
    assert c.gateway.last.session_new


def test_idle_expiry_refuses_the_id_instead_of_binding_it_to_someone_else(start: Start) -> None:
    """F6: someone who once saw alice's session id waits until she is idle, then presents it."""
    c = start(ttl="1h", idle_timeout="400ms")
    session, other = new_id(), new_id()
    assert c.ask(session, "alice") == (200, decision.ALLOWED)
    assert c.ask(other, "alice") == (200, decision.ALLOWED)
    time.sleep(0.7)
    assert c.ask(session, "mallory") == (404, decision.SESSION_EXPIRED)
    assert not c.gateway.last.session_new
    assert c.ask(session, "mallory") == (404, decision.SESSION_EXPIRED)
    assert c.ask(session, "alice") == (404, decision.SESSION_EXPIRED)
    # The owner first: the same.
    assert c.ask(other, "alice") == (404, decision.SESSION_EXPIRED)
    assert c.ask(other, "mallory") == (404, decision.SESSION_EXPIRED)
    # A new id works as ever.
    fresh = new_id()
    assert c.ask(fresh, "alice") == (200, decision.ALLOWED)
    assert c.gateway.last.session_new


@pytest.mark.parametrize(
    "record",
    [
        {"anonymous": False, "created_at": 1.0, "bound": {"sub": "alice"}},
        {"schema": 1, "created_at": 1.0, "vmcp.token.hash": "ab" * 32, "vmcp.token.salt": "cd" * 8},
        {"schema": 1, "created_at": 1.0, "bound": {"sub": "alice"}, "session": {"token_hash": "00" * 32}},
    ],
    ids=["no-schema", "vmcp-token-hash", "token_hash"],
)
def test_legacy_record_is_404_deleted_and_never_rebound(start: Start, record: dict[str, Any]) -> None:
    c = start()
    session = new_id()
    store = c.gateway.gateway.store
    store.write_raw(session, {**record, "created_at": time.time()}, time.time())
    assert c.ask(session, "alice") == (404, decision.SESSION_LEGACY_FORMAT)
    replaced = store.load(session, time.time())
    assert replaced is not None and replaced.data["ended"] == "legacy" and "token" not in repr(replaced.data)
    assert c.ask(session, "alice") == (404, decision.SESSION_LEGACY_FORMAT)
    assert c.ask(session, "bob") == (404, decision.SESSION_LEGACY_FORMAT)


def test_per_identity_cap_is_429(start: Start) -> None:
    c = start(max_per_identity=2)
    first, second, third = new_id(), new_id(), new_id()
    assert c.ask(first, "alice") == (200, decision.ALLOWED)
    assert c.ask(second, "alice") == (200, decision.ALLOWED)
    assert c.ask(third, "alice") == (429, decision.SESSION_LIMIT_EXCEEDED)
    assert c.ask(third, "bob") == (200, decision.ALLOWED)
    assert c.ask(first, "alice", method="DELETE") == (200, decision.ALLOWED)
    assert c.ask(new_id(), "alice") == (200, decision.ALLOWED)


@pytest.mark.parametrize(
    "bad_id",
    [" leading-space", "x\x7f", "caf\u00e9", "nul\x00", "\U0001f600", "a" * 257],
    ids=["space", "del", "latin-1", "nul", "emoji", "257-chars"],
)
def test_malformed_ids_are_400(start: Start, bad_id: str) -> None:
    c = start()
    # A NUL is refused with every other request value that holds one, before sessions.
    reason = decision.REQUEST_INVALID if "\x00" in bad_id else decision.SESSION_ID_INVALID
    assert c.ask(bad_id, "alice") == (400, reason)


def test_the_longest_id_is_fine(start: Start) -> None:
    c = start()
    assert c.ask("a" * 256, "alice") == (200, decision.ALLOWED)


class _WithMetadata(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    def __init__(self, *metadata: tuple[str, str]) -> None:
        self._metadata = metadata

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        details = details._replace(metadata=(*(details.metadata or ()), *self._metadata))
        return continuation(details, request)


def test_revoked_through_the_admin_api_is_404_session_terminated(start: Start) -> None:
    c = start()
    # The operator's credentials as gateway/admin.py would check them (tests/test_admin_auth.py
    # covers the real mTLS and token checks): here, one shared value in the metadata.
    def authenticate(context: grpc.ServicerContext) -> str:
        if ("authorization", "Bearer operator") not in tuple(context.invocation_metadata()):
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, "no operator credentials")
        return "the operator"

    server, port = start_admin_server(":0", c.gateway.gateway.store, authenticate=authenticate)
    channel = grpc.intercept_channel(
        grpc.insecure_channel(f"127.0.0.1:{port}"), _WithMetadata(("authorization", "Bearer operator"))
    )
    admin = admin_pb2_grpc.SessionAdminStub(channel)
    anonymous = admin_pb2_grpc.SessionAdminStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    with pytest.raises(grpc.RpcError) as refused:
        anonymous.ListSessions(admin_pb2.ListSessionsRequest(), timeout=5)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    try:
        one, two, bobs = new_id(), new_id(), new_id()
        for session, who in ((one, "alice"), (two, "alice"), (bobs, "bob")):
            assert c.ask(session, who) == (200, decision.ALLOWED)
        shown = admin.GetSession(admin_pb2.GetSessionRequest(id=one), timeout=5)
        assert (shown.state, shown.bound["sub"], shown.anonymous) == ("live", "alice", False)
        assert admin.RevokeSession(admin_pb2.RevokeSessionRequest(id=one), timeout=5).previous_state == "live"
        assert c.ask(one, "alice") == (404, decision.SESSION_TERMINATED)
        assert admin.GetSession(admin_pb2.GetSessionRequest(id=one), timeout=5).state == "revoked"
        everyone_alice = admin_pb2.RevokeSubjectRequest(issuer=c.idp.issuer, subject="alice")
        reply = admin.RevokeSubject(everyone_alice, timeout=5)
        assert reply.revoked == 1  # `one` was already revoked
        assert c.ask(two, "alice") == (404, decision.SESSION_TERMINATED)
        assert c.ask(bobs, "bob") == (200, decision.ALLOWED)
        listed = admin.ListSessions(admin_pb2.ListSessionsRequest(), timeout=5)
        assert {s.id: s.state for s in listed.sessions} == {one: "revoked", two: "revoked", bobs: "live"}
        with pytest.raises(grpc.RpcError) as missing:
            admin.GetSession(admin_pb2.GetSessionRequest(id=new_id()), timeout=5)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as invalid:
            admin.RevokeSession(admin_pb2.RevokeSessionRequest(id="no spaces"), timeout=5)
        assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        channel.close()
        server.stop(0)
