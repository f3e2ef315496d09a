"""The session store interface, shared by the memory, SQLite and Redis stores.

A store keeps session records (plain JSON-able mappings, see `gateway.session.record`)
by session id. It knows nothing of policies: the lifecycle decides what a record means.

Every store follows the same expiry rules, so the three answer alike (Redis natively,
memory and SQLite by keeping an expiry time next to each record):
- a live record leaves the store `idle_timeout` after its last use: it is then simply
  absent, and its id is a new id. Its absolute `ttl` is judged from its `created_at`
  by the lifecycle (`record.refusal`), which then writes an already-ended tombstone;
- a tombstone (terminated: true) stays until its created_at + ttl and is never slid;
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


@dataclass(frozen=True, slots=True)
class Loaded:
    data: Mapping[str, Any]
    # The last use before this one, for stores that judge idleness on read. The stores here
    # expire idle records themselves (see the module docstring), so they leave it None.
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


def slide_interval(settings: StoreSettings) -> float:
    """How stale an idle expiry may get before a load rewrites it (memory, SQLite).

    Sliding costs a write; once a second is precise enough for idle timeouts of minutes,
    and short timeouts (tests) slide proportionally more often."""
    return min(1.0, settings.idle_timeout / 8)


def is_tombstone(data: Mapping[str, Any]) -> bool:
    return data.get("terminated") is True and "schema" in data


def expiry_of(data: Mapping[str, Any], now: float, settings: StoreSettings) -> float:
    """When a record written at `now` leaves the store (see the module docstring)."""
    if is_tombstone(data):
        created_at = data.get("created_at")
        if isinstance(created_at, int | float) and not isinstance(created_at, bool):
            return float(created_at) + settings.ttl
        return now + settings.ttl
    if "schema" not in data:
        return now + settings.ttl
    return now + settings.idle_timeout


class SessionStore(ABC):
    """What the gateway needs from a store. Every method may raise StoreUnavailable."""

    settings: StoreSettings

    @abstractmethod
    def load(self, session_id: str, now: float) -> Loaded | None:
        """The record, or None when there is none (never bound, or expired and gone).

        Loading a live record counts as use: it slides the idle expiry. Tombstones never slide.
        """

    @abstractmethod
    def create(self, session_id: str, data: Mapping[str, Any], now: float, max_per_owner: int) -> Created:
        """Store `data` only if no record exists for the id; atomic across replicas.

        When data["owner"] is non-empty and that owner already holds `max_per_owner` live
        sessions, nothing is stored and `over_limit` is set.
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
        """Every stored (id, record), tombstones included; for operators."""

    @abstractmethod
    def ids_of_owner(self, owner: str) -> list[str]:
        """The ids of the live (not ended) sessions bound to an owner key; for revoke-subject."""

    def live_count(self) -> int | None:
        """How many records the store holds, when it can tell cheaply."""
        return None

    @abstractmethod
    def ping(self) -> None:
        """Raise StoreUnavailable unless the store answers."""

    def close(self) -> None:  # noqa: B027 - optional for stores that hold nothing open
        """Release connections; pending writes are flushed first."""
