"""Session stores and the session lifecycle."""

from __future__ import annotations

from urllib.parse import urlsplit

from gateway.observe import NO_OBSERVER, Observer
from gateway.session import redis_url
from gateway.session.redis_url import REDIS_SCHEMES, RedisURLError
from gateway.session.store import SessionStore, StoreSettings


class StoreURLError(ValueError):
    """A store URL that names no supported store."""


def open_store(url: str, settings: StoreSettings, observer: Observer = NO_OBSERVER) -> SessionStore:
    """memory://, sqlite:///path, redis://host:port/db, rediss://…, unix:///path.sock,
    redis+sentinel://HOST:PORT[,HOST:PORT…]/MASTER_NAME[/DB], redis+cluster://HOST:PORT[,…]."""
    scheme = urlsplit(url).scheme
    if scheme == "memory":
        from gateway.session.memory import MemoryStore

        return MemoryStore(settings)
    if scheme == "sqlite":
        from gateway.session.sqlite import SQLiteStore

        return SQLiteStore(url, settings, observer)
    if scheme in REDIS_SCHEMES:
        from gateway.session.redis_store import RedisStore

        try:
            return RedisStore(url, settings, observer)
        except RedisURLError as exc:
            raise StoreURLError(str(exc)) from None
    raise StoreURLError(
        f"unsupported store URL scheme {scheme!r} (memory://, sqlite:///path, redis://, unix://,"
        " redis+sentinel://, redis+cluster://)"
    )


def display_url(url: str) -> str:
    """The store URL for a log line: a password (in the userinfo or the query) never shown."""
    return redis_url.display(url)
