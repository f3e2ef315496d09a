"""The SQLite store (`sqlite:///path/to/sessions.db`): durable, shared by the worker
processes of one host.

WAL mode lets readers run while one process writes. Each thread has its own connection
(the gRPC thread pool); writes from one process take a process-wide lock first, so the
threads of a process do not pile up on SQLite's file lock, and both waits are bounded
by `session.store_timeout`: a store that does not answer in time fails the check closed.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from gateway.session.record import decode as decode_record
from gateway.session.record import encode as encode_record
from gateway.session.store import (
    Created,
    Loaded,
    SessionStore,
    StoreSettings,
    StoreUnavailable,
    expiry_of,
    is_tombstone,
    slide_interval,
)
from gateway.telemetry import metrics

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    data TEXT NOT NULL,        -- the record, as JSON
    owner TEXT NOT NULL,       -- the owner key of a live record; '' for tombstones and raw records
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL   -- when the row stops counting (see gateway.session.store)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS sessions_by_owner ON sessions (owner) WHERE owner != '';
CREATE INDEX IF NOT EXISTS sessions_by_expiry ON sessions (expires_at);
"""
_SLIDE_LABELS = {"store": "sqlite", "operation": "slide"}
# Each bind also removes up to this many expired rows, so the table does not grow forever.
_CLEANUP_BATCH = 32


def sqlite_path(url: str) -> Path:
    """`sqlite:///abs/path.db` → /abs/path.db; `sqlite://relative.db` → relative.db."""
    parts = urlsplit(url)
    raw = unquote(parts.netloc + parts.path)
    if not raw:
        raise ValueError(f"no database path in {url!r} (use sqlite:///path/to/sessions.db)")
    return Path(raw)


def _owner_column(data: Mapping[str, Any]) -> str:
    if is_tombstone(data) or "schema" not in data:
        return ""
    return str(data.get("owner", ""))


def _created_column(data: Mapping[str, Any], now: float) -> float:
    value = data.get("created_at")
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else now


