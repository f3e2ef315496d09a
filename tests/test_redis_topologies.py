"""Beyond one Redis: Sentinel failover and Redis Cluster, with no acknowledged binding lost.

Real processes only (tests/support/redis_topologies.py): a master with a replica and three
sentinels, and a Cluster of three masters with a replica each, all requiring passwords. The
checks go through the real Authorizer with real signed tokens (tests/test_store_contract.py's
harness), or through real gateway processes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis

from gateway import decision
from gateway.decision import Decision
from gateway.session import display_url, open_store
from gateway.session.record import encode, tombstone
from gateway.session.redis_layout import (
    bound_marker_key,
    legacy_keys,
    owner_index_key,
    record_key,
)
from gateway.session.store import StoreSettings, StoreUnavailable
from tests.support.checks import CheckClient
from tests.support.issuer import TestIssuer
from tests.support.processes import GatewayProcess, RedisServer, free_port, health_status, wait_until
from tests.support.redis_topologies import (
    REDIS_PASSWORD,
    SENTINEL_PASSWORD,
    ClusterTopology,
    SentinelTopology,
)
from tests.test_store_contract import Harness, StoreMaker, _maker, new_id, record_for
from tests.test_telemetry_admin import NO_EXPORT, get, sample

RECOVERY_LIMIT = 15.0  # seconds, from the failure until the owner's check is allowed again


@pytest.fixture(scope="module")
def idp() -> TestIssuer:
    return TestIssuer(serve=False)


@pytest.fixture(scope="module")
def jwks_file(idp: TestIssuer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return idp.write_jwks(tmp_path_factory.mktemp("jwks") / "jwks.json")


@pytest.fixture
def opened() -> Iterator[list[Any]]:
    stores: list[Any] = []
    yield stores
    for store in stores:
        store.close()


@pytest.fixture
def make_sentinel(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    idp: Any,
    jwks_file: Path,
    opened: list[Any],
    sentinel_topology: SentinelTopology,
) -> StoreMaker:
    return _maker("sentinel", request, tmp_path, idp, jwks_file, opened)


@pytest.fixture
def make_cluster(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    idp: Any,
    jwks_file: Path,
    opened: list[Any],
    cluster_topology: ClusterTopology,
) -> StoreMaker:
    return _maker("cluster", request, tmp_path, idp, jwks_file, opened)


class Recorder:
    """An Observer that keeps every store operation (span name and attributes)."""

    def __init__(self) -> None:
        self.operations: list[tuple[str, dict[str, Any]]] = []

    @contextmanager
    def operation(
        self, name: str, attributes: Mapping[str, Any], *, within_check: bool = False
    ) -> Iterator[Any]:
        self.operations.append((name, dict(attributes)))
        yield self

    def failed(self, error: BaseException) -> None:
        return None

    def count(self, counter: str, attributes: Mapping[str, str]) -> None:
        return None


class Hammer:
    """Checks from a thread, until stopped: every decision seen, to prove none was a wrong allow."""

    def __init__(self, h: Harness, session: str, subject: str) -> None:
        self.decisions: list[tuple[float, Decision]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(h, session, subject), daemon=True)
        self._thread.start()

    def _run(self, h: Harness, session: str, subject: str) -> None:
        while not self._stop.is_set():
            self.decisions.append((time.monotonic(), h.ask(session, subject)))
            time.sleep(0.02)

    def stop(self) -> list[tuple[float, Decision]]:
        self._stop.set()
        self._thread.join(10)
        return self.decisions


def _until_allowed(h: Harness, session: str, subject: str, started: float) -> float:
    """Seconds from `started` until the owner's check is allowed again (polling)."""
    wait_until(lambda: h.ask(session, subject).allowed, RECOVERY_LIMIT + 5, 0.1, f"{subject} allowed again")
    return time.monotonic() - started


def outage(seen: list[tuple[float, Decision]]) -> float:
    """How long the owner's checks were refused: from the first refusal to the last (0 when none)."""
    refused = [t for t, d in seen if not d.allowed]
    return refused[-1] - refused[0] if refused else 0.0


# ---- Cluster ----


