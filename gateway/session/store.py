"""The session store interface, shared by the memory, SQLite and Redis stores.

A store keeps session records (plain JSON-able mappings, see `gateway.session.record`)
by session id. It knows nothing of policies: the lifecycle decides what a record means.

Every store follows the same expiry rules, so the three answer alike:
- a live record is usable until `idle_timeout` after its last use and until its
  `created_at + ttl`. An id that was bound is never simply forgotten while the upstream
  may still hold its session, or anyone presenting it later would get it bound to
  themselves (a hijack): until at least `created_at + ttl` it answers 404
  `session_expired`. Memory and SQLite keep an idle record until then and report its
  `last_seen`, so the lifecycle (`record.refusal`) refuses it and writes an `expired`
  tombstone; Redis lets the key expire natively after `idle_timeout` and keeps a small
  marker for `ttl` from the bind, and a bind that finds the marker writes the `expired`
  tombstone itself;
- a tombstone (terminated: true) stays until its created_at + ttl and is never slid:
  terminated and revoked ones keep the session's created_at, `expired` and `legacy` ones
  are created when written, so they stay a whole ttl;
- a raw record (write_raw: legacy data, migrations) stays for the ttl.
Time is passed in by the caller; Redis uses its own clock for native expiry.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any


class StoreUnavailable(Exception):
    """The store did not answer in time, or failed. The check fails closed (503)."""


class StoreUnconfirmed(StoreUnavailable):
    """The store answered, but no replica confirmed a write in time (Redis `WAIT`). The check
    fails closed (503) all the same; the store itself is up, so its health stays as it is."""


@dataclass(frozen=True, slots=True)
class Loaded:
    data: Mapping[str, Any]
    # The last use before this one (approximately: see `slide_interval`), for a live record of
    # a store that keeps idle records (memory, SQLite); `record.refusal` judges idleness from
    # it. None for tombstones and raw records, and in Redis, where an idle key is gone.
    last_seen: float | None = None


@dataclass(frozen=True, slots=True)
class Created:
    """The outcome of an atomic create-if-absent."""

    created: bool
    existing: Loaded | None = None  # the winner's record when another bind got there first
    over_limit: bool = False  # the owner already holds max_per_owner live sessions


@dataclass(frozen=True, slots=True)
class StoreSettings:
    ttl: float
    idle_timeout: float
    max_sessions: int = 1_000_000
    key_prefix: str = "authz:session:"
    timeout: float = 0.25
    # How long a record is usable when the store keeps it longer than that (handles keep an
    # expired record to refuse it); None: `ttl`.
    lifetime: float | None = None

    @property
    def usable_for(self) -> float:
        return self.ttl if self.lifetime is None else self.lifetime


def slide_interval(settings: StoreSettings) -> float:
    """How stale an idle expiry may get before a load rewrites it (memory, SQLite).

    Sliding costs a write; once a second is precise enough for idle timeouts of minutes,
    and short timeouts (tests) slide proportionally more often."""
    return min(1.0, settings.idle_timeout / 8)


def is_tombstone(data: Mapping[str, Any]) -> bool:
    return data.get("terminated") is True and "schema" in data


def expiry_of(data: Mapping[str, Any], now: float, settings: StoreSettings) -> float:
    """Until when a record written at `now` is usable: a live record's idle expiry, the end of
    a tombstone or of a raw record (see the module docstring)."""
    if is_tombstone(data):
        created_at = data.get("created_at")
        if isinstance(created_at, int | float) and not isinstance(created_at, bool):
            return float(created_at) + settings.ttl
        return now + settings.ttl
    if "schema" not in data:
        return now + settings.ttl
    return now + settings.idle_timeout


def kept_until(data: Mapping[str, Any], usable_until: float, settings: StoreSettings) -> float:
    """When a record usable until `usable_until` (its `expiry_of`) may leave a store that keeps
    idle records (memory, SQLite): a live record stays at least until its created_at + ttl,
    so that its id is refused rather than bound again; anything else when it stops being usable."""
    created_at = data.get("created_at")
    if (
        is_tombstone(data)
        or "schema" not in data
        or not isinstance(created_at, int | float)
        or isinstance(created_at, bool)
    ):
        return usable_until
    return max(usable_until, float(created_at) + settings.ttl)


class SessionStore(ABC):
    """What the gateway needs from a store. Every method may raise StoreUnavailable."""

    settings: StoreSettings

    @abstractmethod
    def load(self, session_id: str, now: float) -> Loaded | None:
        """The record, or None when there is none (never bound, or ended long enough ago).

        Loading a live record counts as use: it slides the idle expiry, unless the record is
        already idle past it (then `last_seen` tells, and it is not revived). Tombstones never
        slide.
        """

    @abstractmethod
    def create(self, session_id: str, data: Mapping[str, Any], now: float, max_per_owner: int) -> Created:
        """Store `data` only if no record exists for the id; atomic across replicas.

        When data["owner"] is non-empty and that owner already holds `max_per_owner` live
        sessions, nothing is stored and `over_limit` is set. When the id was bound before and
        is idle past its timeout, nothing is bound: `existing` is that record (with its
        `last_seen`), or an `expired` tombstone (Redis), which the lifecycle refuses.
        """

    @abstractmethod
    def replace(self, session_id: str, data: Mapping[str, Any], now: float) -> None:
        """Overwrite the record (tombstones). It lives until its created_at + ttl."""

    @abstractmethod
    def delete(self, session_id: str) -> bool:
        """Remove the record outright (operators only; checks write tombstones instead)."""

    @abstractmethod
    def write_raw(self, session_id: str, data: Mapping[str, Any], now: float) -> None:
        """Write any mapping as it is, for migrations and tests of legacy records."""

    @abstractmethod
    def scan(self, limit: int | None = None) -> Iterator[tuple[str, Mapping[str, Any]]]:
        """Every stored (id, record) that still counts, tombstones included; for operators.

        A record idle past its timeout is left out (it is no longer a live session; the
        next request with its id gets 404 session_expired)."""

    @abstractmethod
    def ids_of_owner(self, owner: str) -> list[str]:
        """The ids of the live (not ended, not idle) sessions bound to an owner key; for
        revoke-subject."""

    def live_count(self) -> int | None:
        """How many records the store holds, when it can tell cheaply."""
        return None

    @abstractmethod
    def ping(self) -> None:
        """Raise StoreUnavailable unless the store answers."""

    def close(self) -> None:  # noqa: B027 - optional for stores that hold nothing open
        """Release connections; pending writes are flushed first."""
