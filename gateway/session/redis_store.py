"""The Redis store (`redis://host:port/db`, `rediss://…`, `unix:///path.sock`): shared by
replicas on many hosts (Redis 6+ or Valkey).

One key per session, `<prefix><session id>`, holding the record's JSON. Expiry is native:
a bind is one EVALSHA of a script that sets the key with `PX idle_timeout` only if it is
absent (atomic, like SET NX) and keeps the per-identity cap in the same step; a check's
load is one `GETEX PX idle_timeout` (one round trip in the steady state); a tombstone is
written with the time left until its created_at + ttl. The absolute ttl of a live record
is judged from its created_at.

An idle key is gone, but its id must not be bound again by someone else (see
`gateway.session.store`): the bind script also sets a marker, `<prefix with its last
character changed>bound:<session id>`, for `ttl`. A bind that finds the marker and no
record binds nothing: it writes an `expired` tombstone (a whole ttl) in the same step and
answers with it, so the check gets 404 session_expired. Only binds pay for the marker; a
check of a live session is still one GETEX.

The per-identity cap is kept in one sorted set per owner (`<prefix minus its last
character>|owner:<owner key>`, which no session key can equal), updated by the bind
script in the same round trip, atomically. Socket timeouts are `session.store_timeout`;
an error or a timeout fails the check closed, and the next check simply reconnects.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from gateway.observe import NO_OBSERVER, Observer
from gateway.session.record import ENDED_EXPIRED, tombstone
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
)

T = TypeVar("T")
_TOMBSTONE_MARK = b'"terminated":true'
_SCAN_BATCH = 500

# KEYS[1] session key, KEYS[2] its bound marker, KEYS[3] owner set (absent for anonymous binds)
# ARGV: record JSON, idle ms, now ms, max per owner, member deadline ms, session key prefix,
#       '"owner":"<owner key>"', session id, ttl ms, an `expired` tombstone's JSON
# Returns {1} bound, {0, the stored record} the id is taken (another bind won, or it was
# bound before and is idle: then the tombstone just written), {2} the owner is at the cap.
_BIND = """
local existing = redis.call('GET', KEYS[1])
if existing then return {0, existing} end
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('SET', KEYS[1], ARGV[10], 'PX', ARGV[9])
  redis.call('DEL', KEYS[2])
  return {0, ARGV[10]}
