"""Session records and what they mean: pure functions, no I/O, time passed in.

A record is a JSON object:
    {"schema": 1, "anonymous": false, "created_at": 1764140000.0, "terminated": false,
     "ended": "", "owner": "<hash of iss+sub>", "bound": {"iss": "...", "sub": "..."}}
A record without `schema`, or with token-hash fields, is a legacy record: it is
invalidated on read and never re-bound.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

from gateway import decision
from gateway.text import safe_value

SCHEMA_VERSION = 1
LEGACY_FIELD_NAMES = frozenset({"vmcp.token.hash", "vmcp.token.salt"})

ENDED_TERMINATED = "terminated"
ENDED_REVOKED = "revoked"
ENDED_EXPIRED = "expired"
ENDED_LEGACY = "legacy"

_ENDED_REASON = {
    ENDED_TERMINATED: decision.SESSION_TERMINATED,
    ENDED_REVOKED: decision.SESSION_TERMINATED,
    ENDED_EXPIRED: decision.SESSION_EXPIRED,
    ENDED_LEGACY: decision.SESSION_LEGACY_FORMAT,
}
# Tombstones that live a whole TTL from when they are written (see `tombstone`).
_ENDS_NOW = frozenset({ENDED_EXPIRED, ENDED_REVOKED, ENDED_LEGACY})


# Visible ASCII (MCP's rule for session ids) without the comma: HTTP joins a repeated header
# with commas, and an upstream may read only the first value of "victim-id,other".
_SESSION_ID = re.compile(r"[\x21-\x2b\x2d-\x7e]+")


def valid_session_id(session_id: str, max_length: int) -> bool:
    return 0 < len(session_id) <= max_length and _SESSION_ID.fullmatch(session_id) is not None


def encode(data: Mapping[str, Any]) -> str:
    """A record as stored JSON text. Compact separators: the Redis bind script recognises
    tombstones and owners by these bytes."""
    return json.dumps(data, separators=(",", ":"))


def decode(text: str | bytes) -> dict[str, Any]:
    """Stored JSON text as a record; anything unreadable has no schema, so it is judged a
    legacy record and replaced on read."""
    try:
        value = json.loads(text)
    except ValueError:
        return {"unreadable": True}
    return value if isinstance(value, dict) else {"unreadable": True}


def owner_key(issuer: str, subject: str) -> str:
    """A stable, non-reversible key for one identity, used for caps and revocation."""
    return hashlib.sha256(f"{issuer}\n{subject}".encode()).hexdigest()[:32]


def new_record(*, anonymous: bool, bound: Mapping[str, Any], owner: str, now: float) -> dict[str, Any]:
    return {
        "schema": SCHEMA_VERSION,
        "anonymous": anonymous,
        "created_at": now,
        "terminated": False,
        "ended": "",
        "owner": owner,
        "bound": dict(bound),
    }


def tombstone(previous: Mapping[str, Any] | None, ended: str, now: float) -> dict[str, Any]:
    """An ended session, keeping nothing a legacy record carried.

    A session its owner terminated (DELETE, which the upstream saw too) keeps its creation
    time, so its tombstone lives out the session's TTL. An `expired`, `revoked` or `legacy`
    tombstone is new as of `now` and lives a whole TTL from now: the record it replaces may be
    past its end already (or has none we trust), and the upstream may still hold the session,
    so the id must not be bound again by someone else for that long.
    """
    created_at = now
    anonymous = False
    owner = ""
    if previous is not None and not has_legacy_fields(previous) and "schema" in previous:
        value = previous.get("created_at")
        created_at = float(value) if isinstance(value, int | float) and not isinstance(value, bool) else now
        anonymous = bool(previous.get("anonymous", False))
        owner = str(previous.get("owner", ""))
    return {
        "schema": SCHEMA_VERSION,
        "anonymous": anonymous,
        "created_at": now if ended in _ENDS_NOW else created_at,
        "terminated": True,
        "ended": ended,
        "owner": owner,
        "bound": {},
    }


_RECORD_KEYS = frozenset({"schema", "anonymous", "created_at", "terminated", "ended", "owner", "bound"})


def _legacy_key(key: object) -> bool:
    lowered = str(key).lower()
    return lowered in LEGACY_FIELD_NAMES or "token_hash" in lowered or "token_salt" in lowered


def has_legacy_fields(data: Mapping[str, Any], depth: int = 0) -> bool:
    """Token-hash fields anywhere in the record (a few levels deep) mark an old schema."""
    if depth == 0 and type(data) is dict and data.keys() <= _RECORD_KEYS:
        # The common case, on the hot path: a current record; only `bound` can hide old fields.
        bound = data.get("bound")
        return type(bound) is dict and bool(bound) and has_legacy_fields(bound, 1)
    if depth > 4:
        return False
    for key, value in data.items():
        if _legacy_key(key):
            return True
        if type(value) is dict and has_legacy_fields(value, depth + 1):
            return True
    return False


def refusal(
    data: Mapping[str, Any], last_seen: float | None, now: float, ttl: float, idle: float
) -> str | None:
    """Why a stored record cannot be used (a reason code), or None when it is live."""
    # Stores hand back plain dicts (decoded JSON); anything else is not a record of ours.
    if type(data) is not dict or "schema" not in data or has_legacy_fields(data):
        return decision.SESSION_LEGACY_FORMAT
    if data.get("schema") != SCHEMA_VERSION:
        # Written by a newer gateway: neither trust it nor destroy it.
        return decision.INTERNAL_ERROR
    created_at = data.get("created_at")
    bound = data.get("bound", {})
    if type(created_at) not in (int, float) or type(bound) is not dict:
        return decision.SESSION_LEGACY_FORMAT
    if not safe_value(bound):
        # Bound before NULs were refused: the native engine would compare a cut-short value.
        return decision.SESSION_LEGACY_FORMAT
    assert isinstance(created_at, int | float)
    if data.get("terminated", False):
        return _ENDED_REASON.get(str(data.get("ended", "")), decision.SESSION_TERMINATED)
    if now >= created_at + ttl:
        return decision.SESSION_EXPIRED
    if last_seen is not None and now >= last_seen + idle:
        return decision.SESSION_EXPIRED
    return None


def needs_tombstone(reason: str, data: Mapping[str, Any]) -> str | None:
    """Which tombstone replaces a record refused for `reason` (None: leave the record as it is)."""
    if data.get("schema") == SCHEMA_VERSION and data.get("terminated") is True:
        return None  # already a tombstone
    if reason == decision.SESSION_LEGACY_FORMAT:
        return ENDED_LEGACY
    if reason == decision.SESSION_EXPIRED:
        return ENDED_EXPIRED
    return None