def test_sixty_way_race_of_two_identities_on_one_id_in_the_cluster_has_one_owner(
    make_cluster: StoreMaker,
) -> None:
    h = make_cluster()
    session = new_id()
    subjects = ["alice", "mallory"] * 30
    tokens = [h.token(s) for s in subjects]
    barrier = threading.Barrier(60)
    outcomes: list[Decision | None] = [None] * 60

    def attempt(i: int) -> None:
        from gateway.request import from_check_request
        from tests.support.checks import check_request

        context = from_check_request(check_request(token=tokens[i], session_id=session))
        barrier.wait()
        outcomes[i] = h.authorizer.check(context, time.time())

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(60)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    allowed = {subjects[i] for i, d in enumerate(outcomes) if d is not None and d.allowed}
    assert len(allowed) == 1, [d.reason if d else None for d in outcomes]
    owner = allowed.pop()
    assert sum(1 for d in outcomes if d is not None and d.session_new) == 1
    for subject, outcome in zip(subjects, outcomes, strict=True):
        assert outcome is not None
        if subject == owner:
            assert outcome.allowed, outcome.reason
        else:
            assert (outcome.status, outcome.reason) == (404, decision.SUBJECT_MISMATCH)
    loaded = h.store.load(session, time.time())
    assert loaded is not None and loaded.data["bound"]["sub"] == owner
    # The loser's place in its owner's index was given back; the winner holds one.
    loser = "mallory" if owner == "alice" else "alice"
    assert h.store.ids_of_owner(record_for(owner, h.idp.issuer, 0)["owner"]) == [session]
    assert h.store.ids_of_owner(record_for(loser, h.idp.issuer, 0)["owner"]) == []


def test_cluster_keys_of_one_operation_share_a_slot_and_ids_spread(
    make_cluster: StoreMaker, cluster_topology: ClusterTopology
) -> None:
    h = make_cluster()
    prefix = h.store.settings.key_prefix
    admin = cluster_topology.admin()
    ids = [new_id() for _ in range(30)] + ["{x}", "}{", "{", "a{b}c"]  # ids that look like hash tags
    masters = set()
    for session in ids:
        assert h.ask(session, "alice").allowed
        assert h.ask(session, "mallory").reason == decision.SUBJECT_MISMATCH
        slot = admin.keyslot(record_key(prefix, session))
        assert admin.keyslot(bound_marker_key(prefix, session)) == slot
        masters.add(cluster_topology.master_of(record_key(prefix, session)))
    assert len(masters) == 3  # 34 ids over 3 masters: all used
    owner = record_for("alice", h.idp.issuer, 0)["owner"]
    assert sorted(h.store.ids_of_owner(owner)) == sorted(ids)
    assert admin.zcard(owner_index_key(prefix, owner)) == len(ids)
    admin.close()


def test_a_cluster_master_killed_and_brought_back(
    make_cluster: StoreMaker, cluster_topology: ClusterTopology
) -> None:
    h = make_cluster()
    prefix = h.store.settings.key_prefix
    session = new_id()
    assert h.ask(session, "alice").allowed  # acknowledged: confirmed by the shard's replica
    victim = cluster_topology.master_of(record_key(prefix, session))
    hammer, owner = Hammer(h, session, "mallory"), Hammer(h, session, "alice")
    started = time.monotonic()
    cluster_topology.kill(victim)
    try:
        try:
            recovery = _until_allowed(h, session, "alice", started)
            time.sleep(1.0)  # the checks go on a little after the recovery: it lasts
        finally:
            seen = hammer.stop()
            owners = owner.stop()
        assert recovery < RECOVERY_LIMIT, recovery
        assert outage(owners) < RECOVERY_LIMIT, outage(owners)
        assert {d.reason for _, d in owners} <= {decision.ALLOWED, decision.STORE_UNAVAILABLE}
        assert h.ask(session, "alice").allowed
        assert all(not d.allowed for _, d in seen), "an allow for the wrong identity"
        assert {d.reason for _, d in seen} <= {decision.SUBJECT_MISMATCH, decision.STORE_UNAVAILABLE}
        assert h.ask(session, "mallory").reason == decision.SUBJECT_MISMATCH  # the binding survived
        # The shard that lost its master has no replica left: no bind there can be confirmed,
        # so none is allowed (503); the other shards bind as before.
        promoted = cluster_topology.master_of(record_key(prefix, session))
        ids = [new_id() for _ in range(30)]
        degraded = [i for i in ids if cluster_topology.master_of(record_key(prefix, i)) == promoted]
        healthy = [i for i in ids if i not in degraded]
        assert degraded and healthy
        for fresh in degraded:
            assert h.ask(fresh, "bob").reason == decision.STORE_UNAVAILABLE
        for fresh in healthy:
            assert h.ask(fresh, "bob").allowed
    finally:
        cluster_topology.restart(victim)  # rejoins as a replica; every shard has one again
    assert h.ask(session, "alice").allowed
    for fresh in ids:
        assert h.ask(fresh, "bob").allowed
        assert h.ask(fresh, "mallory").reason == decision.SUBJECT_MISMATCH


