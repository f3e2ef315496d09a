"""The DPoP `jti` replay cache (gateway.identity.dpop.ReplayCache), kept beside the session
store so that a proof is single-use across every replica that shares it.

Each cache records a key (a hash of the proof key's thumbprint and the `jti`, never the proof)
until the proof could no longer pass its `iat` check, atomically, and forgets it on its own:
- memory: a dict under a lock, expired entries swept as new ones come, bounded;
- SQLite: a table of its own in the store's file, `INSERT` on a primary key in the store's
  write transaction; expired rows are deleted as new ones come;
- Redis: one `SET key 1 NX PX <ms>` on the store's connection. One key per proof, so it is
  safe in a cluster (each key has its own slot), and Redis expires it natively.
A cache that cannot answer raises StoreUnavailable: the check fails closed.
"""

from __future__ import annotations

import itertools
import math
import sqlite3
import threading
from typing import Protocol, runtime_checkable

from gateway.session import redis_layout
from gateway.session.memory import MemoryStore
from gateway.session.sqlite import SQLiteStore
from gateway.session.store import SessionStore, StoreUnavailable

DEFAULT_MAX_ENTRIES = 1_000_000
_SWEEP_EVERY = 256


class ReplayCache(Protocol):
    """gateway.identity.dpop.ReplayCache, restated: steps never import one another."""

    def first_use(self, key: str, expires_at: float, now: float) -> bool: ...


class MemoryReplayCache:
    """One process's cache (the memory store, and tests). Full of live entries, it refuses to
    answer rather than forget one early: forgetting would let that proof be replayed."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self._max_entries = max_entries
        self._expiry: dict[str, float] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._expiry)

    def first_use(self, key: str, expires_at: float, now: float) -> bool:
        with self._lock:
            known = self._expiry.get(key)
            if known is not None and known > now:
                return False
            if len(self._expiry) >= self._max_entries:
                self._sweep(now, everything=True)
                if len(self._expiry) >= self._max_entries:
                    raise StoreUnavailable("the DPoP replay cache is full")
            elif len(self._expiry) % _SWEEP_EVERY == 0:
                self._sweep(now)
            self._expiry[key] = expires_at
            return True

    def _sweep(self, now: float, everything: bool = False) -> None:
        # Insertion order is roughly expiry order: the front holds the oldest proofs.
        if everything:
            self._expiry = {k: t for k, t in self._expiry.items() if t > now}
            return
        for key in list(itertools.islice(self._expiry, _SWEEP_EVERY)):
            if self._expiry[key] <= now:
                del self._expiry[key]


_SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS dpop_replay (key TEXT PRIMARY KEY, expires_at REAL NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS dpop_replay_expiry ON dpop_replay (expires_at);
"""


class SQLiteReplayCache:
    """In the SQLite store's database: shared by the worker processes of one host."""

    def __init__(self, store: SQLiteStore, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self._store = store
        self._max_entries = max_entries
        self._inserts = 0
        try:
            self._store._connection().executescript(_SQLITE_SCHEMA)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"SQLite: {exc}") from None

    def first_use(self, key: str, expires_at: float, now: float) -> bool:
        with self._store._writing(self._store._connection()) as connection:
            row = connection.execute("SELECT expires_at FROM dpop_replay WHERE key = ?", (key,)).fetchone()
            if row is not None and row[0] > now:
                return False
            self._inserts += 1
            if self._inserts % _SWEEP_EVERY == 0:
                connection.execute("DELETE FROM dpop_replay WHERE expires_at <= ?", (now,))
                (count,) = connection.execute("SELECT count(*) FROM dpop_replay").fetchone()
                if count >= self._max_entries:
                    raise StoreUnavailable("the DPoP replay cache is full")
            connection.execute(
                "INSERT OR REPLACE INTO dpop_replay (key, expires_at) VALUES (?, ?)", (key, expires_at)
            )
            return True


class RedisReplayCache:
    """On the Redis store's connection: one `SET NX PX` per proof."""

    def __init__(self, store: RedisStoreLike, prefix: str) -> None:
        self._store = store
        self._prefix = prefix

    def first_use(self, key: str, expires_at: float, now: float) -> bool:
        ttl_ms = max(1, math.ceil((expires_at - now) * 1000))
        return self._store.set_if_absent(self._prefix + key, ttl_ms)


@runtime_checkable
class RedisStoreLike(Protocol):
    def set_if_absent(self, key: str, ttl_ms: int) -> bool: ...


def replay_key_prefix(session_prefix: str) -> str:
    """Beside the session keys, never equal to one, as the Redis store's other keys."""
    return f"{redis_layout.beside(session_prefix)}dpop-jti:"


def replay_cache_for(store: SessionStore) -> ReplayCache:
    """The replay cache that lives where `store` keeps its sessions."""
    if isinstance(store, MemoryStore):
        return MemoryReplayCache()
    if isinstance(store, SQLiteStore):
        return SQLiteReplayCache(store)
    if isinstance(store, RedisStoreLike):
        return RedisReplayCache(store, replay_key_prefix(store.settings.key_prefix))
    # Refused rather than served from this process's memory: a store shared by replicas (a
    # wrapper around one, say) with a private replay cache would let a proof be replayed at
    # another replica.
    raise TypeError(f"no DPoP replay cache for a {type(store).__name__}")
