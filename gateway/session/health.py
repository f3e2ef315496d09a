"""Whether the session store answers, from a light probe and from every real operation.

A gateway whose store is down fails every session check closed (503). That must be
visible where traffic is steered: the tracker tells its listener each change of state, once
(down, then up again), and the process reports NOT_SERVING while the store is down.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from gateway.session.store import Created, Loaded, SessionStore, StoreUnavailable, StoreUnconfirmed


class StoreHealth:
    """Up or down; `on_change(up, why)` hears each change. Starts unknown: the first probe or
    operation decides, and is reported whichever way it goes."""

    def __init__(
        self, store: SessionStore, on_change: Callable[[bool, str], None], interval: float = 2.0
    ) -> None:
        self._store = store
        self._on_change = on_change
        self._interval = interval
        self._up: bool | None = None
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def up(self) -> bool:
        return self._up is True

    def succeeded(self) -> None:
        if self._up is not True:
            self._set(True, "")

    def failed(self, why: str) -> None:
        if self._up is not False:
            self._set(False, why)

    def _set(self, up: bool, why: str) -> None:
        with self._lock:
            if self._up is up:
                return
            self._up = up
        self._on_change(up, why)

    def probe(self) -> bool:
        """One light request to the store; records its outcome."""
        try:
            self._store.ping()
        except StoreUnavailable as exc:
            self.failed(str(exc))
            return False
        self.succeeded()
        return True

    def start(self) -> None:
        """Probes now, then every `interval` in the background until stop()."""
        self.probe()
        self._thread = threading.Thread(target=self._run, name="store-health", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopped.wait(self._interval):
            self.probe()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(self._interval + 1.0)


class HealthTrackedStore(SessionStore):
    """Delegates to `inner`; every operation's outcome reaches the health tracker."""

    def __init__(self, inner: SessionStore, health: StoreHealth) -> None:
        self.inner = inner
        self.settings = inner.settings
        self._health = health

    def _tracked(self, call: Callable[[], Any]) -> Any:
        try:
            result = call()
        except StoreUnconfirmed:
            # The master answers; only a replica is missing or late. Every replica of the
            # gateway shares the store, so NOT_SERVING would steer traffic nowhere better and
            # would also stop the checks of existing sessions, which still work.
            raise
        except StoreUnavailable as exc:
            self._health.failed(str(exc))
            raise
        if not self._health.up:
            self._health.succeeded()
        return result

    def load(self, session_id: str, now: float) -> Loaded | None:
        # Written out, not through _tracked: this is every session check's one store call.
        try:
            loaded = self.inner.load(session_id, now)
        except StoreUnavailable as exc:
            self._health.failed(str(exc))
            raise
        if self._health._up is not True:
            self._health.succeeded()
        return loaded

    def create(self, session_id: str, data: Mapping[str, Any], now: float, max_per_owner: int) -> Created:
        created: Created = self._tracked(lambda: self.inner.create(session_id, data, now, max_per_owner))
        return created

    def replace(self, session_id: str, data: Mapping[str, Any], now: float) -> None:
        self._tracked(lambda: self.inner.replace(session_id, data, now))

    def delete(self, session_id: str) -> bool:
        deleted: bool = self._tracked(lambda: self.inner.delete(session_id))
        return deleted

    def write_raw(self, session_id: str, data: Mapping[str, Any], now: float) -> None:
        self._tracked(lambda: self.inner.write_raw(session_id, data, now))

    def scan(self, limit: int | None = None) -> Iterator[tuple[str, Mapping[str, Any]]]:
        return self.inner.scan(limit)

    def ids_of_owner(self, owner: str) -> list[str]:
        ids: list[str] = self._tracked(lambda: self.inner.ids_of_owner(owner))
        return ids

    def live_count(self) -> int | None:
        return self.inner.live_count()

    def ping(self) -> None:
        self._tracked(self.inner.ping)

    def close(self) -> None:
        self.inner.close()
