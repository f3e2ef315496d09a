"""One contract, every store: memory, SQLite (a file), Redis (a real redis-server), Redis behind
Sentinel (a master, a replica, 3 sentinels) and a Redis Cluster (3 masters, a replica each).

Most cases go through the real Authorizer with real signed tokens and the shipped default
policy, so they prove what a client would see (status and reason code), not just what the
store returns. Times are real: Redis expires keys on its own clock, so expiry cases use
sub-second TTLs and sleep.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from gateway import decision
from gateway.config import AuthConfig, IssuerConfig, SessionConfig
from gateway.decision import Decision
from gateway.identity.verifier import TokenVerifier
from gateway.pipeline import Authorizer, PolicyHolder
from gateway.policy.loader import default_policy_dir, load_policy_dir
from gateway.request import from_check_request
from gateway.session import open_store, operations
from gateway.session.record import (
    ENDED_EXPIRED,
    ENDED_LEGACY,
    ENDED_REVOKED,
    ENDED_TERMINATED,
    new_record,
    owner_key,
    tombstone,
)
from gateway.session.redis_layout import bound_marker_key, record_key
from gateway.session.store import SessionStore, StoreSettings, StoreUnavailable
from tests.support.checks import check_request
from tests.support.issuer import AUDIENCE, TestIssuer
from tests.support.processes import RedisServer

KINDS = ("memory", "sqlite", "redis", "sentinel", "cluster")
REDIS_KINDS = ("redis", "sentinel", "cluster")
POLICIES = PolicyHolder(load_policy_dir(default_policy_dir()))


@pytest.fixture(scope="module")
def idp(tmp_path_factory: pytest.TempPathFactory) -> TestIssuer:
    return TestIssuer(serve=False)


@pytest.fixture(scope="module")
def jwks_file(idp: TestIssuer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return idp.write_jwks(tmp_path_factory.mktemp("jwks") / "jwks.json")


@dataclass
class Harness:
    """A store of one kind, and an Authorizer over it with the default policy."""

    kind: str
    store: SessionStore
    authorizer: Authorizer
    idp: TestIssuer

    def token(self, subject: str) -> str:
        return self.idp.token(subject)

    def issue(self, session_id: str, subject: str | None = "alice", presented: str | None = None) -> Decision:
        """The response path: the upstream's answer to `subject`'s request issues `session_id`."""
        token = self.token(subject) if subject is not None else None
        context = from_check_request(check_request(token=token, session_id=presented))
        # None: an anonymous request (allow_anonymous is the Check's business, not the store's)
        identity = None if token is None else self.authorizer.response_path.identify(context, time.time())
        assert not isinstance(identity, Decision)
        issued = {"mcp-session-id": session_id}
        return self.authorizer.response_path.bind_issued(context, identity, issued, time.time())

    def forget(self, session_id: str, subject: str | None = "alice") -> int:
        token = self.token(subject) if subject is not None else None
        context = from_check_request(check_request(token=token, session_id=session_id))
        identity = None if token is None else self.authorizer.response_path.identify(context, time.time())
        assert not isinstance(identity, Decision)
        return self.authorizer.response_path.forget_sessions(context, identity, time.time())

    def ask(self, session_id: str | None, subject: str | None = "alice", method: str = "POST") -> Decision:
        token = self.token(subject) if subject is not None else None
        context = from_check_request(check_request(method=method, token=token, session_id=session_id))
        return self.authorizer.check(context, time.time())


StoreMaker = Callable[..., Harness]


@pytest.fixture
def opened() -> Iterator[list[SessionStore]]:
    stores: list[SessionStore] = []
    yield stores
    for store in stores:
        store.close()


def _maker(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path, idp: TestIssuer, jwks_file: Path,
    opened: list[SessionStore],
) -> StoreMaker:
    def factory(
        *, ttl: float = 3600, idle: float = 600, cap: int = 100, max_sessions: int = 1_000_000,
        max_id_length: int = 64, url: str | None = None, bind_on: str = "first_use",
    ) -> Harness:
        if url is None:
            if kind == "memory":
                url = "memory://"
            elif kind == "sqlite":
                url = f"sqlite:///{tmp_path / f'sessions-{len(opened)}.db'}"
            elif kind == "sentinel":
                url = request.getfixturevalue("sentinel_topology").url
            elif kind == "cluster":
                url = request.getfixturevalue("cluster_topology").url
            else:
                url = request.getfixturevalue("redis_server").url
        prefix = f"test:{uuid.uuid4().hex[:8]}:"  # keeps tests apart in the shared redis-server
        # A replica confirms each bind (WAIT) within the store timeout: generous where there is
        # one, so that a machine busy with other work does not fail a bind.
        timeout = 1.0 if kind in ("sentinel", "cluster") else 0.25
        store = open_store(url, StoreSettings(ttl, idle, max_sessions, prefix, timeout))
        opened.append(store)
        auth = AuthConfig(issuers=(IssuerConfig(idp.issuer, (AUDIENCE,), jwks_file=jwks_file),))
        sessions = SessionConfig(
            ttl=ttl, idle_timeout=idle, max_per_identity=cap, max_id_length=max_id_length,
            key_prefix=prefix, store_timeout=timeout, max_sessions=max_sessions, bind_on=bind_on,
        )
        authorizer = Authorizer(auth, sessions, TokenVerifier(auth), store, POLICIES)
        return Harness(kind, store, authorizer, idp)

    return factory


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path, idp: TestIssuer, jwks_file: Path,
    opened: list[SessionStore],
) -> StoreMaker:
    """A Harness over the parametrized store kind."""
    return _maker(kind, request, tmp_path, idp, jwks_file, opened)


@pytest.fixture
def make_redis(
    request: pytest.FixtureRequest, tmp_path: Path, idp: TestIssuer, jwks_file: Path,
    opened: list[SessionStore],
) -> StoreMaker:
    return _maker("redis", request, tmp_path, idp, jwks_file, opened)


def new_id() -> str:
    return str(uuid.uuid4())


def record_for(subject: str, issuer: str, now: float) -> dict[str, Any]:
    return new_record(
        anonymous=False, bound={"iss": issuer, "sub": subject}, owner=owner_key(issuer, subject), now=now
    )


# ---- create-if-absent ----

def test_create_if_absent_keeps_the_first_record(make: StoreMaker) -> None:
    h = make()
    now = time.time()
    first, second = record_for("alice", "i", now), record_for("bob", "i", now)
    assert h.store.create("s1", first, now, 10).created
    again = h.store.create("s1", second, now, 10)
    assert not again.created and again.existing is not None
    assert again.existing.data["bound"] == {"iss": "i", "sub": "alice"}
    loaded = h.store.load("s1", now)
    assert loaded is not None and loaded.data["bound"]["sub"] == "alice"
    assert h.store.load("never-bound", now) is None


def test_one_winner_among_100_concurrent_store_binds(make: StoreMaker) -> None:
    h = make()
    now = time.time()
    barrier = threading.Barrier(100)
    results: list[Any] = [None] * 100

    def bind(i: int) -> None:
        barrier.wait()
        results[i] = h.store.create("raced", record_for(f"user-{i}", "i", now), now, 10)

    threads = [threading.Thread(target=bind, args=(i,)) for i in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, r in enumerate(results) if r.created]
    assert len(winners) == 1
    winner_sub = f"user-{winners[0]}"
    assert all(r.existing.data["bound"]["sub"] == winner_sub for r in results if not r.created)


def test_100_identities_racing_through_the_authorizer_one_wins_the_rest_mismatch(make: StoreMaker) -> None:
    h = make()
    session = new_id()
    tokens = [h.token(f"user-{i}") for i in range(100)]
    barrier = threading.Barrier(100)
    outcomes: list[Decision | None] = [None] * 100

    def attempt(i: int) -> None:
        context = from_check_request(check_request(token=tokens[i], session_id=session))
        barrier.wait()
        outcomes[i] = h.authorizer.check(context, time.time())

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    allowed = [i for i, d in enumerate(outcomes) if d is not None and d.allowed]
    assert len(allowed) == 1, [d.reason for d in outcomes if d is not None]
    assert outcomes[allowed[0]].session_new  # type: ignore[union-attr]
    losers = [d for i, d in enumerate(outcomes) if i != allowed[0]]
    assert all(d is not None and (d.status, d.reason) == (404, decision.SUBJECT_MISMATCH) for d in losers)
    # The winner's binding stands, and holds for the winner.
    loaded = h.store.load(session, time.time())
    assert loaded is not None and loaded.data["bound"]["sub"] == f"user-{allowed[0]}"
    assert h.ask(session, f"user-{allowed[0]}").allowed


# ---- binding, refresh, termination ----

def test_a_refreshed_token_keeps_the_session_another_identity_is_refused(make: StoreMaker) -> None:
    h = make()
    session = new_id()
    first = h.ask(session, "alice")
    assert first.allowed and first.session_new
    refreshed = h.ask(session, "alice")  # a new token (new jti, iat) for the same iss + sub
    assert refreshed.allowed and not refreshed.session_new
    other = h.ask(session, "mallory")
    assert (other.status, other.reason) == (404, decision.SUBJECT_MISMATCH)
    assert h.ask(session, "alice").allowed  # a mismatch leaves the session as it was


def test_owner_delete_leaves_a_tombstone_that_is_never_rebound(make: StoreMaker) -> None:
    h = make()
    session = new_id()
    assert h.ask(session, "alice").allowed
    assert h.ask(session, "alice", method="DELETE").allowed  # the owner's DELETE goes through
    for who in ("alice", "bob"):
        later = h.ask(session, who)
        assert (later.status, later.reason) == (404, decision.SESSION_TERMINATED)
    loaded = h.store.load(session, time.time())
    assert loaded is not None and loaded.data["terminated"] is True and loaded.data["ended"] == "terminated"
    assert loaded.data["bound"] == {}


def test_delete_by_another_identity_is_refused_and_the_session_stays(make: StoreMaker) -> None:
    h = make()
    session = new_id()
    assert h.ask(session, "alice").allowed
    refused = h.ask(session, "mallory", method="DELETE")
    assert (refused.status, refused.reason) == (404, decision.SUBJECT_MISMATCH)
    loaded = h.store.load(session, time.time())
    assert loaded is not None and loaded.data["terminated"] is False
    assert h.ask(session, "alice").allowed


def test_a_tombstone_outlives_the_idle_timeout(make: StoreMaker) -> None:
    h = make(idle=0.3, ttl=30)
    session = new_id()
    assert h.ask(session, "alice").allowed
    assert h.ask(session, "alice", method="DELETE").allowed
    # Reading a tombstone (which slides a live record in Redis) must not shorten its life.
    for _ in range(3):
        assert h.ask(session, "bob").reason == decision.SESSION_TERMINATED
        time.sleep(0.2)
    assert h.ask(session, "bob").reason == decision.SESSION_TERMINATED


# ---- expiry ----

def test_idle_expiry_slides_with_use_then_the_id_is_refused_not_rebound(make: StoreMaker) -> None:
    h = make(idle=1.2, ttl=30)
    session = new_id()
    assert h.ask(session, "alice").allowed
    # Used every 0.3 s for 1.5 s: longer than the idle timeout, never idle (a wide margin, so a
    # busy machine's scheduling delays cannot make it idle by accident).
    for _ in range(5):
        time.sleep(0.3)
        assert h.ask(session, "bob").reason == decision.SUBJECT_MISMATCH
    time.sleep(1.6)
    # Idle past the timeout: no longer a live session (not listed, not counted), but the id
    # is not free either: whoever presents it next, an attacker who once saw it included,
    # gets 404 session_expired instead of a binding of their own (F6).
    assert session not in {s.id for s in operations.list_sessions(h.store, time.time())[0]}
    assert h.store.ids_of_owner(owner_key(h.idp.issuer, "alice")) == []
    shown = operations.show_session(h.store, session, time.time())
    if h.kind in REDIS_KINDS:
        assert shown is None  # the key expired natively; only the marker is left
    else:
        assert shown is not None and shown.state == "expired"  # kept, and a load did not revive it
    taken = h.ask(session, "bob")
    assert (taken.status, taken.reason) == (404, decision.SESSION_EXPIRED)
    assert not taken.session_new
    for who in ("alice", "bob"):
        again = h.ask(session, who)
        assert (again.status, again.reason) == (404, decision.SESSION_EXPIRED), who
    # What stands in for it now: an `expired` tombstone, a whole ttl from now.
    now = time.time()
    loaded = h.store.load(session, now)
    assert loaded is not None and loaded.data["terminated"] is True and loaded.data["ended"] == "expired"
    # (The memory store keeps times to the centisecond, so allow that much rounding.)
    assert loaded.data["bound"] == {} and now - 5 < loaded.data["created_at"] <= now + 0.01
    assert not h.store.create(session, record_for("bob", "i", now), now, 10).created
    # An operator's outright delete frees the id (the only way to, before the tombstone ends).
    assert h.store.delete(session)
    fresh = h.ask(session, "bob")
    assert fresh.allowed and fresh.session_new


def test_the_first_request_after_idle_expiry_is_refused_whoever_sends_it(make: StoreMaker) -> None:
    """Straight at the store as well: a bind of an id that is idle past its timeout binds nothing."""
    h = make(idle=0.3, ttl=30)
    owner_first, someone_else_first = new_id(), new_id()
    for session in (owner_first, someone_else_first):
        assert h.ask(session, "alice").allowed
    time.sleep(0.6)
    assert h.ask(owner_first, "alice").reason == decision.SESSION_EXPIRED
    now = time.time()
    taken = h.store.create(someone_else_first, record_for("mallory", "i", now), now, 10)
    assert not taken.created and not taken.over_limit and taken.existing is not None
    # What the check makes of it: the same 404, and the id is still not mallory's.
    assert h.ask(someone_else_first, "mallory").reason == decision.SESSION_EXPIRED
    assert h.ask(someone_else_first, "alice").reason == decision.SESSION_EXPIRED
    # A new id still binds, and the idle sessions do not count towards alice's cap.
    assert h.ask(new_id(), "alice").allowed


def test_ttl_expiry_answers_session_expired_for_a_whole_further_ttl(make: StoreMaker) -> None:
    h = make(idle=10, ttl=2.0)
    session = new_id()
    assert h.ask(session, "alice").allowed
    time.sleep(0.8)
    assert h.ask(session, "alice").allowed
    time.sleep(1.6)
    expired = h.ask(session, "alice")
    assert (expired.status, expired.reason) == (404, decision.SESSION_EXPIRED)
    written = time.time()
    # The `expired` tombstone lives a full ttl from when it was written, past the session's
    # own created_at + ttl, for the owner and for anyone else.
    for who in ("bob", "alice", "bob"):
        time.sleep(0.4)
        again = h.ask(session, who)
        assert (again.status, again.reason) == (404, decision.SESSION_EXPIRED), (who, time.time() - written)
    assert time.time() - written < 2.0
    loaded = h.store.load(session, time.time())
    assert loaded is not None and loaded.data["ended"] == "expired"
    assert loaded.data["created_at"] >= written - 1  # a new tombstone, not the session's created_at
    time.sleep(max(0.0, written + 2.6 - time.time()))
    # Only after that is the id new again.
    fresh = h.ask(session, "bob")
    assert fresh.allowed and fresh.session_new


def test_a_revocation_blocks_the_id_for_a_whole_ttl_even_near_the_sessions_end(make: StoreMaker) -> None:
    """A revocation does not reach the upstream, so the id stays blocked a ttl from the revocation,
    not just until the session's own created_at + ttl (here 1.5 s away: room for a bind that a
    replica confirms on a busy machine)."""
    h = make(idle=10, ttl=4.0)
    session = new_id()
    now = time.time()
    assert h.store.create(session, record_for("alice", h.idp.issuer, now - 2.5), now, 10).created
    assert operations.revoke_session(h.store, session, time.time()) == "live"
    time.sleep(max(0.0, now + 2.0 - time.time()))  # past the session's own end, within the ttl
    for who in ("alice", "bob"):
        refused = h.ask(session, who)
        assert (refused.status, refused.reason) == (404, decision.SESSION_TERMINATED), who


def test_expired_and_revoked_tombstones_start_when_written_terminated_ones_keep_created_at() -> None:
    created, now = 1_000.0, 5_000.0
    live = new_record(anonymous=False, bound={"sub": "alice"}, owner="o", now=created)
    assert tombstone(live, ENDED_EXPIRED, now)["created_at"] == now
    assert tombstone(live, ENDED_REVOKED, now)["created_at"] == now
    assert tombstone(live, ENDED_LEGACY, now)["created_at"] == now
    assert tombstone(live, ENDED_TERMINATED, now)["created_at"] == created
    assert all(tombstone(live, e, now)["bound"] == {} for e in (ENDED_EXPIRED, ENDED_TERMINATED))


# ---- legacy records: invalidate on read ----

LEGACY_RECORDS: dict[str, Callable[[float], dict[str, Any]]] = {
    "no-schema": lambda now: {"anonymous": False, "created_at": now, "bound": {"sub": "alice"}},
    "vmcp-token-hash": lambda now: {
        "schema": 1, "anonymous": False, "created_at": now, "terminated": False, "bound": {"sub": "alice"},
        "metadata": {"vmcp.token.hash": "9f" * 32, "vmcp.token.salt": "ab" * 16},
    },
    "token_hash": lambda now: {
        "schema": 1, "anonymous": False, "created_at": now, "terminated": False,
        "bound": {"sub": "alice", "token_hash": "0" * 64, "token_salt": "1" * 32},
    },
}


@pytest.mark.parametrize("shape", sorted(LEGACY_RECORDS))
def test_legacy_records_are_deleted_on_read_and_never_rebound(make: StoreMaker, shape: str) -> None:
    h = make()
    session = new_id()
    h.store.write_raw(session, LEGACY_RECORDS[shape](time.time()), time.time())
    first = h.ask(session, "alice")
    assert (first.status, first.reason) == (404, decision.SESSION_LEGACY_FORMAT)
    # The old record is gone: a tombstone that carries nothing of it stands in for the TTL.
    loaded = h.store.load(session, time.time())
    assert loaded is not None
    assert loaded.data["terminated"] is True and loaded.data["ended"] == ENDED_LEGACY
    assert "token" not in repr(loaded.data) and "vmcp" not in repr(loaded.data)
    for who in ("alice", "bob"):
        again = h.ask(session, who)
        assert (again.status, again.reason) == (404, decision.SESSION_LEGACY_FORMAT)
    assert not h.store.create(session, record_for("bob", "i", time.time()), time.time(), 10).created


# ---- session ids ----

@pytest.mark.parametrize(
    "bad_id",
    ["has space", "tab\there", "del\x7f", "caf\u00e9", "x" * 65, "\u2028line"],
    ids=["space", "tab", "del", "non-ascii", "too-long", "line-separator"],
)
def test_session_ids_outside_visible_ascii_or_too_long_are_400(make: StoreMaker, bad_id: str) -> None:
    h = make(max_id_length=64)
    refused = h.ask(bad_id, "alice")
    assert (refused.status, refused.reason) == (400, decision.SESSION_ID_INVALID)
    assert list(h.store.scan()) == []  # nothing was stored


def test_the_longest_allowed_id_and_every_visible_character_work(make: StoreMaker) -> None:
    h = make(max_id_length=93)
    # Visible ASCII but the comma (gateway/session/record.py: a repeated header is joined with commas).
    visible = "".join(chr(c) for c in range(0x21, 0x7F) if c != 0x2C)
    assert len(visible) == 93
    assert h.ask(visible, "alice").allowed
    assert h.ask(visible, "alice").allowed and h.ask(visible, "bob").reason == decision.SUBJECT_MISMATCH


# ---- per-identity cap ----

def test_per_identity_cap_429_counts_only_live_sessions(make: StoreMaker) -> None:
    h = make(cap=3, idle=0.5)
    ids = [new_id() for _ in range(5)]
    assert all(h.ask(i, "alice").allowed for i in ids[:3])
    over = h.ask(ids[3], "alice")
    assert (over.status, over.reason) == (429, decision.SESSION_LIMIT_EXCEEDED)
    assert h.store.load(ids[3], time.time()) is None  # nothing stored for the refused bind
    assert h.ask(new_id(), "bob").allowed  # another identity has its own count
    assert h.ask(ids[0], "alice").allowed  # existing sessions are not affected by the cap
    assert h.ask(ids[0], "alice", method="DELETE").allowed  # ending one frees a place
    assert h.ask(ids[3], "alice").allowed
    assert h.ask(ids[4], "alice").reason == decision.SESSION_LIMIT_EXCEEDED
    time.sleep(0.8)  # all idle past the timeout: none counts any more
    assert h.ask(ids[4], "alice").allowed


# ---- operators ----

def test_revoke_and_revoke_subject(make: StoreMaker) -> None:
    h = make()
    alice = [new_id() for _ in range(3)]
    bob = new_id()
    for session in alice:
        assert h.ask(session, "alice").allowed
    assert h.ask(bob, "bob").allowed
    assert operations.revoke_session(h.store, alice[0], time.time()) == "live"
    assert h.ask(alice[0], "alice").reason == decision.SESSION_TERMINATED
    assert operations.revoke_subject(h.store, h.idp.issuer, "alice", time.time()) == 2
    for session in alice:
        revoked = h.ask(session, "alice")
        assert (revoked.status, revoked.reason) == (404, decision.SESSION_TERMINATED)
    assert h.ask(bob, "bob").allowed
    states = {s.id: s.state for s in operations.list_sessions(h.store, time.time())[0]}
    assert states == {alice[0]: "revoked", alice[1]: "revoked", alice[2]: "revoked", bob: "live"}
    # An unknown id can be blocked before anyone binds it.
    blocked = new_id()
    assert operations.revoke_session(h.store, blocked, time.time()) == ""
    assert h.ask(blocked, "alice").reason == decision.SESSION_TERMINATED


# ---- fail closed, then recover ----

# Sentinel and Cluster fail over instead: tests/test_redis_topologies.py.
@pytest.mark.parametrize("kind", ["memory", "sqlite", "redis"])
def test_store_down_fails_closed_with_503_and_recovers(kind: str, make: StoreMaker, tmp_path: Path) -> None:
    """Each store's way of not answering: memory full, SQLite locked by another process's
    transaction, Redis killed (then restarted on the same port). No restart of the gateway side."""
    live = new_id()
    if kind == "memory":
        h = make(max_sessions=3)
        for subject in ("a", "b", "c"):
            assert h.ask(new_id(), subject).allowed
        down = h.ask(live, "alice")
        assert (down.status, down.reason) == (503, decision.STORE_UNAVAILABLE)
        h.store.delete(next(iter(h.store.scan()))[0])  # room again
    elif kind == "sqlite":
        path = tmp_path / "locked.db"
        h = make(url=f"sqlite:///{path}")
        assert h.ask(live, "alice").allowed
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")  # another process's long write transaction
        started = time.monotonic()
        down = h.ask(new_id(), "alice")
        assert (down.status, down.reason) == (503, decision.STORE_UNAVAILABLE)
        assert time.monotonic() - started < 1.5  # bounded by store_timeout, not hanging
        assert h.ask(live, "alice").allowed  # WAL: reads go on while another process writes
        blocker.rollback()
        blocker.close()
    else:
        server = RedisServer(tmp_path)
        h = make(url=server.url)
        assert h.ask(live, "alice").allowed
        server.kill()
        down = h.ask(live, "alice")
        assert (down.status, down.reason) == (503, decision.STORE_UNAVAILABLE)
        assert h.ask(new_id(), "bob").reason == decision.STORE_UNAVAILABLE
        restarted = RedisServer(tmp_path, port=server.port, name="redis-restarted")
    try:
        fresh = new_id()
        after = h.ask(fresh, "alice")
        assert after.allowed and after.session_new, after.reason
        assert h.ask(fresh, "mallory").reason == decision.SUBJECT_MISMATCH  # binding works again
    finally:
        if kind == "redis":
            restarted.stop()


# ---- Redis specifics ----

def test_a_stalled_redis_costs_one_store_timeout_then_recovers(
    tmp_path: Path, make_redis: StoreMaker
) -> None:
    """SIGSTOP: the port accepts but nothing answers. The check waits store_timeout, not longer."""
    server = RedisServer(tmp_path)
    try:
        h = make_redis(url=server.url)
        session = new_id()
        assert h.ask(session, "alice").allowed
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            stalled = h.ask(session, "alice")
            elapsed = time.monotonic() - started
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        assert (stalled.status, stalled.reason) == (503, decision.STORE_UNAVAILABLE)
        assert 0.2 <= elapsed < 0.9, elapsed
        # The late reply to the timed-out command must not be read as the next answer.
        assert h.ask(session, "alice").allowed
        assert h.ask(session, "bob").reason == decision.SUBJECT_MISMATCH
    finally:
        server.stop()


def test_redis_steady_state_is_one_getex_per_check(redis_server: RedisServer, make_redis: StoreMaker) -> None:
    h = make_redis()
    session = new_id()
    assert h.ask(session, "alice").allowed
    admin = redis.Redis.from_url(redis_server.url)
    admin.config_resetstat()
    for _ in range(20):
        assert h.ask(session, "alice").allowed
    stats = admin.info("commandstats")
    counted = {name: value["calls"] for name, value in stats.items() if not name.startswith("cmdstat_config")}
    assert counted == {"cmdstat_getex": 20}
    key = record_key(h.store.settings.key_prefix, session)
    assert 0 < admin.pttl(key) <= 600_000  # native idle expiry
    admin.close()


def test_redis_bind_sets_a_marker_in_the_same_round_trip_and_honours_it(
    redis_server: RedisServer, make_redis: StoreMaker
) -> None:
    h = make_redis(idle=0.3, ttl=30)
    session = new_id()
    admin = redis.Redis.from_url(redis_server.url)
    prefix = h.store.settings.key_prefix
    marker = bound_marker_key(prefix, session)
    record = record_key(prefix, session)
    warm = new_id()
    assert h.ask(warm, "alice").allowed  # the bind script is loaded into this redis-server
    admin.config_resetstat()
    assert h.ask(session, "alice").allowed
    stats = admin.info("commandstats")
    # The check's GETEX finds nothing (nor does an EXISTS for a record of the old layout);
    # the bind is two EVALs: a place in the owner's index, then the record and its marker in
    # one step. (Commands run by a script count in commandstats too: EXISTS is not shown.)
    mine = ("cmdstat_getex", "cmdstat_eval", "cmdstat_evalsha")
    assert {n: v["calls"] for n, v in stats.items() if n in mine} == {"cmdstat_getex": 1, "cmdstat_eval": 2}
    assert 25_000 < admin.pttl(marker) <= 30_000  # the ttl, from the bind
    assert 0 < admin.pttl(record) <= 300  # the record itself: the idle timeout
    assert sorted(i for i, _ in h.store.scan()) == sorted([warm, session])  # markers are no sessions
    time.sleep(0.5)
    assert admin.exists(record) == 0  # expired natively
    refused = h.ask(session, "bob")
    assert (refused.status, refused.reason) == (404, decision.SESSION_EXPIRED)
    assert admin.exists(marker) == 0  # replaced by the tombstone, which lives a whole ttl
    assert 25_000 < admin.pttl(record) <= 30_000
    # Reading the tombstone slides it to the idle timeout; the load gives it back its ttl.
    assert h.ask(session, "alice").reason == decision.SESSION_EXPIRED
    assert 25_000 < admin.pttl(record) <= 30_000
    admin.close()


def test_redis_non_string_value_is_legacy(redis_server: RedisServer, make_redis: StoreMaker) -> None:
    h = make_redis()
    session = new_id()
    admin = redis.Redis.from_url(redis_server.url)
    key = record_key(h.store.settings.key_prefix, session)
    admin.hset(key, mapping={"sub": "alice", "token_hash": "00"})
    refused = h.ask(session, "alice")
    assert (refused.status, refused.reason) == (404, decision.SESSION_LEGACY_FORMAT)
    assert admin.type(key) == b"string"  # replaced by a tombstone
    assert h.ask(session, "alice").reason == decision.SESSION_LEGACY_FORMAT
    admin.close()


def test_a_sqlite_path_that_cannot_be_opened_is_store_unavailable(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a directory")
    with pytest.raises(StoreUnavailable):
        open_store(f"sqlite:///{tmp_path}/a-file/sessions.db", StoreSettings(10, 10))


def test_redis_over_a_unix_socket_and_another_db(tmp_path: Path, make_redis: StoreMaker) -> None:
    server = RedisServer(tmp_path, unix_socket=tmp_path / "redis.sock")
    try:
        assert server.unix_url is not None
        h = make_redis(url=f"{server.unix_url}?db=3")
        session = new_id()
        assert h.ask(session, "alice").allowed
        assert h.ask(session, "bob").reason == decision.SUBJECT_MISMATCH
        in_db3 = redis.Redis.from_url(server.url.replace("/0", "/3"))
        assert in_db3.exists(record_key(h.store.settings.key_prefix, session)) == 1
        assert redis.Redis.from_url(server.url).dbsize() == 0
        in_db3.close()
    finally:
        server.stop()


def test_a_sqlite_file_from_before_usable_until_is_migrated(tmp_path: Path) -> None:
    """Files written before idle records were kept get the column; their rows keep working."""
    path = tmp_path / "old.db"
    old = sqlite3.connect(path, isolation_level=None)
    old.executescript(
        "CREATE TABLE sessions (id TEXT PRIMARY KEY, data TEXT NOT NULL, owner TEXT NOT NULL,"
        " created_at REAL NOT NULL, expires_at REAL NOT NULL) WITHOUT ROWID;"
    )
    now = time.time()
    record = record_for("alice", "i", now - 10)
    old.execute(
        "INSERT INTO sessions VALUES (?, ?, ?, ?, ?)",
        ("old-live", json.dumps(record), record["owner"], now - 10, now + 600),  # idle expiry then
    )
    old.close()
    store = open_store(f"sqlite:///{path}", StoreSettings(3600, 600))
    try:
        loaded = store.load("old-live", now)
        assert loaded is not None and loaded.data["bound"]["sub"] == "alice" and loaded.last_seen is not None
        assert store.ids_of_owner(record["owner"]) == ["old-live"]
        assert store.create("new", record_for("bob", "i", now), now, 10).created
        columns = {row[1] for row in sqlite3.connect(path).execute("PRAGMA table_info(sessions)")}
        assert "usable_until" in columns
    finally:
        store.close()
    open_store(f"sqlite:///{path}", StoreSettings(3600, 600)).close()  # a second open: nothing to add


def _bind_from_another_process(url: str, index: int, start: Any, results: Any) -> None:
    store = open_store(url, StoreSettings(3600, 600, timeout=5.0))
    start.wait(30)
    now = time.time()
    outcome = store.create("raced-across-processes", record_for(f"user-{index}", "i", now), now, 10)
    winner = None if outcome.existing is None else outcome.existing.data["bound"]["sub"]
    results.put((index, outcome.created, winner))
    store.close()


def test_sqlite_binds_race_across_processes(tmp_path: Path) -> None:
    """Worker processes of one host share the file: one bind wins across processes too."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    open_store(url, StoreSettings(3600, 600)).close()  # the schema exists before the race
    start, results = context.Event(), context.Queue()
    processes = [
        context.Process(target=_bind_from_another_process, args=(url, i, start, results)) for i in range(6)
    ]
    for process in processes:
        process.start()
    time.sleep(1.5)  # let every process import and open the store
    start.set()
    outcomes = [results.get(timeout=30) for _ in processes]
    for process in processes:
        process.join(10)
    winners = [index for index, created, _ in outcomes if created]
    assert len(winners) == 1
    assert {winner for _, created, winner in outcomes if not created} == {f"user-{winners[0]}"}


