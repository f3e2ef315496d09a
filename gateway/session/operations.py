"""What operators do with sessions: list, show, revoke one, revoke an identity's sessions.

Shared by the `authz-gateway sessions` command and the gRPC admin API, so both answer
alike. A revocation writes a `revoked` tombstone: later requests with the id get 404
`session_terminated`, and the id is never bound again for a whole TTL from the revocation
(the upstream may still hold the session: a revocation does not reach it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway import decision
from gateway.session.record import (
    ENDED_REVOKED,
    has_legacy_fields,
    owner_key,
    refusal,
    tombstone,
    valid_session_id,
)
from gateway.session.store import SessionStore

DEFAULT_LIST_LIMIT = 1000

STATE_LIVE = "live"
_STATE_OF_REASON = {
    decision.SESSION_EXPIRED: "expired",
    decision.SESSION_LEGACY_FORMAT: "legacy",
    decision.SESSION_TERMINATED: "terminated",
}


class InvalidSessionId(ValueError):
    """An id no check would accept (not visible ASCII 0x21-0x7E, or too long)."""


@dataclass(frozen=True, slots=True)
class SessionInfo:
    id: str
    state: str  # live, terminated, revoked, expired, legacy
    anonymous: bool = False
    created_at: float = 0.0
    owner: str = ""
    bound: Mapping[str, Any] = field(default_factory=dict)


def validate_id(session_id: str, max_length: int = 256) -> str:
    if not valid_session_id(session_id, max_length):
        raise InvalidSessionId(f"not a session id (visible ASCII 0x21-0x7E, at most {max_length} characters)")
    return session_id


def state_of(
    data: Mapping[str, Any],
    now: float,
    ttl: float,
    last_seen: float | None = None,
    idle: float = float("inf"),
) -> str:
    """live, terminated, revoked, expired (TTL or idle; idle only when `last_seen` is known) or legacy."""
    reason = refusal(data, last_seen, now, ttl, idle)
    if reason is None:
        return STATE_LIVE
    if reason == decision.SESSION_TERMINATED:
        return str(data.get("ended") or "terminated")
    return _STATE_OF_REASON.get(reason, "unknown")


def describe(
    session_id: str,
    data: Mapping[str, Any],
    now: float,
    ttl: float,
    last_seen: float | None = None,
    idle: float = float("inf"),
) -> SessionInfo:
    legacy = "schema" not in data or has_legacy_fields(data)
    created_at = data.get("created_at")
    bound = data.get("bound")
    return SessionInfo(
        id=session_id,
        state=state_of(data, now, ttl, last_seen, idle),
        anonymous=bool(data.get("anonymous", False)) and not legacy,
        created_at=float(created_at) if isinstance(created_at, int | float) and not legacy else 0.0,
        owner="" if legacy else str(data.get("owner", "")),
        # Never show what a legacy record carried (token hashes).
        bound=dict(bound) if isinstance(bound, Mapping) and not legacy else {},
    )


def list_sessions(
    store: SessionStore, now: float, limit: int = DEFAULT_LIST_LIMIT
) -> tuple[list[SessionInfo], bool]:
    """Up to `limit` stored sessions, and whether there are more."""
    sessions = [describe(i, data, now, store.settings.usable_for) for i, data in store.scan(limit + 1)]
    return sessions[:limit], len(sessions) > limit


def show_session(store: SessionStore, session_id: str, now: float) -> SessionInfo | None:
    # A load: for a live session it counts as a use, like a check would.
    loaded = store.load(session_id, now)
    if loaded is None:
        return None
    settings = store.settings
    lifetime, idle = settings.usable_for, settings.idle_timeout
    return describe(session_id, loaded.data, now, lifetime, loaded.last_seen, idle)


def revoke_session(store: SessionStore, session_id: str, now: float) -> str:
    """End the session (or block an unknown id for the TTL); the state before, '' when none."""
    loaded = store.load(session_id, now)
    previous = None if loaded is None else loaded.data
    store.replace(session_id, tombstone(previous, ENDED_REVOKED, now), now)
    if loaded is None:
        return ""
    settings = store.settings
    return state_of(loaded.data, now, settings.usable_for, loaded.last_seen, settings.idle_timeout)


def revoke_subject(store: SessionStore, issuer: str, subject: str, now: float) -> int:
    """Revoke every live session bound to iss + sub; how many were revoked."""
    owner = owner_key(issuer, subject)
    revoked = 0
    for session_id in store.ids_of_owner(owner):
        loaded = store.load(session_id, now)
        if loaded is None or loaded.data.get("owner") != owner or loaded.data.get("terminated"):
            continue
        store.replace(session_id, tombstone(loaded.data, ENDED_REVOKED, now), now)
        revoked += 1
    return revoked
