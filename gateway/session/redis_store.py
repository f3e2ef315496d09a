"""The Redis store: one server (`redis://`, `rediss://`, `unix://`), Sentinel
(`redis+sentinel://`) or Cluster (`redis+cluster://`); Redis 6+ or Valkey. One code path for all
three, over the slot-safe layout of `gateway.session.redis_layout`.

A check of a live session is one `GETEX PX idle_timeout` (the record's idle expiry is native;
its absolute ttl is judged from its created_at). A tombstone is written with the time left
until its created_at + ttl.

A bind is two steps, each atomic in its own slot:
1. the owner's index (its slot) takes a place for the id, unless the owner already holds
   `max_per_identity` places; then the places of sessions that are no longer live (ended, idle,
   never bound) are given back and the place is asked for once more;
2. the bind script (the session's slot) sets the record, only if there is none, and its bound
   marker for `ttl`. A bind that finds the marker and no record (the id was bound, and is idle
   past its timeout) binds nothing: it writes an `expired` tombstone in the same step.
A bind that loses the race gives its place back. The cap is exact for finished binds: a live
session always holds a place, and a place reserved less than `_RESERVATION_GRACE` ago is never
taken back (its bind may be on its way).

No acknowledged binding is lost: a write that binds or ends a session (the bind, every
tombstone) is followed on the same connection by `WAIT 1 <ms>` (bounded by
`session.store_timeout`) when the URL's `replica_ack` says so; a write no replica confirmed in
time fails the check closed (503). `replica_ack=required` (the default for Sentinel and
Cluster) always waits; `auto` (the default for one server) waits when the master reports a
connected replica (`INFO replication`, asked at most once a second); `off` never waits.

Records of the layout before this one (`P<session id>`, no hash tag) are legacy: a load that
finds no record looks for them and reports a legacy record, so the check answers 404
`session_legacy_format`, writes a `legacy` tombstone in the new layout and then deletes them.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.retry import Retry
from redis.sentinel import Sentinel

from gateway.observe import NO_OBSERVER, Observer
from gateway.session import redis_layout as layout
from gateway.session.record import ENDED_EXPIRED, tombstone
from gateway.session.record import decode as decode_record
from gateway.session.record import encode as encode_record
from gateway.session.redis_url import RedisTarget, RedisURLError, display, parse
from gateway.session.store import (
    Created,
    Loaded,
    SessionStore,
    StoreSettings,
    StoreUnavailable,
    StoreUnconfirmed,
    expiry_of,
    is_tombstone,
)

T = TypeVar("T")
_TOMBSTONE_MARK = b'"terminated":true'
_SCAN_BATCH = 500
_RESERVATION_GRACE = 5.0  # seconds; far beyond any bind that has not failed with a timeout
log = logging.getLogger(__name__)

_REPLICA_COUNT_MAX_AGE = 1.0
_SLOT_MAP_INTERVAL = 0.25  # seconds between two reads of a Cluster's slot map after errors
# Errors after which the Cluster's slot map is read again: the slot moved (failover).
_TOPOLOGY_ERRORS = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.MovedError,
    redis.exceptions.AskError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.TryAgainError,
)
# Everything redis-py raises for a store that does not answer (its Cluster client raises
# RedisClusterException when it reaches no node, IndexError when it knows none).
_ERRORS = (redis.exceptions.RedisError, redis.exceptions.RedisClusterException, IndexError)
LEGACY_LAYOUT = "legacy_layout"  # the field of the record a load reports for a legacy key


class NotConfirmed(redis.exceptions.RedisError):
    """No replica confirmed a write within the store timeout."""


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


class RedisStore(SessionStore):
    def __init__(self, url: str, settings: StoreSettings, observer: Observer = NO_OBSERVER) -> None:
        self.settings = settings
        self._observer = observer
        self._prefix = settings.key_prefix
        self._target: RedisTarget = parse(url)
        self._display = display(url)  # for log lines: never the password
        if self._target.kind == "cluster" and ("{" in self._prefix or "}" in self._prefix):
            raise RedisURLError("session.key_prefix must not hold { or } with redis+cluster:// (hash tags)")
        self._idle_ms = str(max(1, _ms(settings.idle_timeout)))
        # The replica has the whole store timeout to confirm; WAIT's own answer then gets as long
        # again to arrive, so a slow replica is a clean "not confirmed", not a broken connection.
        self._wait_ms = max(1, _ms(settings.timeout))
        self._wait_read_timeout = 2 * settings.timeout
        timeouts: dict[str, Any] = {
            "socket_timeout": settings.timeout,
            "socket_connect_timeout": settings.timeout,
            # One immediate retry on a broken connection (Redis restarted under a pooled
            # connection); none on a timeout, so a stalled Redis costs one timeout, not several.
            "retry": Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,)),
            "health_check_interval": 0,
        }
        self._lock = threading.Lock()
        self._cluster: RedisCluster | None = None
        self._slot_map_lock = threading.Lock()
        self._slot_map_read = 0.0
        self._replicas: dict[tuple[str, int], tuple[float, int]] = {}
        self._span_attributes: dict[str, Any] = {"db.system.name": "redis"}
        # One Redis server: a check's GETEX goes over a connection of the calling thread's own,
        # written directly, past redis-py's per-command machinery (the pool's lock, a readiness
        # poll, the retry wrapper, metrics hooks), which under load cost as much as the rest of
        # the check (bench/RESULTS.md, bench_envoy). Held weakly besides: a thread's connection
        # closes when the thread ends, the rest when the store closes.
        self._idle_arguments = b"$2\r\nPX\r\n$%d\r\n%s\r\n" % (len(self._idle_ms), self._idle_ms.encode())
        self._own = threading.local()
        self._own_connections: weakref.WeakSet[Any] = weakref.WeakSet()
        self._own_lock = threading.Lock()
        self._closed = False
        target = self._target
        if target.kind == "single":
            self._client: Any = redis.Redis.from_url(target.single_url, **timeouts)
            kwargs = self._client.connection_pool.connection_kwargs
            if "host" in kwargs:
                self._span_attributes["server.address"] = str(kwargs["host"])
                self._span_attributes["server.port"] = int(kwargs.get("port", 6379))
        elif target.kind == "sentinel":
            sentinel_kwargs = {
                "socket_timeout": settings.timeout,
                "socket_connect_timeout": settings.timeout,
                "username": target.sentinel_username,
                "password": target.sentinel_password,
            }
            self._sentinel = Sentinel(  # type: ignore[no-untyped-call]
                list(target.hosts),
                sentinel_kwargs=sentinel_kwargs,
                username=target.username,
                password=target.password,
                db=target.db,
                **timeouts,
            )
            self._client = self._sentinel.master_for(target.master_name)  # type: ignore[no-untyped-call]
        else:
            self._cluster_kwargs = {
                **timeouts,
                "retry": Retry(NoBackoff(), 1),
                "username": target.username,
                "password": target.password,
                "require_full_coverage": False,
            }
            self._client = None  # connected on first use: a gateway may start before its Cluster
        self._get_and_slide: Any = None
        self._has_getex = True

    # ---- connections ----
    def _keyed(self) -> Any:
        """The client for single-key commands (a RedisCluster routes them by slot)."""
        if self._target.kind != "cluster":
            return self._client
        cluster = self._cluster
        if cluster is None:
            with self._lock:
                if self._cluster is None:
                    nodes = [ClusterNode(host, port) for host, port in self._target.hosts]  # type: ignore[no-untyped-call]
                    self._cluster = RedisCluster(startup_nodes=nodes, **self._cluster_kwargs)
                cluster = self._cluster
        return cluster

    def _node(self, key: str) -> tuple[Any, tuple[str, int] | None]:
        """A client on the master that holds `key`, and its address (for spans)."""
        client = self._keyed()
        if self._target.kind == "cluster":
            node = client.get_node_from_key(key)
            if node.redis_connection is None:
                client.nodes_manager.create_redis_connections([node])
            return node.redis_connection, (str(node.host), int(node.port))
        return client, self._address_of(key)

    def _attributes(self, operation: str, address: tuple[str, int] | None) -> dict[str, Any]:
        attributes = {**self._span_attributes, "db.operation.name": operation}
        if address is not None:
            attributes["server.address"], attributes["server.port"] = address
        return attributes

    def _address_of(self, key: str | None) -> tuple[str, int] | None:
        """Which master a request goes to: the span's server.address and server.port."""
        kind = self._target.kind
        if kind == "sentinel":
            address = self._client.connection_pool.master_address
            return None if address is None else (str(address[0]), int(address[1]))
        if kind == "single" or key is None or self._cluster is None:
            return None
        try:
            node = self._cluster.get_node_from_key(key)  # type: ignore[no-untyped-call]
        except _ERRORS:
            return None
        return str(node.host), int(node.port)

    def _failed(self, operation: str, exc: Exception) -> StoreUnavailable:
        if self._target.kind == "cluster" and isinstance(exc, _TOPOLOGY_ERRORS) and self._cluster is not None:
            self._read_slot_map(self._cluster)
        if isinstance(exc, NotConfirmed):
            return StoreUnconfirmed(f"Redis {operation}: {type(exc).__name__}: {exc}")
        return StoreUnavailable(f"Redis {operation}: {type(exc).__name__}: {exc}")

    def _read_slot_map(self, cluster: RedisCluster) -> None:
        """The slot map again, so the next operation finds a promoted master: by one thread at a
        time and at most every `_SLOT_MAP_INTERVAL`; the others fail fast (their check is 503)."""
        now = time.monotonic()
        if now - self._slot_map_read < _SLOT_MAP_INTERVAL or not self._slot_map_lock.acquire(blocking=False):
            return
        try:
            self._slot_map_read = now
            with contextlib.suppress(*_ERRORS):
                cluster.nodes_manager.initialize()
        finally:
            self._slot_map_lock.release()

    def _round_trip(self, operation: str, call: Callable[[], T], key: str | None = None) -> T:
        """One request to Redis (a client span if the check's span records); errors → StoreUnavailable."""
        address = None if key is None else self._address_of(key)
        with self._observer.operation(
            f"redis {operation}", self._attributes(operation, address), within_check=True
        ) as request:
            try:
                return call()
            except _ERRORS as exc:
                request.failed(exc)
                raise self._failed(operation, exc) from None

    def _confirmed_write(
        self, key: str, operation: str, command: tuple[Any, ...], wrote: Callable[[Any], bool]
    ) -> Any:
        """`command` on the master that holds `key`, then, on the same connection and when
        `wrote(reply)`, WAIT for a replica. Unconfirmed → StoreUnavailable."""
        try:
            client, address = self._node(key)
        except _ERRORS as exc:
            raise self._failed(operation, exc) from None
        pool = client.connection_pool
        with self._observer.operation(
            f"redis {operation}", self._attributes(operation, address), within_check=True
        ) as request:
            try:
                connection = pool.get_connection()
            except _ERRORS as exc:
                request.failed(exc)
                raise self._failed(operation, exc) from None
            try:
                connection.send_command(*command)
                reply = connection.read_response()
                if not (wrote(reply) and self._wait_needed(connection, address)):
                    pool.release(connection)
                    return reply
            except redis.exceptions.ResponseError as exc:
                pool.release(connection)
                request.failed(exc)
                raise self._failed(operation, exc) from None
            except BaseException as exc:
                connection.disconnect()
                pool.release(connection)
                if isinstance(exc, _ERRORS):
                    request.failed(exc)
                    raise self._failed(operation, exc) from None
                raise
        with self._observer.operation(
            "redis WAIT", self._attributes("WAIT", address), within_check=True
        ) as request:
            try:
                connection.send_command("WAIT", 1, self._wait_ms)
                acknowledged = int(connection.read_response(timeout=self._wait_read_timeout))
                if acknowledged < 1:
                    raise NotConfirmed(f"no replica confirmed the write within {self._wait_ms} ms")
            except redis.exceptions.RedisError as exc:
                if not isinstance(exc, NotConfirmed):
                    connection.disconnect()
                request.failed(exc)
                raise self._failed(operation, exc) from None
            finally:
                pool.release(connection)
        return reply

    def _wait_needed(self, connection: Any, address: tuple[str, int] | None) -> bool:
        mode = self._target.replica_ack
        if mode != "auto":
            return mode == "required"
        where = address or ("", 0)
        now = time.monotonic()
        known = self._replicas.get(where)
        if known is None or now - known[0] > _REPLICA_COUNT_MAX_AGE:
            connection.send_command("INFO", "replication")
            try:
                text = connection.read_response()
            except redis.exceptions.ResponseError:
                # An ACL without INFO: replicas cannot be counted, so every write waits for one
                # (confirmed, or refused: never acknowledged unconfirmed where replicas may exist).
                if known is None:
                    log.warning(
                        "Redis store %s: INFO replication is refused (ACL), so replica_ack=auto waits for a "
                        "replica on every write; set replica_ack=required or off in the URL", self._display
                    )
                text = "connected_slaves:1"
            count = 0
            for line in (text.decode() if isinstance(text, bytes) else str(text)).splitlines():
                if line.startswith("connected_slaves:"):
                    count = int(line.partition(":")[2] or 0)
            known = (now, count)
            self._replicas[where] = known
        return known[1] > 0

    # ---- the interface ----
    def load(self, session_id: str, now: float) -> Loaded | None:
        key = layout.record_key(self._prefix, session_id)
        try:
            raw = self._round_trip("GETEX", lambda: self._get(key), key)
        except StoreUnavailable as exc:
            if "WRONGTYPE" in str(exc):
                # Not a string: no record this gateway wrote. Judged legacy, and replaced.
                return Loaded({"unreadable": True})
            raise
        if raw is None:
            return self._legacy(session_id)
        data = decode_record(raw)
        if _TOMBSTONE_MARK in raw and is_tombstone(data):
            # GETEX slid the tombstone too: give it back the rest of its TTL.
            left = max(1, _ms(expiry_of(data, now, self.settings) - now))
            self._round_trip("PEXPIRE", lambda: self._keyed().execute_command("PEXPIRE", key, left), key)
        return Loaded(data)

    def _legacy(self, session_id: str) -> Loaded | None:
        """A record (or bound marker) of the layout before this one: reported as a legacy record
        (no `schema`), so the lifecycle refuses it and writes a `legacy` tombstone."""
        old_record, old_marker = layout.legacy_keys(self._prefix, session_id)
        found = self._round_trip("EXISTS", lambda: self._keyed().exists(old_record, old_marker))
        return Loaded({LEGACY_LAYOUT: True}) if found else None

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

    def _own_getex(self, key: str) -> bytes | None:
        """GETEX key PX idle, as redis-py would send it, on the thread's own connection: one
        immediate retry on a broken connection (Redis restarted under it), none on a timeout. Any
        error but a whole error reply closes the connection, so a late reply is never read as the
        next command's."""
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
                raise
            except BaseException:
                connection.disconnect()
                raise
        raise AssertionError("unreachable")

    def _get(self, key: str) -> bytes | None:
        client = self._keyed()
        if self._has_getex:
            try:
                if self._target.kind == "single":
                    return self._own_getex(key)
                value: bytes | None = client.execute_command("GETEX", key, "PX", self._idle_ms)
                return value
            except redis.exceptions.ResponseError as exc:
                if "unknown command" not in str(exc).lower():
                    raise
                self._has_getex = False  # Redis 6.0: the script does the same in one round trip
        if self._get_and_slide is None:
            self._get_and_slide = client.register_script(layout.GET_AND_SLIDE)
        result: bytes | None = self._get_and_slide(keys=[key], args=[self._idle_ms])
        return result

    def create(self, session_id: str, data: Mapping[str, Any], now: float, max_per_owner: int) -> Created:
        owner = "" if is_tombstone(data) else str(data.get("owner", ""))
        ttl_ms = max(1, _ms(self.settings.ttl))
        # A place in the owner's index counts while the record is usable, not while it is kept.
        usable_ms = max(1, _ms(self.settings.usable_for))
        if owner and not self._reserve(owner, session_id, now, usable_ms, max_per_owner):
            return Created(False, over_limit=True)
        key = layout.record_key(self._prefix, session_id)
        command = (
            "EVAL", layout.BIND, 2, key, layout.bound_marker_key(self._prefix, session_id),
            encode_record(data), max(1, _ms(expiry_of(data, now, self.settings) - now)), ttl_ms,
            encode_record(tombstone(None, ENDED_EXPIRED, now)),
        )  # fmt: skip
        try:
            # A reply of 0 wrote nothing; 1 (bound) and 2 (a tombstone) wait for a replica.
            result = self._confirmed_write(key, "EVAL", command, lambda reply: int(reply[0]) != 0)
        except StoreUnavailable as exc:
            # The place in the owner's index stays: the record may exist (it is then live, and
            # counts), or not (then the place is given back once the owner reaches the cap).
            if "WRONGTYPE" in str(exc):
                return Created(False, Loaded({"unreadable": True}))
            raise
        if int(result[0]) == 1:
            return Created(True)
        existing = decode_record(result[1])
        if owner and (existing.get("owner") != owner or is_tombstone(existing)):
            index = layout.owner_index_key(self._prefix, owner)
            self._round_trip("ZREM", lambda: self._keyed().execute_command("ZREM", index, session_id), index)
        return Created(False, Loaded(existing))

    def _reserve(self, owner: str, session_id: str, now: float, ttl_ms: int, max_per_owner: int) -> bool:
        """A place in the owner's index for the id; False when the owner holds the cap in live sessions."""
        index = layout.owner_index_key(self._prefix, owner)
        args = (_ms(now), _ms(now) + ttl_ms, max_per_owner, session_id, ttl_ms)
        for attempt in range(2):
            reply = self._round_trip(
                "EVAL", lambda: self._keyed().execute_command("EVAL", layout.RESERVE, 1, index, *args), index
            )
            if not isinstance(reply, list):
                return True
            if attempt == 1:
                return False
            entries = [m.decode("utf-8", "replace") for m in reply[::2]]
            records = self._values(entries)
            markers = self._mget([layout.bound_marker_key(self._prefix, i) for i in entries])
            # Not live for sure: another record stands there (a tombstone, another owner's), or
            # the record is gone and its marker says it was bound (idle past its timeout).
            # Gone without a marker: a bind may be on its way; only an old place is given back.
            ended = [
                i
                for i, raw, mark in zip(entries, records, markers, strict=True)
                if (raw is not None and not _live_of(raw, owner)) or (raw is None and mark is not None)
            ]
            unsure = [i for i, raw, mark in zip(entries, records, markers, strict=True)
                      if raw is None and mark is None]  # fmt: skip
            if not ended and not unsure:
                return False
            for ids, cutoff in ((ended, 2**53), (unsure, _ms(now - _RESERVATION_GRACE) + ttl_ms)):
                if ids:
                    self._round_trip(
                        "EVAL",
                        lambda ids=ids, cutoff=cutoff: self._keyed().execute_command(  # type: ignore[misc]
                            "EVAL", layout.PRUNE, 1, index, cutoff, *ids
                        ),
                        index,
                    )
        return False

    def _write(self, session_id: str, data: Mapping[str, Any], now: float, expires_at: float) -> None:
        key = layout.record_key(self._prefix, session_id)
        left = _ms(expires_at - now)
        if left <= 0:
            self._confirmed_write(key, "DEL", ("DEL", key), lambda reply: True)
        else:
            self._confirmed_write(
                key, "SET", ("SET", key, encode_record(data), "PX", left), lambda reply: True
            )
        # Only now, with the tombstone confirmed: a record of the old layout goes.
        old = layout.legacy_keys(self._prefix, session_id)
        self._round_trip("DEL", lambda: self._keyed().delete(*old))

    def replace(self, session_id: str, data: Mapping[str, Any], now: float) -> None:
        self._write(session_id, data, now, expiry_of(data, now, self.settings))

    def write_raw(self, session_id: str, data: Mapping[str, Any], now: float) -> None:
        self._write(session_id, data, now, now + self.settings.ttl)

    def delete(self, session_id: str) -> bool:
        # The marker too: an operator's delete frees the id, as in the other stores.
        key = layout.record_key(self._prefix, session_id)
        keys = (key, layout.bound_marker_key(self._prefix, session_id))
        deleted = self._round_trip("DEL", lambda: self._keyed().execute_command("DEL", *keys), key)
        old = layout.legacy_keys(self._prefix, session_id)
        return bool(deleted) | bool(self._round_trip("DEL", lambda: self._keyed().delete(*old)))

    def _values(self, ids: list[str]) -> list[bytes | None]:
        return self._mget([layout.record_key(self._prefix, i) for i in ids])

    def _mget(self, keys: list[str]) -> list[bytes | None]:
        if not keys:
            return []
        client = self._keyed()
        if self._target.kind == "cluster":
            values: list[bytes | None] = self._round_trip("MGET", lambda: client.mget_nonatomic(keys))
        else:
            values = self._round_trip("MGET", lambda: client.execute_command("MGET", *keys))
        return values

    def _record_keys(self) -> Iterator[list[str]]:
        pattern = layout.record_pattern(self._prefix)
        client = self._keyed()
        if self._target.kind == "cluster":
            found = self._round_trip(
                "SCAN", lambda: list(client.scan_iter(match=pattern, count=_SCAN_BATCH, _type="string"))
            )
            yield [k.decode("utf-8", "replace") for k in found]
            return
        cursor: int | bytes = 0
        while True:
            cursor, keys = self._round_trip(
                "SCAN",
                lambda c=cursor: client.execute_command(  # type: ignore[misc]
                    "SCAN", c, "MATCH", pattern, "COUNT", _SCAN_BATCH, "TYPE", "string"
                ),
            )
            yield [k.decode("utf-8", "replace") for k in keys]
            if int(cursor) == 0:
                return

    def scan(self, limit: int | None = None) -> Iterator[tuple[str, Mapping[str, Any]]]:
        count = 0
        for keys in self._record_keys():
            ids = [i for i in (layout.session_id_of(self._prefix, k) for k in keys) if i is not None]
            for start in range(0, len(ids), _SCAN_BATCH):
                batch = ids[start : start + _SCAN_BATCH]
                for session_id, raw in zip(batch, self._values(batch), strict=True):
                    if raw is None:
                        continue
                    if limit is not None and count >= limit:
                        return
                    count += 1
                    yield session_id, decode_record(raw)

    def ids_of_owner(self, owner: str) -> list[str]:
        index = layout.owner_index_key(self._prefix, owner)
        members = self._round_trip(
            "ZRANGE", lambda: self._keyed().execute_command("ZRANGE", index, 0, -1), index
        )
        ids = [m.decode("utf-8", "replace") for m in members]
        now = time.time()
        live = []
        for session_id, raw in zip(ids, self._values(ids), strict=True):
            if raw is None:
                continue
            data = decode_record(raw)
            created_at = data.get("created_at")
            if (
                _live_of(raw, owner)
                and isinstance(created_at, int | float)
                and now < created_at + self.settings.ttl
            ):
                live.append(session_id)
        return live

    def set_if_absent(self, key: str, ttl_ms: int) -> bool:
        """`SET key 1 NX PX ttl_ms` (the DPoP replay cache, gateway/session/replay.py): True
        when this call created the key. One key, so one slot in a cluster."""
        # Confirmed on a replica like a bind: a jti lost in a failover could be replayed once.
        created = self._confirmed_write(
            key, "SET", ("SET", key, b"1", "NX", "PX", ttl_ms), lambda reply: reply is not None
        )
        return created is not None

    def ping(self) -> None:
        """PING the master (every master of a Cluster): a failover shows here."""
        if self._target.kind == "cluster":
            self._round_trip("PING", lambda: self._keyed().ping(target_nodes=RedisCluster.PRIMARIES))
        else:
            self._round_trip("PING", lambda: self._client.execute_command("PING"))

    def close(self) -> None:
        with self._own_lock:
            self._closed = True
            own = list(self._own_connections)
        for connection in own:
            connection.disconnect()
        client = self._cluster if self._target.kind == "cluster" else self._client
        if client is not None:
            client.close()


def _live_of(raw: bytes | None, owner: str) -> bool:
    """Whether a stored value is a live record of `owner` (neither gone nor a tombstone)."""
    if raw is None or _TOMBSTONE_MARK in raw:
        return False
    data = decode_record(raw)
    return data.get("owner") == owner and not is_tombstone(data) and "schema" in data