end
if #KEYS == 3 then
  local owners = KEYS[3]
  local limit = tonumber(ARGV[4])
  redis.call('ZREMRANGEBYSCORE', owners, '-inf', ARGV[3])
  if redis.call('ZCARD', owners) >= limit then
    for _, member in ipairs(redis.call('ZRANGE', owners, 0, -1)) do
      local value = redis.call('GET', ARGV[6] .. member)
      if (not value) or string.find(value, '"terminated":true', 1, true)
          or not string.find(value, ARGV[7], 1, true) then
        redis.call('ZREM', owners, member)
      end
    end
    if redis.call('ZCARD', owners) >= limit then return {2} end
  end
  redis.call('ZADD', owners, ARGV[5], ARGV[8])
  redis.call('PEXPIRE', owners, ARGV[9])
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('SET', KEYS[2], '1', 'PX', ARGV[9])
return {1}
"""
# GETEX before Redis 6.2: the same in one round trip.
_GET_AND_SLIDE = """
local value = redis.call('GET', KEYS[1])
if value then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return value
"""


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


def _beside(prefix: str) -> str:
    """The prefix with its last character changed: keys under it never equal a session key."""
    last = prefix[-1:] or ":"
    return f"{prefix[:-1]}{'!' if last == '|' else '|'}"


def owner_set_key(prefix: str, owner: str) -> str:
    return f"{_beside(prefix)}owner:{owner}"


def bound_marker_key(prefix: str, session_id: str) -> str:
    """Set by a bind for `ttl`: the id was bound, so it is not bound again (see the docstring)."""
    return f"{_beside(prefix)}bound:{session_id}"


def _glob_escape(text: str) -> str:
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)


class RedisStore(SessionStore):
    def __init__(self, url: str, settings: StoreSettings, observer: Observer = NO_OBSERVER) -> None:
        self.settings = settings
        self._observer = observer
        self._prefix = settings.key_prefix
        self._idle_ms = str(max(1, _ms(settings.idle_timeout)))
        self._client = redis.Redis.from_url(
            url,
            socket_timeout=settings.timeout,
            socket_connect_timeout=settings.timeout,
            # One immediate retry on a broken connection (Redis restarted under a pooled
            # connection); none on a timeout, so a stalled Redis costs one timeout, not several.
            retry=Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,)),
            health_check_interval=0,
        )
        # redis-py's execute_command is untyped; one typed handle for every plain command.
        self._command: Callable[..., Any] = self._client.execute_command
        self._bind = self._client.register_script(_BIND)
        self._get_and_slide = self._client.register_script(_GET_AND_SLIDE)
        self._has_getex = True
        # The check's GETEX goes over a connection of the calling thread's own, past the pool
        # and redis-py's per-command machinery (a lock, a readiness poll, retries, metrics):
        # through Envoy that took the gateway's CPU per check from 1,122 to 890 µs
        # (bench/RESULTS.md, bench_envoy.py).
        self._idle_arguments = b"$2\r\nPX\r\n$%d\r\n%s\r\n" % (len(self._idle_ms), self._idle_ms.encode())
        # Held weakly besides: a thread's connection closes when the thread ends (the admin API
        # serves each request on a thread of its own), the rest when the store closes.
        self._own = threading.local()
        self._own_connections: weakref.WeakSet[Any] = weakref.WeakSet()
        self._own_lock = threading.Lock()
        self._closed = False
        kwargs = self._client.connection_pool.connection_kwargs
        self._operation_attributes: dict[str, dict[str, Any]] = {}
        self._span_attributes: dict[str, Any] = {"db.system.name": "redis"}
        if "host" in kwargs:
            self._span_attributes["server.address"] = str(kwargs["host"])
            self._span_attributes["server.port"] = int(kwargs.get("port", 6379))

    def _key(self, session_id: str) -> str:
        return self._prefix + session_id

    def _round_trip(self, operation: str, call: Callable[[], T]) -> T:
        """One request to Redis (a client span if the check's span records); errors → StoreUnavailable."""
        attributes = self._operation_attributes.get(operation)
        if attributes is None:
            attributes = {**self._span_attributes, "db.operation.name": operation}
            self._operation_attributes[operation] = attributes
        with self._observer.operation(f"redis {operation}", attributes, within_check=True) as request:
            try:
                return call()
            except redis.exceptions.RedisError as exc:
                request.failed(exc)
                raise StoreUnavailable(f"Redis {operation}: {type(exc).__name__}: {exc}") from None

    # ---- the interface ----
    def load(self, session_id: str, now: float) -> Loaded | None:
        key = self._key(session_id)
        try:
            raw = self._round_trip("GETEX", lambda: self._get(key))
        except StoreUnavailable as exc:
            if "WRONGTYPE" in str(exc):
                # Not a string: no record this gateway wrote. Judged legacy, and replaced.
                return Loaded({"unreadable": True})
            raise
        if raw is None:
            return None
        data = decode_record(raw)
        if _TOMBSTONE_MARK in raw and is_tombstone(data):
            # GETEX slid the tombstone too: give it back the rest of its TTL.
            left = _ms(expiry_of(data, now, self.settings) - now)
            self._round_trip("PEXPIRE", lambda: self._command("PEXPIRE", key, max(1, left)))
        return Loaded(data)

    def _own_connection(self) -> Any:
        connection = getattr(self._own, "connection", None)
        if connection is None:
            pool = self._client.connection_pool
            # The pool's class and settings: the same address, TLS, credentials, db and timeouts.
            connection = pool.connection_class(**pool.connection_kwargs)
            with self._own_lock:
                if self._closed:
                    raise redis.exceptions.ConnectionError("the store is closed")
                self._own_connections.add(connection)
            self._own.connection = connection
        return connection

    def _getex(self, key: str) -> bytes | None:
        """GETEX key PX idle, as redis-py would send it; one immediate retry on a broken connection
        (Redis restarted under it), none on a timeout. Either error leaves the connection closed,
        and the next command opens it again."""
        encoded = key.encode()
        packed = b"*4\r\n$5\r\nGETEX\r\n$%d\r\n%s\r\n%s" % (len(encoded), encoded, self._idle_arguments)
        connection = self._own_connection()
        for attempt in (1, 2):
            try:
                connection.send_packed_command((packed,), check_health=False)
                value: bytes | None = connection.read_response()
                return value
            except redis.exceptions.ConnectionError:
                connection.disconnect()
                if attempt == 2:
                    raise
            except redis.exceptions.ResponseError:
                raise  # an error reply, read whole: the connection is still in step
            except BaseException:
                connection.disconnect()  # a reply may still be on its way: never read it as the next one's
                raise
        raise AssertionError("unreachable")

    def _get(self, key: str) -> bytes | None:
        if self._has_getex:
            try:
                return self._getex(key)
            except redis.exceptions.ResponseError as exc:
                if "unknown command" not in str(exc).lower():
                    raise
                self._has_getex = False  # Redis 6.0: the script does the same in one round trip
        result: bytes | None = self._get_and_slide(keys=[key], args=[self._idle_ms])
        return result

    def create(self, session_id: str, data: Mapping[str, Any], now: float, max_per_owner: int) -> Created:
        owner = "" if is_tombstone(data) else str(data.get("owner", ""))
        keys = [self._key(session_id), bound_marker_key(self._prefix, session_id)]
        if owner:
            keys.append(owner_set_key(self._prefix, owner))
        ttl_ms = max(1, _ms(self.settings.ttl))
        args: list[str | int] = [
            encode_record(data),
            max(1, _ms(expiry_of(data, now, self.settings) - now)),
            _ms(now),
            max_per_owner,
            _ms(now) + ttl_ms,
            self._prefix,
            f'"owner":"{owner}"',
            session_id,
            ttl_ms,
            encode_record(tombstone(None, ENDED_EXPIRED, now)),
        ]
        try:
            result = self._round_trip("EVALSHA", lambda: self._bind(keys=keys, args=args))
        except StoreUnavailable as exc:
            if "WRONGTYPE" in str(exc):
                return Created(False, Loaded({"unreadable": True}))
            raise
        outcome = int(result[0])
        if outcome == 1:
            return Created(True)
        if outcome == 2:
            return Created(False, over_limit=True)
        return Created(False, Loaded(decode_record(result[1])))

    def _write(self, session_id: str, data: Mapping[str, Any], now: float, expires_at: float) -> None:
        key = self._key(session_id)
        left = _ms(expires_at - now)
        if left <= 0:
            self._round_trip("DEL", lambda: self._command("DEL", key))
            return
        self._round_trip("SET", lambda: self._command("SET", key, encode_record(data), "PX", left))

    def replace(self, session_id: str, data: Mapping[str, Any], now: float) -> None:
        self._write(session_id, data, now, expiry_of(data, now, self.settings))

    def write_raw(self, session_id: str, data: Mapping[str, Any], now: float) -> None:
        self._write(session_id, data, now, now + self.settings.ttl)

    def delete(self, session_id: str) -> bool:
        # The marker too: an operator's delete frees the id, as in the other stores.
        keys = (self._key(session_id), bound_marker_key(self._prefix, session_id))
        return bool(self._round_trip("DEL", lambda: self._command("DEL", *keys)))

    def _values(self, ids: list[str]) -> list[bytes | None]:
        keys = [self._key(i) for i in ids]
        values: list[bytes | None] = self._round_trip("MGET", lambda: self._command("MGET", *keys))
        return values

    def scan(self, limit: int | None = None) -> Iterator[tuple[str, Mapping[str, Any]]]:
        pattern = _glob_escape(self._prefix) + "*"
        cursor: int | bytes = 0
        count = 0
        while True:
            cursor, keys = self._round_trip(
                "SCAN",
                lambda c=cursor: self._command(  # type: ignore[misc]
                    "SCAN", c, "MATCH", pattern, "COUNT", _SCAN_BATCH, "TYPE", "string"
                ),
            )
            ids = [k.decode("utf-8", "replace")[len(self._prefix) :] for k in keys]
            if ids:
                for session_id, raw in zip(ids, self._values(ids), strict=True):
                    if raw is None:
                        continue
                    if limit is not None and count >= limit:
                        return
                    count += 1
                    yield session_id, decode_record(raw)
            if int(cursor) == 0:
                return

    def ids_of_owner(self, owner: str) -> list[str]:
        key = owner_set_key(self._prefix, owner)
        members = self._round_trip("ZRANGE", lambda: self._command("ZRANGE", key, 0, -1))
        ids = [m.decode("utf-8", "replace") for m in members]
        if not ids:
            return []
        now = time.time()
        live = []
        for session_id, raw in zip(ids, self._values(ids), strict=True):
            if raw is None:
                continue
            data = decode_record(raw)
            created_at = data.get("created_at")
            if (
                not is_tombstone(data)
                and data.get("owner") == owner
                and isinstance(created_at, int | float)
                and now < created_at + self.settings.ttl
            ):
                live.append(session_id)
        return live

    def ping(self) -> None:
        self._round_trip("PING", lambda: self._command("PING"))

    def close(self) -> None:
        with self._own_lock:
            self._closed = True
            own = list(self._own_connections)
        for connection in own:
            connection.disconnect()
        self._client.close()
