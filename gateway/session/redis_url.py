"""Redis store URLs: one server, Sentinel, Cluster; parsed here, never logged with a password.

- `redis://[user:password@]host:port/db`, `rediss://…`, `unix:///path.sock?db=N`: one server
  (redis-py's own URL syntax);
- `redis+sentinel://[user:password@]HOST:PORT[,HOST:PORT…]/MASTER_NAME[/DB]`: the sentinels'
  addresses, the master's name; the userinfo authenticates to Redis, the query parameters
  `sentinel_username` / `sentinel_password` to the sentinels (none by default);
- `redis+cluster://[user:password@]HOST:PORT[,HOST:PORT…]`: any nodes of the Cluster (startup
  nodes; the client learns the rest).

Every scheme takes `replica_ack=auto|required|off` (see `gateway.session.redis_store`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

SINGLE_SCHEMES = ("redis", "rediss", "unix")
SENTINEL_SCHEME = "redis+sentinel"
CLUSTER_SCHEME = "redis+cluster"
REDIS_SCHEMES = (*SINGLE_SCHEMES, SENTINEL_SCHEME, CLUSTER_SCHEME)

REPLICA_ACK_MODES = ("auto", "required", "off")
_OWN_PARAMETERS = ("replica_ack", "sentinel_username", "sentinel_password")


class RedisURLError(ValueError):
    """A Redis store URL that cannot be used; the message never holds the password."""


@dataclass(frozen=True, slots=True)
class RedisTarget:
    kind: str  # "single", "sentinel" or "cluster"
    replica_ack: str
    # The redis-py URL for one server, without this module's parameters (it holds the password).
    single_url: str = field(default="", repr=False)
    hosts: tuple[tuple[str, int], ...] = ()
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    master_name: str = ""
    db: int = 0
    sentinel_username: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)


def _split_hosts(netloc: str, scheme: str) -> tuple[tuple[tuple[str, int], ...], str | None, str | None]:
    userinfo, at, hostlist = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    hosts = []
    for item in hostlist.split(","):
        if item.startswith("["):
            host, _, rest = item[1:].partition("]")
            port_text = rest[1:] if rest.startswith(":") else ""
        else:
            host, _, port_text = item.rpartition(":")
        if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
            # The item is not quoted: with a password holding a `/`, it may be part of it.
            raise RedisURLError(f"{scheme}:// needs HOST:PORT[,HOST:PORT…] after any user:password@")
        hosts.append((host, int(port_text)))
    return tuple(hosts), username, password


def parse(url: str) -> RedisTarget:
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise RedisURLError(f"unparseable Redis URL {display(url)}") from exc
    scheme = parts.scheme.lower()
    query = parse_qsl(parts.query, keep_blank_values=True)
    own = {k: v for k, v in query if k in _OWN_PARAMETERS}
    replica_ack = own.get("replica_ack", "auto" if scheme in SINGLE_SCHEMES else "required")
    if replica_ack not in REPLICA_ACK_MODES:
        raise RedisURLError(f"replica_ack must be one of {', '.join(REPLICA_ACK_MODES)}")
    if scheme in SINGLE_SCHEMES:
        # Rebuilt by hand: urlunsplit would turn unix:///path into unix:/path.
        base, _, _ = url.partition("?")
        rest = urlencode([(k, v) for k, v in query if k not in _OWN_PARAMETERS])
        return RedisTarget("single", replica_ack, single_url=f"{base}?{rest}" if rest else base)
    if scheme not in (SENTINEL_SCHEME, CLUSTER_SCHEME):
        raise RedisURLError(f"not a Redis URL scheme: {scheme!r}")
    unknown = sorted({k for k, _ in query} - set(_OWN_PARAMETERS))
    if unknown:
        # Not named: with a password holding a `?` unescaped, a "parameter" may be part of it.
        raise RedisURLError(f"{scheme}:// takes only the parameters {', '.join(_OWN_PARAMETERS)}")
    hosts, username, password = _split_hosts(parts.netloc, scheme)
    if scheme == CLUSTER_SCHEME:
        if parts.path.strip("/") or "sentinel_password" in own or "sentinel_username" in own:
            raise RedisURLError("redis+cluster:// takes HOST:PORT[,HOST:PORT…] only (a Cluster has one db)")
        return RedisTarget("cluster", replica_ack, hosts=hosts, username=username, password=password)
    segments = parts.path.strip("/").split("/")
    master = unquote(segments[0]) if segments else ""
    if not master or len(segments) > 2 or (len(segments) == 2 and not segments[1].isdigit()):
        raise RedisURLError("redis+sentinel:// needs /MASTER_NAME[/DB] after the sentinels' addresses")
    return RedisTarget(
        "sentinel",
        replica_ack,
        hosts=hosts,
        username=username,
        password=password,
        master_name=master,
        db=int(segments[1]) if len(segments) == 2 else 0,
        sentinel_username=own.get("sentinel_username") or None,
        sentinel_password=own.get("sentinel_password") or None,
    )


def display(url: str) -> str:
    """A store URL for a log line: passwords never shown, in the userinfo or the query.

    A password may hold `/`, `?`, `#` or `@` unescaped, so where the userinfo ends is read from
    the last `@` (hosts, paths and Redis parameters hold none), never from the URL's structure."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "[unparseable]"
    userinfo, at, address = rest.rpartition("@")
    shown = ""
    if at:
        if "?" in userinfo and "password" in userinfo.lower():  # the `@` may be in a query's password
            return f"{scheme}://[redacted]"
        user, colon, _ = userinfo.partition(":")
        shown = f"{user}{':***' if colon else ''}@"
    address, question, query = address.partition("?")
    if question and "password" in query.lower():
        query = "[redacted]"
    return f"{scheme}://{shown}{address}{question}{query}"
