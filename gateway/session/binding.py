"""The session step: find a request's session, or bind it to its first user, or refuse it.

One small interface for every path that meets a session: `Binder.find_or_bind` for a
request that names one, `Binder.end` for the owner's DELETE; with `session.bind_on:
response`, `Binder.bind_issued` for an id the upstream's response hands out and
`Binder.forgotten` for one the upstream says it no longer knows. Identity arrives as plain
values (the owner's issuer and subject), the values to bind as a callable evaluated only
when the session is new; nothing here knows tokens or CEL. Time is passed in.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from gateway import decision
from gateway.config import BIND_ON_RESPONSE, SessionConfig
from gateway.session.record import (
    ENDED_TERMINATED,
    needs_tombstone,
    new_record,
    owner_key,
    refusal,
    tombstone,
    valid_session_id,
)
from gateway.session.store import SessionStore


@dataclass(frozen=True, slots=True)
class Session:
    """A live session: its id, its stored record, and whether it existed before this request."""

    key: str
    data: Mapping[str, Any]
    existed: bool


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why the session cannot be used: a reason code and a message for telemetry."""

    reason: str
    message: str


class Binder:
    def __init__(self, store: SessionStore, settings: SessionConfig) -> None:
        self.store = store
        self._settings = settings
        # Only ids a response issued are ever bound: a request never binds on first use.
        self.binds_on_response = settings.bind_on == BIND_ON_RESPONSE

    def find_or_bind(
        self,
        key: str,
        owner: tuple[str, str] | None,
        bind_values: Callable[[], Mapping[str, Any]],
        now: float,
    ) -> Session | Refusal:
        """The live session `key`, bound now to `owner` (issuer, subject; None: anonymous)
        with `bind_values()` if it is new. A bind that loses a race is judged against the
        winner's binding. Raises StoreUnavailable when the store does not answer."""
        if not valid_session_id(key, self._settings.max_id_length):
            return Refusal(decision.SESSION_ID_INVALID, "malformed session id")
        loaded = self.store.load(key, now)
        if loaded is not None:
            return self._existing(key, loaded.data, loaded.last_seen, now)
        if self.binds_on_response:
            return Refusal(decision.SESSION_UNKNOWN, "no response of the upstream issued this id")
        record = _record(owner, bind_values, now)
        if isinstance(record, Refusal):
            return record
        created = self.store.create(key, record, now, self._settings.max_per_identity)
        if created.over_limit:
            return Refusal(decision.SESSION_LIMIT_EXCEEDED, "too many live sessions")
        if created.created:
            return Session(key, record, existed=False)
        assert created.existing is not None
        return self._existing(key, created.existing.data, created.existing.last_seen, now)

    def bind_issued(
        self,
        key: str,
        owner: tuple[str, str] | None,
        bind_values: Callable[[], Mapping[str, Any]],
        now: float,
    ) -> Session | Refusal:
        """The upstream's response issued `key` to the request of `owner` (None: anonymous):
        bind it, with one atomic create-if-absent. An id already bound to the same owner and
        still live is that session (`existed`); one bound to anyone else, or ended, is refused
        as `session_reissued`: the response must not reach the client."""
        if not valid_session_id(key, self._settings.max_id_length):
            return Refusal(decision.SESSION_ID_INVALID, "the upstream issued a malformed session id")
        record = _record(owner, bind_values, now)
        if isinstance(record, Refusal):
            return record
        created = self.store.create(key, record, now, self._settings.max_per_identity)
        if created.over_limit:
            return Refusal(decision.SESSION_LIMIT_EXCEEDED, "too many live sessions")
        if created.created:
            return Session(key, record, existed=False)
        assert created.existing is not None
        existing = created.existing
        settings = self._settings
        live = refusal(existing.data, existing.last_seen, now, settings.ttl, settings.idle_timeout) is None
        if live and _same_owner(existing.data, record):
            return Session(key, existing.data, existed=True)
        why = "bound to another identity" if live else "ended, expired or unreadable"
        return Refusal(decision.SESSION_REISSUED, f"the upstream issued an id already {why}")

    def forgotten(self, key: str, owner: tuple[str, str] | None, now: float) -> bool:
        """The upstream answered a request in session `key` that it no longer knows the session:
        if it is live and `owner`'s, it ends (a `terminated` tombstone: never bound again)."""
        if not valid_session_id(key, self._settings.max_id_length):
            return False
        loaded = self.store.load(key, now)
        if loaded is None:
            return False
        settings = self._settings
        if refusal(loaded.data, loaded.last_seen, now, settings.ttl, settings.idle_timeout) is not None:
            return False
        if not _same_owner(loaded.data, _owner_fields(owner)):
            return False
        self.store.replace(key, tombstone(loaded.data, ENDED_TERMINATED, now), now)
        return True

    def end(self, session: Session, now: float) -> None:
        """The owner ended the session: a tombstone until its TTL, never re-bound."""
        self.store.replace(session.key, tombstone(session.data, ENDED_TERMINATED, now), now)

    def _existing(
        self, key: str, data: Mapping[str, Any], last_seen: float | None, now: float
    ) -> Session | Refusal:
        settings = self._settings
        reason = refusal(data, last_seen, now, settings.ttl, settings.idle_timeout)
        if reason is None:
            return Session(key, data, existed=True)
        ended = needs_tombstone(reason, data)
        if ended is not None:
            # Invalidate on read: the old record goes, and the id is never re-bound.
            self.store.replace(key, tombstone(data, ended, now), now)
        return Refusal(reason, f"stored session refused: {reason}")


def _owner_fields(owner: tuple[str, str] | None) -> dict[str, Any]:
    return {"anonymous": owner is None, "owner": "" if owner is None else owner_key(*owner)}


def _same_owner(data: Mapping[str, Any], other: Mapping[str, Any]) -> bool:
    return data.get("anonymous") is other["anonymous"] and data.get("owner") == other["owner"]


def _record(
    owner: tuple[str, str] | None, bind_values: Callable[[], Mapping[str, Any]], now: float
) -> dict[str, Any] | Refusal:
    """A new live record for `owner` (None: anonymous, nothing bound)."""
    bound = {} if owner is None else dict(bind_values())
    try:
        json.dumps(bound)
    except (TypeError, ValueError):
        return Refusal(decision.POLICY_ERROR, "session.bind values must be JSON values")
    return new_record(anonymous=owner is None, bound=bound, owner=_owner_fields(owner)["owner"], now=now)
