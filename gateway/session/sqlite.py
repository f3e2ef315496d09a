"""The SQLite store (`sqlite:///path/to/sessions.db`): durable, shared by the worker
processes of one host.

WAL mode lets readers run while one process writes. Each thread has its own connection
(the gRPC thread pool); writes from one process take a process-wide lock first, so the
threads of a process do not pile up on SQLite's file lock, and both waits are bounded
by `session.store_timeout`: a store that does not answer in time fails the check closed.

A row has two times: `usable_until` (a live record's idle expiry; for anything else the same
as `expires_at`) and `expires_at`, when the row stops counting at all. A live record idle past
its expiry stays until its created_at + ttl (see `gateway.session.store`), so that its id
answers session_expired instead of being bound again.
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

from gateway.observe import NO_OBSERVER, Observer
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
    kept_until,
    slide_interval,
)

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    data TEXT NOT NULL,        -- the record, as JSON
    owner TEXT NOT NULL,       -- the owner key of a live record; '' for tombstones and raw records
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,  -- when the row stops counting (see gateway.session.store)
    usable_until REAL          -- a live record's idle expiry; NULL (older files): expires_at
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS sessions_by_owner ON sessions (owner) WHERE owner != '';
CREATE INDEX IF NOT EXISTS sessions_by_expiry ON sessions (expires_at);
"""
# Files written before `usable_until` existed get the column; their rows read NULL, which
# means what expires_at meant then (the idle expiry of a live record, or the end of the rest).
_ADD_USABLE_UNTIL = "ALTER TABLE sessions ADD COLUMN usable_until REAL"
_USABLE_UNTIL = "COALESCE(usable_until, expires_at)"
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


def _is_live_record(data: Mapping[str, Any]) -> bool:
    return "schema" in data and not is_tombstone(data)


class SQLiteStore(SessionStore):
    def __init__(self, url: str, settings: StoreSettings, observer: Observer = NO_OBSERVER) -> None:
        self.settings = settings
        self._observer = observer
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
            self._add_usable_until(connection)
        except (sqlite3.Error, OSError) as exc:
            raise StoreUnavailable(f"cannot open the SQLite store: {exc}") from None

    @staticmethod
    def _add_usable_until(connection: sqlite3.Connection) -> None:
        columns = {row[1] for row in connection.execute("PRAGMA table_info(sessions)")}
        if "usable_until" in columns:
            return
        try:
            connection.execute(_ADD_USABLE_UNTIL)
        except sqlite3.OperationalError as exc:
            if "duplicate column" not in str(exc):  # another worker added it just now
                raise

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
    def _loaded(self, text: str, usable_until: float) -> Loaded:
        data = decode_record(text)
        if _is_live_record(data):
            return Loaded(data, usable_until - self.settings.idle_timeout)
        return Loaded(data)

    def load(self, session_id: str, now: float) -> Loaded | None:
        rows = self._read(
            f"SELECT data, expires_at, {_USABLE_UNTIL} FROM sessions WHERE id = ?", (session_id,)
        )
        if not rows:
            return None
        text, expires_at, usable_until = rows[0]
        if now >= expires_at:
            return None
        loaded = self._loaded(text, usable_until)
        last_seen = loaded.last_seen
        idle = self.settings.idle_timeout
        # Slide a live record's idle expiry, at most once per slide interval; never one already
        # idle past it: that record is refused, not revived.
        if last_seen is not None and now < last_seen + idle and now - last_seen >= self._slide:
            self._slide_expiry(session_id, loaded.data, expires_at, usable_until, now)
        return loaded

    def _slide_expiry(
        self, session_id: str, data: Mapping[str, Any], seen_end: float, seen_usable: float, now: float
    ) -> None:
        usable_until = now + self.settings.idle_timeout
        # Only if the row is the one just read: a tombstone written meanwhile keeps its expiry.
        try:
            with self._writing(self._connection()) as connection:
                connection.execute(
                    "UPDATE sessions SET usable_until = ?, expires_at = ?"
                    f" WHERE id = ? AND expires_at = ? AND {_USABLE_UNTIL} = ?",
                    (
                        usable_until,
                        kept_until(data, usable_until, self.settings),
                        session_id,
                        seen_end,
                        seen_usable,
                    ),
                )
        except StoreUnavailable as exc:
            # The record was read; only its idle expiry did not move, so the check goes on.
            # Counted rather than logged: under write contention this could repeat per check.
            self._observer.count("authz_store_errors", _SLIDE_LABELS)
            log.debug("SQLite store: the idle expiry was not extended: %s", exc)

    def _live_count_of(self, connection: sqlite3.Connection, owner: str, now: float) -> int:
        row = connection.execute(
            f"SELECT COUNT(*) FROM sessions WHERE owner = ? AND {_USABLE_UNTIL} > ? AND created_at > ?",
            (owner, now, now - self.settings.usable_for),
        ).fetchone()
        return int(row[0])

    def create(self, session_id: str, data: Mapping[str, Any], now: float, max_per_owner: int) -> Created:
        owner = _owner_column(data)
        with self._writing(self._connection()) as connection:
            row = connection.execute(
                f"SELECT data, expires_at, {_USABLE_UNTIL} FROM sessions WHERE id = ?", (session_id,)
            ).fetchone()
            if row is not None and now < row[1]:
                # Live, ended, or idle but kept: the id is taken either way.
                return Created(False, self._loaded(row[0], row[2]))
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
            usable_until = expiry_of(data, now, self.settings)
            inserted = connection.execute(
                "INSERT INTO sessions (id, data, owner, created_at, expires_at, usable_until)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
                (
                    session_id,
                    encode_record(data),
                    owner,
                    _created_column(data, now),
                    kept_until(data, usable_until, self.settings),
                    usable_until,
                ),
            ).rowcount
            if inserted == 1:
                return Created(True)
            winner = connection.execute(
                f"SELECT data, {_USABLE_UNTIL} FROM sessions WHERE id = ?", (session_id,)
            ).fetchone()
            return Created(False, self._loaded(winner[0], winner[1]))

    def _upsert(self, session_id: str, data: Mapping[str, Any], now: float, usable_until: float) -> None:
        expires_at = kept_until(data, usable_until, self.settings)
        with self._writing(self._connection()) as connection:
            if expires_at <= now:
                connection.execute("DELETE FROM sessions WHERE id = ?", (session_id,))
                return
            connection.execute(
                "INSERT INTO sessions (id, data, owner, created_at, expires_at, usable_until)"
                " VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (id) DO UPDATE SET data = excluded.data, owner = excluded.owner,"
                " created_at = excluded.created_at, expires_at = excluded.expires_at,"
                " usable_until = excluded.usable_until",
                (
                    session_id,
                    encode_record(data),
                    _owner_column(data),
                    _created_column(data, now),
                    expires_at,
                    usable_until,
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
            f"SELECT id, data FROM sessions WHERE {_USABLE_UNTIL} > ? ORDER BY created_at LIMIT ?",
            (time.time(), -1 if limit is None else limit),
        )
        for session_id, text in rows:
            yield session_id, decode_record(text)

    def ids_of_owner(self, owner: str) -> list[str]:
        now = time.time()
        rows = self._read(
            f"SELECT id FROM sessions WHERE owner = ? AND {_USABLE_UNTIL} > ? AND created_at > ?",
            (owner, now, now - self.settings.usable_for),
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