def test_cluster_spans_name_the_node_that_answered(cluster_topology: ClusterTopology) -> None:
    recorder = Recorder()
    store = open_store(
        cluster_topology.url, StoreSettings(3600, 600, key_prefix="spans:", timeout=1.0), recorder
    )
    try:
        for _ in range(6):
            session = new_id()
            now = time.time()
            assert store.create(session, record_for("alice", "i", now), now, 10).created
            recorder.operations.clear()
            assert store.load(session, now) is not None
            ((name, attributes),) = recorder.operations
            assert name == "redis GETEX"
            assert attributes["server.port"] == cluster_topology.master_of(record_key("spans:", session))
            assert attributes["server.address"] == "127.0.0.1"
            assert session not in repr(attributes)
    finally:
        store.close()


# ---- Sentinel ----


def test_a_planned_sentinel_failover_loses_no_binding_and_never_allows_the_wrong_identity(
    make_sentinel: StoreMaker, sentinel_topology: SentinelTopology
) -> None:
    h = make_sentinel()
    sessions = [new_id() for _ in range(5)]
    for session in sessions:
        assert h.ask(session, "alice").allowed
    hammer, owner = Hammer(h, sessions[0], "mallory"), Hammer(h, sessions[0], "alice")
    before = sentinel_topology.master_port()
    try:
        after = sentinel_topology.failover()
        _until_allowed(h, sessions[0], "alice", time.monotonic())
    finally:
        seen = hammer.stop()
        owners = owner.stop()
    assert after != before
    assert outage(owners) < RECOVERY_LIMIT, outage(owners)
    assert {d.reason for _, d in owners} <= {decision.ALLOWED, decision.STORE_UNAVAILABLE}
    assert all(not d.allowed for _, d in seen), "an allow for the wrong identity"
    assert {d.reason for _, d in seen} <= {decision.SUBJECT_MISMATCH, decision.STORE_UNAVAILABLE}
    for session in sessions:
        assert h.ask(session, "mallory").reason == decision.SUBJECT_MISMATCH
        assert h.ask(session, "alice").allowed


def test_sigkill_of_the_master_right_after_acknowledged_binds_loses_none(
    make_sentinel: StoreMaker, sentinel_topology: SentinelTopology
) -> None:
    h = make_sentinel()
    sessions = [new_id() for _ in range(20)]
    for session in sessions:
        assert h.ask(session, "alice").allowed  # acknowledged: the replica confirmed it (WAIT)
    killed = sentinel_topology.kill_master()  # at once: nothing else had time to replicate
    started = time.monotonic()
    during = [h.ask(sessions[0], "mallory") for _ in range(3)]
    assert all(d.reason in (decision.STORE_UNAVAILABLE, decision.SUBJECT_MISMATCH) for d in during)
    try:
        recovery = _until_allowed(h, sessions[0], "alice", started)
        assert recovery < RECOVERY_LIMIT, recovery
        assert sentinel_topology.master_port() != killed
        for session in sessions:
            other = h.ask(session, "mallory")
            assert (other.status, other.reason) == (404, decision.SUBJECT_MISMATCH), session
            assert h.ask(session, "alice").allowed
    finally:
        sentinel_topology.restart_as_replica(killed)


def test_sentinel_spans_follow_the_master(sentinel_topology: SentinelTopology) -> None:
    recorder = Recorder()
    store = open_store(
        sentinel_topology.url, StoreSettings(3600, 600, key_prefix="spans:", timeout=1.0), recorder
    )
    try:
        session = new_id()
        now = time.time()
        assert store.create(session, record_for("alice", "i", now), now, 10).created
        recorder.operations.clear()
        store.load(session, now)
        assert [a["server.port"] for _, a in recorder.operations] == [sentinel_topology.master_port()]
        names = {n for n, _ in recorder.operations}
        assert names == {"redis GETEX"}
    finally:
        store.close()