# ---- bind at issuance (session.bind_on: response) ----


def test_bind_at_issuance_binds_only_what_a_response_issued(make: StoreMaker) -> None:
    h = make(bind_on="response")
    session = new_id()
    unknown = h.ask(session, "alice")
    assert (unknown.status, unknown.reason) == (404, decision.SESSION_UNKNOWN)
    assert h.store.load(session, time.time()) is None  # nothing bound on that use
    bound = h.issue(session, "alice")
    assert bound.allowed and bound.session_new
    assert h.ask(session, "alice").allowed
    assert h.ask(session, "bob").reason == decision.SUBJECT_MISMATCH
    # Issued again to its owner (a retried initialize), or repeated in her own session: fine.
    again = h.issue(session, "alice")
    assert again.allowed and not again.session_new
    assert h.issue(session, "alice", presented=session).allowed
    # Issued to anyone else: refused, and the binding stays.
    reissued = h.issue(session, "bob")
    assert (reissued.status, reissued.reason) == (502, decision.SESSION_REISSUED)
    assert h.ask(session, "alice").allowed
    anonymous = h.issue(session, None)
    assert anonymous.reason == decision.SESSION_REISSUED


def test_a_forgotten_session_becomes_a_tombstone_never_reissued(make: StoreMaker) -> None:
    h = make(bind_on="response")
    session = new_id()
    assert h.issue(session, "alice").session_new
    assert h.forget(session, "bob") == 0  # not bob's to end
    assert h.ask(session, "alice").allowed
    assert h.forget(session, "alice") == 1
    ended = h.ask(session, "alice")
    assert (ended.status, ended.reason) == (404, decision.SESSION_TERMINATED)
    loaded = h.store.load(session, time.time())
    assert loaded is not None and loaded.data["ended"] == ENDED_TERMINATED
    assert h.forget(session, "alice") == 0  # already ended
    for subject in ("alice", "bob"):
        assert h.issue(session, subject).reason == decision.SESSION_REISSUED


def test_an_idle_id_issued_again_is_refused(make: StoreMaker) -> None:
    """Idle past its timeout, an id stays taken (Redis: by its marker): a server that hands it
    out again, to anyone, gets session_reissued."""
    h = make(bind_on="response", idle=0.3, ttl=30)
    session = new_id()
    assert h.issue(session, "alice").session_new
    time.sleep(0.6)
    assert h.issue(session, "bob").reason == decision.SESSION_REISSUED


def test_anonymous_issuance_binds_as_anonymous(make: StoreMaker) -> None:
    h = make(bind_on="response")
    session = new_id()
    assert h.issue(session, None).session_new
    loaded = h.store.load(session, time.time())
    assert loaded is not None and loaded.data["anonymous"] is True
    assert h.issue(session, "alice").reason == decision.SESSION_REISSUED
