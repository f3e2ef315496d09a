"""Store metrics for any session store: operation durations and errors.

A thin wrapper, so every store (memory, SQLite, Redis) is measured the same way without
each one knowing about OTel. The label sets are built once, not per call.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

from gateway.session.store import Created, Loaded, SessionStore, StoreUnavailable
from gateway.telemetry import metrics

T = TypeVar("T")
_OPERATIONS = ("load", "create", "replace", "delete", "write_raw", "ids_of_owner", "ping")


class InstrumentedStore(SessionStore):
    """Delegates to `inner`, recording authz_store_operation_duration and authz_store_errors."""

    def __init__(self, inner: SessionStore, store: str) -> None:
        self.inner = inner
        self.settings = inner.settings
        self._labels = {op: {"store": store, "operation": op} for op in _OPERATIONS}

    def _timed(self, operation: str, call: Callable[[], T]) -> T:
        labels = self._labels[operation]
        started = time.perf_counter()
        try:
            return call()
        except StoreUnavailable:
            metrics.store_errors.add(1, labels)
            raise
        finally:
            metrics.store_operation_duration.record(time.perf_counter() - started, labels)

    def load(self, session_id: str, now: float) -> Loaded | None:
        return self._timed("load", lambda: self.inner.load(session_id, now))

    def create(self, session_id: str, data: Mapping[str, Any], now: float, max_per_owner: int) -> Created:
        return self._timed("create", lambda: self.inner.create(session_id, data, now, max_per_owner))

    def replace(self, session_id: str, data: Mapping[str, Any], now: float) -> None:
        self._timed("replace", lambda: self.inner.replace(session_id, data, now))

    def delete(self, session_id: str) -> bool:
        return self._timed("delete", lambda: self.inner.delete(session_id))

    def write_raw(self, session_id: str, data: Mapping[str, Any], now: float) -> None:
        self._timed("write_raw", lambda: self.inner.write_raw(session_id, data, now))

    def scan(self, limit: int | None = None) -> Iterator[tuple[str, Mapping[str, Any]]]:
        return self.inner.scan(limit)

    def ids_of_owner(self, owner: str) -> list[str]:
        return self._timed("ids_of_owner", lambda: self.inner.ids_of_owner(owner))

    def live_count(self) -> int | None:
        return self.inner.live_count()

    def ping(self) -> None:
        self._timed("ping", self.inner.ping)

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, name: str) -> Any:
        # Store-specific extras (a Redis client, a SQLite path) stay reachable.
        return getattr(self.inner, name)


def store_kind(url: str) -> str:
    """The metric label for a store URL: memory, sqlite or redis; never the URL (it may hold a password)."""
    scheme = url.partition("://")[0].lower()
    redis_schemes = ("redis", "rediss", "unix", "redis+sentinel", "redis+cluster")
    return "redis" if scheme in redis_schemes else scheme or "custom"


def instrument_store(store: SessionStore, url: str) -> SessionStore:
    return store if isinstance(store, InstrumentedStore) else InstrumentedStore(store, store_kind(url))
