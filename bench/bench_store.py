"""Session stores: memory bytes per session at 1,000,000 sessions, and check throughput
with Redis against memory (in-process Authorizer.check, the same realistic request).

    python bench/bench_store.py                          # both parts, defaults below
    python bench/bench_store.py --part size --sessions 1000000 --identities 100000
    python bench/bench_store.py --part throughput --checks 20000

Size: uuid4 session ids, each bound to iss + sub of one of `--identities` identities
(sessions spread evenly), measured twice: with tracemalloc (bytes Python allocated for the
store) and as the process's RSS growth (what the machine pays). Throughput: a bound session,
a cached token, the CheckRequest of bench/bench_check.py (an MCP tools/call, ~1.2 KB),
one thread; Redis is a local redis-server started for the run (loopback, no persistence).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
import tracemalloc
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.bench_check import AUDIENCE, ISSUER, SUBJECT, build_check_request  # noqa: E402
from gateway.config import AuthConfig, IssuerConfig, SessionConfig  # noqa: E402
from gateway.example_keys import SigningKeyPair, claims_for, jwks  # noqa: E402
from gateway.identity.verifier import TokenVerifier  # noqa: E402
from gateway.pipeline import Authorizer, PolicyHolder  # noqa: E402
from gateway.policy.loader import default_policy_dir, load_policy_dir  # noqa: E402
from gateway.request import from_check_request  # noqa: E402
from gateway.session import open_store  # noqa: E402
from gateway.session.memory import MemoryStore  # noqa: E402
from gateway.session.record import new_record, owner_key  # noqa: E402
from gateway.session.store import SessionStore, StoreSettings  # noqa: E402

REALISTIC_ISSUER = "https://login.example.com/realms/mcp"


def _rss() -> int:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def _fill(store: MemoryStore, sessions: int, identities: int) -> None:
    now = time.time()
    people = [(REALISTIC_ISSUER, f"user-{uuid.uuid4()}") for _ in range(identities)]
    owners = [owner_key(iss, sub) for iss, sub in people]
    for n in range(sessions):
        i = n % identities
        iss, sub = people[i]
        record = new_record(anonymous=False, bound={"iss": iss, "sub": sub}, owner=owners[i], now=now)
        if not store.create(str(uuid.uuid4()), record, now, 1_000_000).created:
            raise RuntimeError("a bind did not store")


def measure_size(sessions: int, identities: int) -> dict[str, Any]:
    settings = StoreSettings(ttl=86400, idle_timeout=3600, max_sessions=sessions + 1)
    gc.collect()
    rss_before = _rss()
    store = MemoryStore(settings)
    started = time.perf_counter()
    _fill(store, sessions, identities)
    fill_seconds = time.perf_counter() - started
    gc.collect()
    rss_bytes = _rss() - rss_before
    assert store.live_count() == sessions
    del store
    gc.collect()

    tracemalloc.start()
    baseline = tracemalloc.get_traced_memory()[0]
    store = MemoryStore(settings)
    _fill(store, sessions, identities)
    gc.collect()
    traced = tracemalloc.get_traced_memory()[0] - baseline
    tracemalloc.stop()
    return {
        "sessions": sessions,
        "identities": identities,
        "traced_bytes_per_session": round(traced / sessions, 1),
        "rss_bytes_per_session": round(rss_bytes / sessions, 1),
        "fill_seconds": round(fill_seconds, 2),
    }


def _authorizer(store: SessionStore, jwks_path: Path) -> Authorizer:
    auth = AuthConfig(issuers=(IssuerConfig(ISSUER, (AUDIENCE,), jwks_file=jwks_path),))
    policies = PolicyHolder(load_policy_dir(default_policy_dir()))
    return Authorizer(auth, SessionConfig(), TokenVerifier(auth), store, policies)


def _rate(authorizer: Authorizer, context: Any, checks: int) -> float:
    for _ in range(200):  # warm: token cache, CEL, connections
        assert authorizer.check(context, time.time()).allowed
    started = time.perf_counter()
    for _ in range(checks):
        outcome = authorizer.check(context, time.time())
    elapsed = time.perf_counter() - started
    assert outcome.allowed, outcome.reason
    return checks / elapsed


def measure_throughput(checks: int) -> dict[str, Any]:
    from redis import Redis

    from tests.support.processes import RedisServer

    work = Path(tempfile.mkdtemp(prefix="bench-store-"))
    key = SigningKeyPair.generate("RS256")
    jwks_path = work / "jwks.json"
    jwks_path.write_text(json.dumps(jwks(key)))
    token = key.sign(claims_for(issuer=ISSUER, audience=AUDIENCE, subject=SUBJECT, ttl=3600))
    context = from_check_request(build_check_request(token, session_id=str(uuid.uuid4())))
    settings = StoreSettings(ttl=86400, idle_timeout=3600)
    results: dict[str, Any] = {"checks": checks}

    memory = _authorizer(open_store("memory://", settings), jwks_path)
    results["memory_checks_per_s"] = round(_rate(memory, context, checks))

    server = RedisServer(work)
    try:
        store = open_store(server.url, settings)
        redis_authorizer = _authorizer(store, jwks_path)
        admin = Redis.from_url(server.url)
        assert redis_authorizer.check(context, time.time()).allowed  # binds
        admin.config_resetstat()
        results["redis_checks_per_s"] = round(_rate(redis_authorizer, context, checks))
        stats = admin.info("commandstats")
        commands = sum(v["calls"] for k, v in stats.items() if not k.startswith("cmdstat_config"))
        results["redis_commands_per_check"] = round(commands / (checks + 200), 3)
        admin.close()
        store.close()
    finally:
        server.stop()
    ratio = results["redis_checks_per_s"] / results["memory_checks_per_s"]
    results["redis_to_memory_ratio"] = round(ratio, 3)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--part", choices=("size", "throughput", "both"), default="both")
    parser.add_argument("--sessions", type=int, default=1_000_000)
    parser.add_argument("--identities", type=int, default=100_000)
    parser.add_argument("--checks", type=int, default=20_000)
    args = parser.parse_args()
    if args.part in ("size", "both"):
        print(json.dumps({"memory_store_size": measure_size(args.sessions, args.identities)}), flush=True)
    if args.part in ("throughput", "both"):
        print(json.dumps({"check_throughput": measure_throughput(args.checks)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
