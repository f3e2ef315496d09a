"""The session store interface, shared by the memory, SQLite and Redis stores.

A store keeps session records (plain JSON-able mappings, see `gateway.session.record`)
by session id. It knows nothing of policies: the lifecycle decides what a record means.
Time is passed in by the caller, so stores that keep their own clocks (Redis) and those
that do not (memory, SQLite) answer the same questions the same way.
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
    # When the store tracks idleness itself (memory, SQLite): the last use before this one.
    # None where the store expires idle records natively (Redis).
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


class SessionStore(ABC):
    """What the gateway needs from a store. Every method may raise StoreUnavailable."""

    settings: StoreSettings

    @abstractmethod
    def load(self, session_id: str, now: float) -> Loaded | None:
        """The record, or None when there is none (never bound, or expired and gone).

        Loading counts as use: it slides the idle timeout.
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
        """The ids of the sessions bound to an owner key; for revoke-subject."""

    def live_count(self) -> int | None:
        """How many records the store holds, when it can tell cheaply."""
        return None

    @abstractmethod
    def ping(self) -> None:
        """Raise StoreUnavailable unless the store answers."""

    def close(self) -> None:  # noqa: B027 - optional for stores that hold nothing open
        """Release connections; pending writes are flushed first."""