class SQLiteStore(SessionStore):
    def __init__(self, url: str, settings: StoreSettings) -> None:
        self.settings = settings
        self.path = sqlite_path(url)
        self._slide = slide_interval(settings)
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._closed = False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            connection = self._connection()
            connection.execute("PRAGMA journal_mode=WAL")
            connection.executescript(_SCHEMA)  # idempotent; workers starting together wait on the lock
        except (sqlite3.Error, OSError) as exc:
            raise StoreUnavailable(f"cannot open the SQLite store: {exc}") from None

    # ---- connections ----
    def _connection(self) -> sqlite3.Connection:
        connection: sqlite3.Connection | None = getattr(self._local, "connection", None)
        if connection is None:
            if self._closed:
                raise StoreUnavailable("the SQLite store is closed")
            connection = sqlite3.connect(
                self.path,
                timeout=self.settings.timeout,  # SQLite's busy timeout: a bounded wait for the file lock
                isolation_level=None,  # transactions are explicit (BEGIN IMMEDIATE)
                check_same_thread=False,  # closed from another thread at shutdown
            )
            connection.execute("PRAGMA synchronous=NORMAL")  # durable across crashes of the process (WAL)
            self._local.connection = connection
            with self._connections_lock:
                self._connections.append(connection)
        return connection

    def _writing(self, connection: sqlite3.Connection) -> _WriteTransaction:
        return _WriteTransaction(self, connection)

    def _read(self, sql: str, args: tuple[Any, ...]) -> list[Any]:
        try:
            return self._connection().execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"SQLite: {exc}") from None

    # ---- the interface ----
    def load(self, session_id: str, now: float) -> Loaded | None:
        rows = self._read("SELECT data, expires_at FROM sessions WHERE id = ?", (session_id,))
        if not rows:
            return None
        text, expires_at = rows[0]
        if now >= expires_at:
            return None
        data = decode_record(text)
        last_slide = expires_at - self.settings.idle_timeout
        if not is_tombstone(data) and "schema" in data and now - last_slide >= self._slide:
            self._slide_expiry(session_id, expires_at, now)
        return Loaded(data)

    def _slide_expiry(self, session_id: str, seen_expiry: float, now: float) -> None:
        # Only if the row is the one just read: a tombstone written meanwhile keeps its expiry.
        try:
            with self._writing(self._connection()) as connection:
                connection.execute(
                    "UPDATE sessions SET expires_at = ? WHERE id = ? AND expires_at = ?",
                    (now + self.settings.idle_timeout, session_id, seen_expiry),
                )
        except StoreUnavailable as exc:
            # The record was read; only its idle expiry did not move, so the check goes on.
            # Counted rather than logged: under write contention this could repeat per check.
            metrics.store_errors.add(1, _SLIDE_LABELS)
            log.debug("SQLite store: the idle expiry was not extended: %s", exc)

    def _live_count_of(self, connection: sqlite3.Connection, owner: str, now: float) -> int:
        row = connection.execute(
            "SELECT COUNT(*) FROM sessions WHERE owner = ? AND expires_at > ? AND created_at > ?",
            (owner, now, now - self.settings.ttl),
        ).fetchone()
        return int(row[0])

    def create(self, session_id: str, data: Mapping[str, Any], now: float, max_per_owner: int) -> Created:
        owner = _owner_column(data)
        with self._writing(self._connection()) as connection:
            row = connection.execute(
                "SELECT data, expires_at FROM sessions WHERE id = ?", (session_id,)
            ).fetchone()
            if row is not None and now < row[1]:
                return Created(False, Loaded(decode_record(row[0])))
            if owner and self._live_count_of(connection, owner, now) >= max_per_owner:
                return Created(False, over_limit=True)
            connection.execute(
                "DELETE FROM sessions WHERE id IN (SELECT id FROM sessions WHERE expires_at <= ? LIMIT ?)",
                (now, _CLEANUP_BATCH),
            )
            if row is not None:
                connection.execute("DELETE FROM sessions WHERE id = ? AND expires_at <= ?", (session_id, now))
            # Atomic bind: under the write transaction no other process can insert the id between
            # the read above and this insert; DO NOTHING keeps a winner's row should one exist.
            inserted = connection.execute(
                "INSERT INTO sessions (id, data, owner, created_at, expires_at) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (id) DO NOTHING",
                (session_id, encode_record(data), owner, _created_column(data, now), self._expiry(data, now)),
            ).rowcount
            if inserted == 1:
                return Created(True)
            winner = connection.execute("SELECT data FROM sessions WHERE id = ?", (session_id,)).fetchone()
            return Created(False, Loaded(decode_record(winner[0])))

    def _expiry(self, data: Mapping[str, Any], now: float) -> float:
        return expiry_of(data, now, self.settings)

    def _upsert(self, session_id: str, data: Mapping[str, Any], now: float, expires_at: float) -> None:
        with self._writing(self._connection()) as connection:
            if expires_at <= now:
                connection.execute("DELETE FROM sessions WHERE id = ?", (session_id,))
                return
            connection.execute(
                "INSERT INTO sessions (id, data, owner, created_at, expires_at) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (id) DO UPDATE SET data = excluded.data, owner = excluded.owner,"
                " created_at = excluded.created_at, expires_at = excluded.expires_at",
                (
                    session_id,
                    encode_record(data),
                    _owner_column(data),
                    _created_column(data, now),
                    expires_at,
                ),
            )

    def replace(self, session_id: str, data: Mapping[str, Any], now: float) -> None:
        self._upsert(session_id, data, now, expiry_of(data, now, self.settings))

    def write_raw(self, session_id: str, data: Mapping[str, Any], now: float) -> None:
        self._upsert(session_id, data, now, now + self.settings.ttl)

    def delete(self, session_id: str) -> bool:
        with self._writing(self._connection()) as connection:
            return bool(connection.execute("DELETE FROM sessions WHERE id = ?", (session_id,)).rowcount)

    def scan(self, limit: int | None = None) -> Iterator[tuple[str, Mapping[str, Any]]]:
        rows = self._read(
            "SELECT id, data FROM sessions WHERE expires_at > ? ORDER BY created_at LIMIT ?",
            (time.time(), -1 if limit is None else limit),
        )
        for session_id, text in rows:
            yield session_id, decode_record(text)

    def ids_of_owner(self, owner: str) -> list[str]:
        now = time.time()
        rows = self._read(
            "SELECT id FROM sessions WHERE owner = ? AND expires_at > ? AND created_at > ?",
            (owner, now, now - self.settings.ttl),
        )
        return [row[0] for row in rows]

    def live_count(self) -> int | None:
        rows = self._read("SELECT COUNT(*) FROM sessions WHERE expires_at > ?", (time.time(),))
        return int(rows[0][0])

    def ping(self) -> None:
        self._read("SELECT 1", ())

    def close(self) -> None:
        self._closed = True
        with self._connections_lock:
            connections, self._connections = self._connections, []
        for connection in connections:
            with contextlib.suppress(sqlite3.Error):
                connection.close()


class _WriteTransaction:
    """BEGIN IMMEDIATE … COMMIT under the process's write lock, both waits bounded."""

    def __init__(self, store: SQLiteStore, connection: sqlite3.Connection) -> None:
        self._store = store
        self._connection = connection
        self._locked = False

    def __enter__(self) -> sqlite3.Connection:
        if not self._store._write_lock.acquire(timeout=self._store.settings.timeout):
            raise StoreUnavailable("SQLite: timed out waiting for this process's other writes")
        self._locked = True
        try:
            self._connection.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            self._release()
            raise StoreUnavailable(f"SQLite: {exc}") from None
        return self._connection

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if exc_type is None:
                self._connection.execute("COMMIT")
            else:
                self._connection.execute("ROLLBACK")
        except sqlite3.Error as error:
            if exc_type is None:
                raise StoreUnavailable(f"SQLite: {error}") from None
        finally:
            self._release()
        if isinstance(exc, sqlite3.Error):
            raise StoreUnavailable(f"SQLite: {exc}") from None

    def _release(self) -> None:
        if self._locked:
            self._locked = False
            self._store._write_lock.release()
