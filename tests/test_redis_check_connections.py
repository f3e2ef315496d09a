"""The Redis store's check-time GETEX runs on a connection per thread (redis_store.py):
threads never read each other's replies, and close() closes those connections too."""

from __future__ import annotations

import gc
import os
import threading
import time
import uuid

import pytest

from gateway.session.record import new_record, owner_key
from gateway.session.redis_store import RedisStore
from gateway.session.store import StoreSettings, StoreUnavailable
from tests.support.processes import RedisServer, tcp_sockets


def _store(server: RedisServer) -> RedisStore:
    prefix = f"t-{uuid.uuid4().hex[:8]}:"
    return RedisStore(server.url, StoreSettings(ttl=600, idle_timeout=300, key_prefix=prefix, timeout=2.0))


def test_threads_each_read_their_own_sessions(redis_server: RedisServer) -> None:
    store = _store(redis_server)
    now = time.time()
    subjects = {f"s-{n}": f"user-{n}" for n in range(8)}
    for session_id, subject in subjects.items():
        record = new_record(
            anonymous=False, bound={"iss": "i", "sub": subject}, owner=owner_key("i", subject), now=now
        )
        assert store.create(session_id, record, now, 10).created
    wrong: list[str] = []

    def reader(session_id: str, subject: str) -> None:
        for _ in range(200):
            try:
                loaded = store.load(session_id, time.time())
            except Exception as exc:  # a reply read by the wrong thread shows up as this, or below
                wrong.append(f"{session_id}: {type(exc).__name__}")
                continue
            if loaded is None or loaded.data["bound"]["sub"] != subject:
                wrong.append(session_id)

    threads = [threading.Thread(target=reader, args=item) for item in subjects.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    try:
        assert not wrong
        assert store.load("never-bound", now) is None
        # The readers' connections went with their threads: a thread per request (the admin
        # API's) leaves no socket behind.
        gc.collect()
        assert len(store._own_connections) == 1
    finally:
        store.close()


def test_close_closes_the_check_connections(redis_server: RedisServer) -> None:
    store = _store(redis_server)
    assert store.load("absent", time.time()) is None

    def to_redis() -> int:
        return sum(1 for _address, _port, state in tcp_sockets(os.getpid()) if state == "ESTABLISHED")

    before = to_redis()
    store.close()
    assert to_redis() < before
    # A new thread cannot open another one on a closed store: it fails closed.
    failure: list[BaseException] = []

    def late() -> None:
        try:
            store.load("absent", time.time())
        except StoreUnavailable as exc:
            failure.append(exc)

    thread = threading.Thread(target=late)
    thread.start()
    thread.join(10)
    assert failure


@pytest.fixture(autouse=True)
def _redis_up(redis_server: RedisServer) -> None:
    assert redis_server.alive()
