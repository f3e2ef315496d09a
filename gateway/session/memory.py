"""The in-process store (`memory://`): one process, bounded, compact.

Each record is one small bytes object (13 bytes of data): its expiry (for a live record, its
idle expiry) and creation time in centiseconds from the store's start, flags, and the slot
of its identity. A live record idle past its expiry is kept until its created_at + ttl (see
`gateway.session.store`), so its id answers session_expired instead of being bound again. An identity
(owner key + bound values) is kept once, however many sessions it holds, so a million
sessions cost a few hundred MB (see bench/bench_store.py). Records that are not
current-schema records (legacy data written by write_raw) are kept as they are.
"""

from __future__ import annotations

import struct
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from gateway.session.record import SCHEMA_VERSION
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

_HEADER = struct.Struct("<iiBI")  # usable until, created_at (centiseconds from the epoch), flags, slot
_CS_MIN, _CS_MAX = -(2**31), 2**31 - 1  # about ±248 days around the store's start
_ANONYMOUS, _TERMINATED = 1, 2
_ENDED_CODES = ("", "terminated", "revoked", "expired", "legacy")
# A futile sweep of a full store is not repeated sooner than this.
_SWEEP_BACKOFF = 1.0


class _Identity:
    """Who a record belongs to, shared by all of that identity's records."""

    __slots__ = ("slot", "owner", "keys", "values", "records")

    def __init__(self, slot: int, owner: str, keys: tuple[str, ...], values: tuple[Any, ...]) -> None:
        self.slot = slot
        self.owner = owner
        # The bound values as a tuple under a key tuple shared by all identities: a dict per
        # identity would cost ~130 bytes more. Loads build the dict (a fraction of a µs).
        self.keys = keys
        self.values = values
        self.records = 0

    def holds(self, bound: Mapping[str, Any]) -> bool:
        return tuple(bound) == self.keys and tuple(bound.values()) == self.values


@dataclass(slots=True)
class _Raw:
    """A record kept as it was written (legacy formats, migrations, times too far to pack)."""

    expires_at: float  # usable until (for a live record: its idle expiry)
    data: dict[str, Any]


def _packable(data: Mapping[str, Any]) -> bool:
    owner = data.get("owner", "")
    created_at = data.get("created_at")
    return (
        data.get("schema") == SCHEMA_VERSION
        and set(data) <= {"schema", "anonymous", "created_at", "terminated", "ended", "owner", "bound"}
        and data.get("ended", "") in _ENDED_CODES
        and isinstance(owner, str)
        and isinstance(created_at, int | float)
        and not isinstance(created_at, bool)
        and isinstance(data.get("bound", {}), dict)
    )


def _interned(values: Any) -> tuple[Any, ...]:
    # Issuers (and other shared values) are then held once for all identities.
    return tuple(sys.intern(v) if type(v) is str else v for v in values)