def test_an_unconfirmed_bind_fails_closed(tmp_path: Path) -> None:
    """A master whose replica does not answer: the bind is not confirmed within store_timeout,
    so the check is 503 and nothing is allowed on it."""
    master = RedisServer(tmp_path, name="wait-master")
    replica = RedisServer(tmp_path, name="wait-replica")
    try:
        redis.Redis.from_url(replica.url).replicaof("127.0.0.1", master.port)
        admin = redis.Redis.from_url(master.url)
        follower = redis.Redis.from_url(replica.url)
        wait_until(lambda: follower.info("replication").get("master_link_status") == "up", 15, what="in sync")
        follower.close()
        settings = StoreSettings(3600, 600, key_prefix="wait:", timeout=0.25)
        store = open_store(master.url, settings)  # replica_ack=auto: the master has a replica
        now = time.time()
        assert store.create("confirmed", record_for("alice", "i", now), now, 10).created
        import os
        import signal

        from gateway.session.health import HealthTrackedStore, StoreHealth

        changes: list[bool] = []
        health = StoreHealth(store, lambda up, why: changes.append(up))
        tracked = HealthTrackedStore(store, health)
        assert tracked.load("confirmed", now) is not None and changes == [True]
        os.kill(replica.proc.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(StoreUnavailable, match="NotConfirmed"):
                tracked.create("unconfirmed", record_for("alice", "i", now), now, 10)
            # The master answers: the store stays up (the check above is 503 all the same).
            assert health.up and changes == [True]
            assert time.monotonic() - started < 1.0  # bounded by the store timeout
            with pytest.raises(StoreUnavailable, match="NotConfirmed"):
                store.replace("confirmed", tombstone(None, "terminated", now), now)
        finally:
            os.kill(replica.proc.pid, signal.SIGCONT)
        never = open_store(f"{master.url}?replica_ack=off", settings)
        assert never.create("unwaited", record_for("alice", "i", now), now, 10).created
        never.close()
        store.close()
        admin.close()
    finally:
        replica.stop()
        master.stop()


def test_an_acl_without_info_still_binds_waiting_for_the_replica(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """replica_ack=auto counts replicas with INFO; a user whose ACL refuses INFO gets binds that
    wait for a replica (confirmed here), not a 503 after every write, and one warning."""
    master = RedisServer(tmp_path, name="acl-master")
    replica = RedisServer(tmp_path, name="acl-replica")
    secret = "acl-s3cret-pw"
    try:
        redis.Redis.from_url(replica.url).replicaof("127.0.0.1", master.port)
        follower = redis.Redis.from_url(replica.url)
        wait_until(lambda: follower.info("replication").get("master_link_status") == "up", 15, what="in sync")
        follower.close()
        admin = redis.Redis.from_url(master.url)
        admin.execute_command("ACL", "SETUSER", "limited", "on", f">{secret}", "~*", "&*", "+@all", "-info")
        admin.close()
        url = f"redis://limited:{secret}@127.0.0.1:{master.port}/0"
        store = open_store(url, StoreSettings(3600, 600, key_prefix="acl:", timeout=0.25))
        now = time.time()
        with caplog.at_level("WARNING", logger="gateway.session.redis_store"):
            assert store.create("first", record_for("alice", "i", now), now, 10).created
            assert store.create("second", record_for("alice", "i", now), now, 10).created
        warnings = [r.getMessage() for r in caplog.records if "INFO replication is refused" in r.getMessage()]
        assert len(warnings) == 1 and secret not in warnings[0], warnings
        store.close()
    finally:
        replica.stop()
        master.stop()


def test_required_replica_ack_without_a_replica_is_503(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, name="lonely")
    try:
        store = open_store(f"{server.url}?replica_ack=required", StoreSettings(3600, 600, timeout=0.25))
        now = time.time()
        with pytest.raises(StoreUnavailable, match="NotConfirmed"):
            store.create("s", record_for("alice", "i", now), now, 10)
        single = open_store(server.url, StoreSettings(3600, 600, timeout=0.25))  # auto: no replica, no WAIT
        assert single.create("t", record_for("alice", "i", now), now, 10).created
        single.close()
        store.close()
    finally:
        server.stop()


# ---- the layout before this one ----


@pytest.mark.parametrize("leftover", ["record", "marker"])
@pytest.mark.parametrize("kind", ["redis", "sentinel", "cluster"])
def test_records_of_the_old_layout_are_legacy_and_never_rebound(
    kind: str,
    leftover: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    idp: Any,
    jwks_file: Path,
    opened: list[Any],
) -> None:
    h = _maker(kind, request, tmp_path, idp, jwks_file, opened)()
    if kind == "redis":
        admin: Any = redis.Redis.from_url(request.getfixturevalue("redis_server").url)
    else:
        admin = request.getfixturevalue(f"{kind}_topology").admin()
    prefix = h.store.settings.key_prefix
    session = new_id()
    old_record, old_marker = legacy_keys(prefix, session)
    if leftover == "record":  # a current-schema record, but in the old place
        admin.set(old_record, encode(record_for("alice", h.idp.issuer, time.time())), px=600_000)
    else:  # the old layout's marker: bound once, idle past its timeout
        admin.set(old_marker, "1", px=600_000)
    for who in ("mallory", "alice", "mallory"):
        refused = h.ask(session, who)
        assert (refused.status, refused.reason) == (404, decision.SESSION_LEGACY_FORMAT), who
    assert admin.exists(old_record) == 0 and admin.exists(old_marker) == 0  # invalidated
    loaded = h.store.load(session, time.time())
    assert loaded is not None and loaded.data["ended"] == "legacy" and loaded.data["bound"] == {}
    assert not h.store.create(session, record_for("mallory", "i", time.time()), time.time(), 10).created
    admin.close()


# ---- real gateway processes ----


def test_gateway_health_follows_a_sentinel_failover_and_never_logs_passwords(
    tmp_path: Path, sentinel_topology: SentinelTopology, idp: Any, jwks_file: Path
) -> None:
    admin_port = free_port()
    config = {
        "auth": {"issuers": [idp.issuer_config(jwks_file=jwks_file)]},
        "store": sentinel_topology.url,
        "session": {"store_timeout": "1s", "key_prefix": "health:"},
        "telemetry": {"metrics_listen": f"127.0.0.1:{admin_port}"},
    }
    gateway = GatewayProcess(config, tmp_path, env=NO_EXPORT)
    client = CheckClient(gateway.address)
    stop = threading.Event()
    statuses: list[int] = []

    def traffic() -> None:  # like real traffic: checks keep coming during the failover
        while not stop.is_set():
            statuses.append(client.status(token=idp.token("alice"), session_id="s-health"))
            time.sleep(0.05)

    killed = None
    try:
        assert client.status(token=idp.token("alice"), session_id="s-health") == 200
        assert sample(get(admin_port, "/metrics")[1], "authz_store_up", store="redis") == 1
        thread = threading.Thread(target=traffic, daemon=True)
        thread.start()
        killed = sentinel_topology.kill_master()
        wait_until(lambda: health_status(gateway.address) == "NOT_SERVING", 15, 0.05, "NOT_SERVING")
        assert get(admin_port, "/readyz")[0] == 503
        assert sample(get(admin_port, "/metrics")[1], "authz_store_up", store="redis") == 0
        wait_until(lambda: health_status(gateway.address) == "SERVING", 20, 0.1, "SERVING after the failover")
        assert get(admin_port, "/readyz")[0] == 200
        assert sample(get(admin_port, "/metrics")[1], "authz_store_up", store="redis") == 1
        stop.set()
        thread.join(10)
        assert set(statuses) <= {200, 503} and 503 in statuses and statuses[-1] == 200
        assert client.status(token=idp.token("mallory"), session_id="s-health") == 404
        log = gateway.log_text()
        assert "does not answer" in log and display_url(sentinel_topology.url) in log
        assert REDIS_PASSWORD not in log and SENTINEL_PASSWORD not in log
    finally:
        stop.set()
        client.close()
        assert gateway.stop() == 0
        if killed is not None:
            sentinel_topology.restart_as_replica(killed)


def test_two_gateway_replicas_behind_envoy_share_sessions_through_a_sentinel_failover(
    tmp_path: Path, sentinel_topology: SentinelTopology, idp: TestIssuer, jwks_file: Path
) -> None:
    """tests/test_replicas_e2e.py's scenario on Sentinel: a session bound through one replica holds
    on the other, and both follow the master's SIGKILL without a restart."""
    from tests.support.processes import (
        EnvoyProcess,
        RecordingUpstream,
        envoy_config,
        split_process_cluster,
        wait_for_port,
    )
    from tests.test_replicas_e2e import NOT_FOUND, Stack

    config = {
        "store": sentinel_topology.url,
        "auth": {"issuers": [idp.issuer_config(jwks_file=jwks_file)]},
        "session": {"store_timeout": "1s", "key_prefix": "envoy:"},
    }
    replicas = [GatewayProcess(config, tmp_path, name=f"sentinel-replica-{i}") for i in (1, 2)]
    upstream = RecordingUpstream()
    listener_port, admin_port = free_port(), free_port()
    text = envoy_config(
        listener_port=listener_port, admin_port=admin_port,
        gateway_ports=[r.port for r in replicas], upstream_port=upstream.port,
    )  # fmt: skip
    # Checks and Process streams counted apart: each request opens both.
    envoy = EnvoyProcess(split_process_cluster(text), tmp_path)
    killed = None
    try:
        wait_for_port(admin_port, 30)
        wait_for_port(listener_port, 30)
        stack = Stack(idp, None, {r.port: r for r in replicas}, envoy, upstream, listener_port, admin_port)  # type: ignore[arg-type]
        ok = (200, b'{"ok": true, "path": "/mcp"}')
        session = f"s-{new_id()}"
        assert stack.send(session, "alice")[0] == 200
        assert stack.on_both(session, "alice") == {ok}
        assert stack.on_both(session, "mallory") == {(404, NOT_FOUND)}

        killed = sentinel_topology.kill_master()
        started = time.monotonic()
        during: set[int] = set()

        def both_serve_alice() -> bool:
            answers = stack.on_both(session, "alice")
            during.update(status for status, _ in answers)
            return answers == {ok}

        wait_until(both_serve_alice, RECOVERY_LIMIT + 5, 0.1, "both replicas serving after the failover")
        assert time.monotonic() - started < RECOVERY_LIMIT
        assert during <= {200, 503}
        assert stack.on_both(session, "mallory") == {(404, NOT_FOUND)}  # the binding survived
        fresh = f"s-{new_id()}"
        # The new master has no replica until the killed node is back: no bind can be confirmed.
        assert stack.send(fresh, "bob")[0] == 503
        sentinel_topology.restart_as_replica(killed)
        killed = None
        assert stack.send(fresh, "bob")[0] == 200
        assert stack.on_both(fresh, "bob") == {ok}
        assert stack.on_both(fresh, "alice") == {(404, NOT_FOUND)}
        for replica in replicas:
            assert replica.alive()
            assert REDIS_PASSWORD not in replica.log_text() and SENTINEL_PASSWORD not in replica.log_text()
    finally:
        envoy.stop()
        upstream.stop()
        for replica in replicas:
            assert replica.stop() == 0, replica.log_text()
        if killed is not None:
            sentinel_topology.restart_as_replica(killed)


# ---- URLs ----


@pytest.mark.parametrize(
    "url",
    [
        "redis+sentinel://127.0.0.1:1/",  # no master name
        "redis+sentinel://127.0.0.1/mymaster",  # no port
        "redis+sentinel://127.0.0.1:99999/mymaster",
        "redis+sentinel://127.0.0.1:1,/mymaster",
        "redis+sentinel://127.0.0.1:1/mymaster/notadb",
        "redis+sentinel://127.0.0.1:1/mymaster/0/extra",
        "redis+sentinel://127.0.0.1:1/mymaster?db=1",  # an unknown parameter
        "redis+cluster://127.0.0.1:1/0",  # a Cluster has one db
        "redis+cluster://127.0.0.1:1?sentinel_password=x",
        "redis+cluster://:secret@127.0.0.1:1?replica_ack=sometimes",
        "redis://127.0.0.1:1/0?replica_ack=\x00",
    ],
)
def test_bad_redis_urls_are_refused_at_open_without_the_password(url: str) -> None:
    from gateway.session import StoreURLError

    with pytest.raises(StoreURLError) as refused:
        open_store(url, StoreSettings(10, 10))
    assert "secret" not in str(refused.value)


def test_a_cluster_key_prefix_with_a_hash_tag_is_refused(cluster_topology: ClusterTopology) -> None:
    from gateway.session import StoreURLError

    with pytest.raises(StoreURLError, match="key_prefix"):
        open_store(cluster_topology.url, StoreSettings(10, 10, key_prefix="a{b}:"))


def test_multi_host_urls_are_shown_without_passwords() -> None:
    shown = display_url("redis+sentinel://user:pw1@h1:26379,h2:26379/mymaster/2?sentinel_password=pw2")
    assert shown == "redis+sentinel://user:***@h1:26379,h2:26379/mymaster/2?[redacted]"
    assert display_url("redis+cluster://:pw1@h1:7000,[::1]:7001") == "redis+cluster://:***@h1:7000,[::1]:7001"
    assert display_url("redis+cluster://h1:7000?replica_ack=off") == "redis+cluster://h1:7000?replica_ack=off"
    assert "pw" not in display_url("redis+cluster://:p@w@h1:7000")
