"""The DPoP jti replay cache in each session store, and single use across replicas on real Redis."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from gateway import decision
from gateway.session.health import HealthTrackedStore, StoreHealth
from gateway.session.memory import MemoryStore
from gateway.session.redis_store import RedisStore
from gateway.session.replay import (
    MemoryReplayCache,
    RedisReplayCache,
    SQLiteReplayCache,
    replay_cache_for,
    replay_key_prefix,
)
from gateway.session.sqlite import SQLiteStore
from gateway.session.store import StoreSettings, StoreUnavailable
from tests.support.checks import check_request, http_status
from tests.support.dpop_client import DpopKey
from tests.support.inprocess import InProcessGateway
from tests.support.issuer import TestIssuer
from tests.support.processes import RedisServer, free_port

SETTINGS = StoreSettings(ttl=3600, idle_timeout=600)
HOST = "mcp.example.test"
URL = f"http://{HOST}/mcp"


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis-replay"))
    yield server
    server.stop()


def test_the_cache_for_each_store(tmp_path: Path, redis_server: RedisServer) -> None:
    assert isinstance(replay_cache_for(MemoryStore(SETTINGS)), MemoryReplayCache)
    sqlite = SQLiteStore(f"sqlite:///{tmp_path / 's.db'}", SETTINGS)
    redis_store = RedisStore(redis_server.url, SETTINGS)
    try:
        assert isinstance(replay_cache_for(sqlite), SQLiteReplayCache)
        assert isinstance(replay_cache_for(redis_store), RedisReplayCache)
        # A wrapper around a shared store gets no private cache (a proof replayable elsewhere).
        wrapped = HealthTrackedStore(redis_store, StoreHealth(redis_store, lambda up, why: None))
        with pytest.raises(TypeError):
            replay_cache_for(wrapped)
    finally:
        sqlite.close()
        redis_store.close()


def _caches(tmp_path: Path, redis_server: RedisServer) -> list[tuple[str, object, object]]:
    sqlite = SQLiteStore(f"sqlite:///{tmp_path / 's.db'}", SETTINGS)
    redis_store = RedisStore(redis_server.url, SETTINGS)
    return [
        ("memory", MemoryReplayCache(), None),
        ("sqlite", SQLiteReplayCache(sqlite), sqlite),
        ("redis", RedisReplayCache(redis_store, replay_key_prefix(SETTINGS.key_prefix)), redis_store),
    ]


def test_first_use_once_then_forgotten_after_expiry(tmp_path: Path, redis_server: RedisServer) -> None:
    for name, cache, store in _caches(tmp_path, redis_server):
        try:
            key = f"k-{name}-{free_port()}"
            assert cache.first_use(key, 1000.0, 990.0) is True, name  # type: ignore[attr-defined]
            assert cache.first_use(key, 1000.0, 995.0) is False, name  # type: ignore[attr-defined]
            if name != "redis":  # Redis expires on its own clock; the memory and SQLite caches on ours
                assert cache.first_use(key, 2000.0, 1000.5) is True, name  # type: ignore[attr-defined]
        finally:
            if store is not None:
                store.close()  # type: ignore[attr-defined]


def test_redis_keys_expire_natively_and_sit_beside_the_sessions(redis_server: RedisServer) -> None:
    import redis

    store = RedisStore(redis_server.url, SETTINGS)
    client = redis.Redis.from_url(redis_server.url)
    try:
        cache = RedisReplayCache(store, replay_key_prefix(SETTINGS.key_prefix))
        assert cache.first_use("abc", 100.0, 40.0)
        full = replay_key_prefix(SETTINGS.key_prefix) + "abc"
        assert not full.startswith(SETTINGS.key_prefix)  # never mistaken for a session id
        ttl = client.pttl(full)
        assert 55_000 < ttl <= 60_000
    finally:
        client.close()
        store.close()


def test_a_full_memory_cache_fails_closed() -> None:
    cache = MemoryReplayCache(max_entries=3)
    for i in range(3):
        assert cache.first_use(f"k{i}", 100.0, 0.0)
    with pytest.raises(StoreUnavailable):
        cache.first_use("k3", 100.0, 1.0)
    # Once the earlier entries have expired, there is room again.
    assert cache.first_use("k3", 300.0, 200.0)
    assert len(cache) == 1


def test_redis_down_fails_closed(tmp_path: Path) -> None:
    settings = StoreSettings(ttl=60, idle_timeout=60, timeout=0.2)
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", settings)
    try:
        with pytest.raises(StoreUnavailable):
            RedisReplayCache(store, "x|").first_use("k", 100.0, 0.0)
    finally:
        store.close()


def test_a_thousand_proofs_replayed_across_two_replicas_are_each_accepted_once(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    idp = TestIssuer("ES256", serve=False)
    jwks = idp.write_jwks(tmp_path / "jwks.json")
    config = {"store": redis_server.url, "auth": {"issuers": [idp.issuer_config(jwks_file=jwks)]}}
    replicas = [InProcessGateway(config), InProcessGateway(config)]
    try:
        key = DpopKey("ES256")
        token = idp.token("alice", cnf={"jkt": key.jkt})
        proofs = [key.proof("POST", URL, token) for _ in range(1000)]
        headers = [{"authorization": f"DPoP {token}", "dpop": proof} for proof in proofs]
        lock = threading.Lock()
        accepted: Counter[int] = Counter()
        refused: Counter[str] = Counter()

        def send(item: tuple[int, int]) -> None:
            index, replica = item
            response = replicas[replica].client.check(check_request(host=HOST, headers=headers[index]))
            with lock:
                if http_status(response) == 200:
                    accepted[index] += 1
                else:
                    refused[str(http_status(response))] += 1

        # Every proof goes to both replicas at about the same time, in both orders.
        work = [(i, r) for i in range(1000) for r in ((0, 1) if i % 2 else (1, 0))]
        with ThreadPoolExecutor(max_workers=16) as pool:
            list(pool.map(send, work))
        assert sorted(accepted.values()) == [1] * 1000
        assert refused == Counter({"401": 1000})
        replayed = [d for r in replicas for d in r.decisions if d.reason == decision.DPOP_PROOF_REPLAYED]
        assert len(replayed) == 1000
        assert all(d.dpop_failure == "jti" for d in replayed)
    finally:
        for replica in replicas:
            replica.stop()


def test_two_sqlite_stores_on_one_file_share_the_cache(tmp_path: Path) -> None:
    """As two worker processes would: two stores (own connections) on one database file."""
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    patient = StoreSettings(ttl=3600, idle_timeout=600, timeout=10.0)  # no refusal for a slow machine
    stores = [SQLiteStore(url, patient), SQLiteStore(url, patient)]
    try:
        caches = [SQLiteReplayCache(store) for store in stores]
        lock = threading.Lock()
        firsts: Counter[str] = Counter()

        def use(item: tuple[int, int]) -> None:
            key, which = item
            if caches[which].first_use(f"proof-{key}", 2000.0, 1000.0):
                with lock:
                    firsts[f"proof-{key}"] += 1

        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(use, [(k, w) for k in range(300) for w in (0, 1)]))
        assert sorted(firsts.values()) == [1] * 300
    finally:
        for store in stores:
            store.close()