class MemoryStore(SessionStore):
    def __init__(self, settings: StoreSettings) -> None:
        self.settings = settings
        self._slide = slide_interval(settings)
        self._records: dict[str, bytes | _Raw] = {}
        self._identities: list[_Identity | None] = []
        self._free_slots: list[int] = []
        # owner key -> the identities (usually one) with that owner, and its live session ids
        self._variants: dict[str, list[_Identity]] = {}
        self._owner_ids: dict[str, list[str]] = {}
        self._key_tuples: dict[tuple[str, ...], tuple[str, ...]] = {}  # shared key tuples
        self._lock = threading.Lock()
        self._next_sweep = 0.0
        self._epoch = float(int(time.time()))

    # ---- packing ----
    def _identity(self, owner: str, bound: Mapping[str, Any]) -> _Identity:
        variants = self._variants.get(owner)
        if variants is not None:
            for identity in variants:
                if identity.holds(bound):
                    return identity
        slot = self._free_slots.pop() if self._free_slots else len(self._identities)
        keys = self._key_tuples.setdefault(tuple(bound), _interned(bound))
        identity = _Identity(slot, sys.intern(owner) if owner else "", keys, _interned(bound.values()))
        if slot == len(self._identities):
            self._identities.append(identity)
        else:
            self._identities[slot] = identity
        self._variants.setdefault(identity.owner, []).append(identity)
        return identity

    def _cs(self, seconds: float) -> int:
        return round((seconds - self._epoch) * 100)

    def _seconds(self, cs: int) -> float:
        return self._epoch + cs / 100

    def _pack(self, data: Mapping[str, Any], expires_at: float) -> bytes | _Raw:
        expires_cs = self._cs(expires_at)
        created_cs = self._cs(float(data.get("created_at", 0))) if _packable(data) else 0
        if not _packable(data) or not (_CS_MIN <= expires_cs <= _CS_MAX and _CS_MIN <= created_cs <= _CS_MAX):
            return _Raw(expires_at, dict(data))  # unusual data, or times too far from now to pack
        identity = self._identity(str(data.get("owner", "")), data.get("bound", {}))
        identity.records += 1
        flags = (_ANONYMOUS if data.get("anonymous") else 0) | (_TERMINATED if data.get("terminated") else 0)
        flags |= _ENDED_CODES.index(str(data.get("ended", ""))) << 2
        return _HEADER.pack(expires_cs, created_cs, flags, identity.slot)

    def _data(self, value: bytes) -> tuple[dict[str, Any], float]:
        expires_cs, created_cs, flags, slot = _HEADER.unpack(value)
        identity = self._identities[slot]
        assert identity is not None
        data = {
            "schema": SCHEMA_VERSION,
            "anonymous": bool(flags & _ANONYMOUS),
            "created_at": self._seconds(created_cs),
            "terminated": bool(flags & _TERMINATED),
            "ended": _ENDED_CODES[flags >> 2],
            "owner": identity.owner,
            "bound": dict(zip(identity.keys, identity.values, strict=True)),
        }
        return data, self._seconds(expires_cs)

    def _owner_of(self, value: bytes) -> tuple[_Identity, bool]:
        _, _, flags, slot = _HEADER.unpack(value)
        identity = self._identities[slot]
        assert identity is not None
        return identity, bool(flags & _TERMINATED)

    # ---- bookkeeping (under the lock) ----
    def _put(self, session_id: str, data: Mapping[str, Any], expires_at: float) -> None:
        self._drop(session_id)
        value = self._pack(data, expires_at)
        self._records[session_id] = value
        if isinstance(value, bytes):
            identity, terminated = self._owner_of(value)
            if identity.owner and not terminated:
                self._owner_ids.setdefault(identity.owner, []).append(session_id)

    def _drop(self, session_id: str) -> bool:
        value = self._records.pop(session_id, None)
        if value is None:
            return False
        if isinstance(value, bytes):
            identity, terminated = self._owner_of(value)
            if identity.owner and not terminated:
                ids = self._owner_ids.get(identity.owner)
                if ids is not None and session_id in ids:
                    ids.remove(session_id)
                    if not ids:
                        del self._owner_ids[identity.owner]
            identity.records -= 1
            if identity.records == 0:
                self._identities[identity.slot] = None
                self._free_slots.append(identity.slot)
                variants = self._variants[identity.owner]
                variants.remove(identity)
                if not variants:
                    del self._variants[identity.owner]
        return True

    def _kept_until(self, value: bytes | _Raw) -> float:
        """When the record may leave the store (see `kept_until`)."""
        if isinstance(value, _Raw):
            return kept_until(value.data, value.expires_at, self.settings)
        expires_cs, created_cs, flags, _ = _HEADER.unpack(value)
        if flags & _TERMINATED:
            return self._seconds(expires_cs)
        return max(self._seconds(expires_cs), self._seconds(created_cs) + self.settings.ttl)

    def _idle(self, value: bytes | _Raw, now: float) -> bool:
        """A live record past its idle expiry (kept only so that its id is refused)."""
        if isinstance(value, _Raw):
            data = value.data
            return "schema" in data and not is_tombstone(data) and now >= value.expires_at
        expires_cs, _, flags, _ = _HEADER.unpack(value)
        return not flags & _TERMINATED and now >= self._seconds(expires_cs)

    def _live(self, session_id: str, now: float) -> bytes | _Raw | None:
        value = self._records.get(session_id)
        if value is not None and now >= self._kept_until(value):
            self._drop(session_id)
            return None
        return value

    def _loaded(self, value: bytes | _Raw) -> Loaded:
        if isinstance(value, _Raw):
            data = dict(value.data)
            if "schema" in data and not is_tombstone(data):
                return Loaded(data, value.expires_at - self.settings.idle_timeout)
            return Loaded(data)
        data, usable_until = self._data(value)
        if data["terminated"]:
            return Loaded(data)
        return Loaded(data, usable_until - self.settings.idle_timeout)

    # ---- the interface ----
    def load(self, session_id: str, now: float) -> Loaded | None:
        with self._lock:
            value = self._live(session_id, now)
            if value is None:
                return None
            loaded = self._loaded(value)
            last_seen = loaded.last_seen
            idle = self.settings.idle_timeout
            # Slide a live record's idle expiry, at most once per slide interval; never one
            # already idle past it: that record is refused, not revived.
            if last_seen is not None and now < last_seen + idle and now - last_seen >= self._slide:
                if isinstance(value, _Raw):
                    value.expires_at = now + idle
                else:
                    expires_cs = self._cs(now + idle)
                    if expires_cs <= _CS_MAX:
                        self._records[session_id] = _HEADER.pack(expires_cs, *_HEADER.unpack(value)[1:])
            return loaded

    def _live_ids(self, owner: str, now: float) -> list[str]:
        ids = self._owner_ids.get(owner)
        if ids is None:
            return []
        ttl = self.settings.usable_for
        live = []
        for session_id in list(ids):
            value = self._live(session_id, now)
            if not isinstance(value, bytes):
                continue
            expires_cs, created_cs, flags, _ = _HEADER.unpack(value)
            if flags & _TERMINATED:
                continue
            if now < self._seconds(expires_cs) and now < self._seconds(created_cs) + ttl:
                live.append(session_id)
            elif session_id in ids:
                # Idle or past its TTL: it never counts again, so later binds need not look at it.
                ids.remove(session_id)
        if not ids and self._owner_ids.get(owner) is ids:
            del self._owner_ids[owner]
        return live

    def _sweep(self, now: float) -> None:
        """Drop every record past the time it is kept until (the store is full)."""
        if now < self._next_sweep:
            return
        stale = [i for i, value in self._records.items() if now >= self._kept_until(value)]
        for session_id in stale:
            self._drop(session_id)
        if len(self._records) >= self.settings.max_sessions:
            self._next_sweep = now + _SWEEP_BACKOFF

    def create(self, session_id: str, data: Mapping[str, Any], now: float, max_per_owner: int) -> Created:
        with self._lock:
            existing = self._live(session_id, now)
            if existing is not None:
                return Created(False, self._loaded(existing))
            owner = str(data.get("owner", ""))
            if owner and len(self._live_ids(owner, now)) >= max_per_owner:
                return Created(False, over_limit=True)
            if len(self._records) >= self.settings.max_sessions:
                self._sweep(now)
                if len(self._records) >= self.settings.max_sessions:
                    raise StoreUnavailable("the memory store is full (session.max_sessions)")
            self._put(session_id, data, expiry_of(data, now, self.settings))
            return Created(True)

    def replace(self, session_id: str, data: Mapping[str, Any], now: float) -> None:
        expires_at = expiry_of(data, now, self.settings)
        with self._lock:
            if kept_until(data, expires_at, self.settings) <= now:
                self._drop(session_id)  # a tombstone already past its TTL: the id is new again
            else:
                self._put(session_id, data, expires_at)

    def write_raw(self, session_id: str, data: Mapping[str, Any], now: float) -> None:
        with self._lock:
            self._drop(session_id)
            self._records[session_id] = _Raw(now + self.settings.ttl, dict(data))

    def delete(self, session_id: str) -> bool:
        with self._lock:
            return self._drop(session_id)

    def scan(self, limit: int | None = None) -> Iterator[tuple[str, Mapping[str, Any]]]:
        now = time.time()
        with self._lock:
            items = list(self._records.items())
        count = 0
        for session_id, value in items:
            if limit is not None and count >= limit:
                return
            if now >= self._kept_until(value) or self._idle(value, now):
                continue
            with self._lock:
                if self._records.get(session_id) is not value:
                    continue  # changed meanwhile; its slot may have been reused
                data = self._loaded(value).data
            count += 1
            yield session_id, data

    def ids_of_owner(self, owner: str) -> list[str]:
        with self._lock:
            return self._live_ids(owner, time.time())

    def live_count(self) -> int | None:
        return len(self._records)

    def ping(self) -> None:
        return None
