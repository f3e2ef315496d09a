"""The handle step's store side: find a presented handle, bind a minted one, end one.

Handles (MCP 2026-07-28) live in a store of the same backend as sessions, in a key space of
their own (`handle_store_settings`): `<kind>:<value>` under `handles.key_prefix`. A record is
a session record (gateway.session.record): the owner's key, the kind's `bind` values, the
creation time, tombstones. Identity arrives as plain values, time is passed in; nothing here
knows tokens or CEL.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from gateway import decision
from gateway.config import HandlesConfig
from gateway.observe import NO_OBSERVER, Observer
from gateway.session.record import (
    ENDED_EXPIRED,
    ENDED_TERMINATED,
    needs_tombstone,
    new_record,
    owner_key,
    refusal,
    tombstone,
)
from gateway.session.store import SessionStore, StoreSettings

# The server mints handles, not the caller: no per-identity cap (the store's size bounds them).
_NO_CAP = 2**62


@dataclass(frozen=True, slots=True)
class Handle:
    """A handle a request presents (existed) or a response minted (not existed before)."""

    kind: str
    value: str
    data: Mapping[str, Any]
    existed: bool

    @property
    def key(self) -> str:
        return store_key(self.kind, self.value)


@dataclass(frozen=True, slots=True)
class HandleRefused:
    """Why a handle cannot be used or bound: a reason code, a message for telemetry (never
    the handle itself), and for a mismatch the values the handle is bound to."""

    reason: str
    message: str
    bound: Mapping[str, Any] | None = None


def store_key(kind: str, value: str) -> str:
    # Kind names hold no ':', so the key names one (kind, value) pair.
    return f"{kind}:{value}"


def handle_store_settings(handles: HandlesConfig, timeout: float, max_records: int) -> StoreSettings:
    """A handle has no idle timeout: it lives until its kind's ttl, at most `handles.ttl`. The
    store keeps it `handles.expired_retention` longer: a value forgotten at its expiry would be
    one never minted, which `unknown: allow` lets through for anyone; kept, it is refused as
    expired (HandleBinder.find judges the lifetime, the store only how long to remember)."""
    kept = handles.ttl + handles.expired_retention
    return StoreSettings(
        ttl=kept,
        idle_timeout=kept,
        lifetime=handles.ttl,
        max_sessions=max_records,
        key_prefix=handles.key_prefix,
        timeout=timeout,
    )


def handle_problem(value: Any, max_length: int) -> str | None:
    """Why a presented or minted value cannot be a handle; None when it can be one.

    A string of visible ASCII (0x21-0x7E) without a comma, at most `max_length` long: a number
    or an object is never converted (a server might read 5 and "5" alike), and a comma would
    let a repeated `Mcp-Param-*` header, joined with commas, name two handles."""
    if not isinstance(value, str):
        return f"a handle must be a string, not {_json_type(value)}"
    # Visible ASCII: ASCII, printable (no controls, no DEL), and neither a space nor a comma.
    if (
        0 < len(value) <= max_length and value.isascii() and value.isprintable()
        and " " not in value and "," not in value
    ):
        return None
    return f"a handle must be 1-{max_length} visible ASCII characters without a comma"


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


class HandleBinder:
    def __init__(self, store: SessionStore, settings: HandlesConfig) -> None:
        self.store = store
        self.settings = settings
        self._max_per_identity = settings.max_per_identity

    def _ttl(self, kind_ttl: float | None) -> float:
        return self.settings.ttl if kind_ttl is None else min(kind_ttl, self.settings.ttl)

    def find(
        self,
        kind: str,
        value: str,
        owner: tuple[str, str] | None,
        kind_ttl: float | None,
        unknown_allowed: bool,
        now: float,
    ) -> Handle | HandleRefused:
        """The live handle `value` of `kind`, if it is bound to `owner` (issuer, subject; None:
        anonymous). Never changes a live record. Raises StoreUnavailable."""
        key = store_key(kind, value)
        loaded = self.store.load(key, now)
        if loaded is None:
            if unknown_allowed:
                return Handle(kind, value, {}, existed=False)
            return HandleRefused(decision.HANDLE_UNKNOWN, f"{kind}: a handle never minted")
        data = loaded.data
        ttl = self._ttl(kind_ttl)
        reason = refusal(data, None, now, ttl, ttl)
        if reason is not None:
            ended = needs_tombstone(reason, data)
            if ended is not None:
                # As for sessions: the old record goes, and the handle is never bound again.
                self.store.replace(key, tombstone(data, ended, now), now)
            if reason == decision.INTERNAL_ERROR:
                return HandleRefused(reason, f"{kind}: a stored handle of an unknown schema")
            if reason == decision.SESSION_EXPIRED or data.get("ended") == ENDED_EXPIRED:
                # Its owner's too: a handle past its ttl is over for everyone, as a session is.
                return HandleRefused(decision.HANDLE_UNKNOWN, f"{kind}: the handle has expired")
            # An ended handle is refused whatever `unknown` says: it was minted, and is over.
            return HandleRefused(decision.HANDLE_UNKNOWN, f"{kind}: stored handle refused: {reason}")
        if not _owned_by(data, owner):
            bound = data.get("bound")
            return HandleRefused(
                decision.HANDLE_MISMATCH,
                f"{kind}: the handle is bound to another identity",
                bound if isinstance(bound, Mapping) else {},
            )
        return Handle(kind, value, data, existed=True)

    def mint(
        self,
        kind: str,
        value: str,
        owner: tuple[str, str] | None,
        bind_values: Callable[[], Mapping[str, Any]],
        now: float,
        kind_ttl: float | None = None,
    ) -> Handle | HandleRefused:
        """Bind a handle a response minted to the identity that asked for it, atomically. A
        handle already bound to someone else, ended or past its kind's ttl is a re-issue:
        never re-bound."""
        bound = {} if owner is None else dict(bind_values())
        try:
            json.dumps(bound)
        except (TypeError, ValueError):
            return HandleRefused(decision.POLICY_ERROR, f"{kind}: bind values must be JSON values")
        owner_id = "" if owner is None else owner_key(*owner)
        record = new_record(anonymous=owner is None, bound=bound, owner=owner_id, now=now)
        key = store_key(kind, value)
        created = self.store.create(key, record, now, self._max_per_identity if owner else _NO_CAP)
        if created.over_limit:
            message = f"{kind}: the identity holds handles.max_per_identity live handles"
            return HandleRefused(decision.HANDLE_LIMIT_EXCEEDED, message)
        if created.created:
            return Handle(kind, value, record, existed=False)
        existing = created.existing.data if created.existing is not None else {}
        ttl = self._ttl(kind_ttl)
        if refusal(existing, None, now, ttl, ttl) is None and _owned_by(existing, owner):
            # The same handle again for its owner (a retried call): nothing to bind.
            return Handle(kind, value, existing, existed=True)
        message = f"{kind}: a response re-issues a handle bound to another identity, or ended"
        return HandleRefused(decision.HANDLE_REISSUED, message)

    def end(self, handle: Handle, now: float) -> None:
        """The owner ended the handle: a tombstone until the ttl, never bound again."""
        self.store.replace(handle.key, tombstone(handle.data, ENDED_TERMINATED, now), now)


def _owned_by(data: Mapping[str, Any], owner: tuple[str, str] | None) -> bool:
    if owner is None:
        return data.get("anonymous") is True
    return data.get("anonymous") is False and data.get("owner") == _owner_key(owner)


@functools.lru_cache(maxsize=4096)
def _owner_key(owner: tuple[str, str]) -> str:
    return owner_key(*owner)


def handle_store_url(store_url: str) -> str:
    """Where handles are kept for a session store URL: the same Redis (its own key prefix),
    or a SQLite file beside the sessions' (`sessions.db` → `sessions.handles.db`), or memory."""
    parts = urlsplit(store_url)
    if parts.scheme != "sqlite":
        return store_url
    path = parts.path or parts.netloc
    head, slash, name = path.rpartition("/")
    stem, dot, suffix = name.rpartition(".")
    handles_name = f"{stem}.handles.{suffix}" if dot and stem else f"{name}.handles"
    before, _, after = store_url.partition(path)
    return f"{before}{head}{slash}{handles_name}{after}"


def open_handle_store(
    store_url: str, handles: HandlesConfig, timeout: float, max_records: int, observer: Observer = NO_OBSERVER
) -> SessionStore:
    from gateway.session import open_store

    settings = handle_store_settings(handles, timeout, max_records)
    return open_store(handle_store_url(store_url), settings, observer)
