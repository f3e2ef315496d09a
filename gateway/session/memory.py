"""The in-process store (`memory://`): one process, bounded, compact.

Records are packed into one bytes object each (times, flags, owner, bound JSON) rather
than kept as dicts, which keeps a million sessions within a few hundred MB.
"""

from __future__ import annotations

import json
import struct
import threading
from collections.abc import Iterator, Mapping
from typing import Any

from gateway.session.record import SCHEMA_VERSION, is_live
from gateway.session.store import Created, Loaded, SessionStore, StoreSettings, StoreUnavailable

_HEADER = struct.Struct("<ddB")  # last_seen, created_at, flags
_ANONYMOUS, _TERMINATED = 1, 2
_ENDED_CODES = ("", "terminated", "revoked", "expired", "legacy")
_OWNER_BYTES = 16
# Sliding the idle timeout rewrites the record; once a second is precise enough.
_SLIDE_GRANULARITY = 1.0


def _pack(data: Mapping[str, Any], last_seen: float) -> bytes | dict[str, Any]:
    ended = str(data.get("ended", ""))
    owner = str(data.get("owner", ""))
    if data.get("schema") != SCHEMA_VERSION or ended not in _ENDED_CODES or len(owner) not in (0, 32):
        return dict(data)  # anything unusual is kept as it is (legacy records, tests)
    flags = (_ANONYMOUS if data.get("anonymous") else 0) | (_TERMINATED if data.get("terminated") else 0)
    flags |= _ENDED_CODES.index(ended) << 2
    owner_raw = bytes.fromhex(owner) if owner else b""
    bound = json.dumps(data.get("bound", {}), separators=(",", ":")).encode()
    return (
        _HEADER.pack(last_seen, float(data["created_at"]), flags)
        + bytes([len(owner_raw)])
        + owner_raw
        + bound
    )


def _unpack(value: bytes | dict[str, Any]) -> tuple[dict[str, Any], float | None]:
    if isinstance(value, dict):
        return value, None
    last_seen, created_at, flags = _HEADER.unpack_from(value)
    offset = _HEADER.size
    owner_length = value[offset]
    owner = value[offset + 1 : offset + 1 + owner_length].hex()
    bound = json.loads(value[offset + 1 + owner_length :])
    data = {
        "schema": SCHEMA_VERSION,
        "anonymous": bool(flags & _ANONYMOUS),
        "created_at": created_at,
        "terminated": bool(flags & _TERMINATED),
        "ended": _ENDED_CODES[flags >> 2],
        "owner": owner,
        "bound": bound,
    }
    return data, last_seen


class MemoryStore(SessionStore):
    def __init__(self, settings: StoreSettings) -> None:
        self.settings = settings
        self._records: dict[str, bytes | dict[str, Any]] = {}
        self._by_owner: dict[str, list[str]] = {}
        self._lock = threading.Lock()

    def load(self, session_id: str, now: float) -> Loaded | None:
        value = self._records.get(session_id)
        if value is None:
            return None
        data, last_seen = _unpack(value)
        if last_seen is not None and now - last_seen >= _SLIDE_GRANULARITY:
            with self._lock:
                # Re-read under the lock: a tombstone written meanwhile must not be undone.
                if self._records.get(session_id) is value:
                    self._records[session_id] = _pack(data, now)
        return Loaded(data, last_seen)

    def _live_ids(self, owner: str, now: float) -> list[str]:
        ids = self._by_owner.get(owner, [])
        live = []
        for session_id in ids:
            value = self._records.get(session_id)
            if value is None:
                continue
            data, _ = _unpack(value)
            if data.get("owner") == owner and is_live(data, now, self.settings.ttl):
                live.append(session_id)
        return live

    def _make_room(self, now: float) -> None:
        ttl = self.settings.ttl
        stale = []
        for session_id, value in self._records.items():
            data, _ = _unpack(value)
            created_at = data.get("created_at")
            if not isinstance(created_at, int | float) or now >= created_at + ttl:
                stale.append(session_id)
            if len(stale) >= 1024:
                break
        for session_id in stale:
            del self._records[session_id]

    def create(self, session_id: str, data: Mapping[str, Any], now: float, max_per_owner: int) -> Created:
        with self._lock:
            existing = self._records.get(session_id)
            if existing is not None:
                existing_data, last_seen = _unpack(existing)
                return Created(False, Loaded(existing_data, last_seen))
            owner = str(data.get("owner", ""))
            live: list[str] = []
            if owner:
                live = self._live_ids(owner, now)
                if len(live) >= max_per_owner:
                    self._by_owner[owner] = live
                    return Created(False, over_limit=True)
            if len(self._records) >= self.settings.max_sessions:
                self._make_room(now)
                if len(self._records) >= self.settings.max_sessions:
                    raise StoreUnavailable("the memory store is full")
            self._records[session_id] = _pack(data, now)
            if owner:
                live.append(session_id)
                self._by_owner[owner] = live
            return Created(True)

    def replace(self, session_id: str, data: Mapping[str, Any], now: float) -> None:
        with self._lock:
            self._records[session_id] = _pack(data, now)

    def write_raw(self, session_id: str, data: Mapping[str, Any], now: float) -> None:
        with self._lock:
            self._records[session_id] = dict(data)

    def delete(self, session_id: str) -> bool:
        with self._lock:
            return self._records.pop(session_id, None) is not None

    def scan(self, limit: int | None = None) -> Iterator[tuple[str, Mapping[str, Any]]]:
        for count, (session_id, value) in enumerate(list(self._records.items())):
            if limit is not None and count >= limit:
                return
            yield session_id, _unpack(value)[0]

    def ids_of_owner(self, owner: str) -> list[str]:
        return [
            session_id
            for session_id in self._by_owner.get(owner, [])
            if (value := self._records.get(session_id)) is not None and _unpack(value)[0].get("owner") == owner
        ]

    def live_count(self) -> int | None:
        return len(self._records)

    def ping(self) -> None:
        return None
