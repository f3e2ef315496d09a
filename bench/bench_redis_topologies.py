"""One Redis, Sentinel and Cluster, in one run: checks/s, Redis commands per steady-state check,
and what a bind costs with and without WAIT for a replica.

    python bench/bench_redis_topologies.py                  # defaults below
    python bench/bench_redis_topologies.py --checks 5000 --binds 300

Each topology is started for the run from Debian's redis-server (tests/support/redis_topologies.py:
one server without replicas; a master, a replica and 3 sentinels; 3 masters with a replica each),
on loopback. A check is the in-process Authorizer.check of bench/bench_check.py's request (a
cached token, one bound session, one thread). Commands are counted with `INFO commandstats`
deltas summed over every master, leaving out what the topology itself sends (replication
acks, sentinels' PING/INFO/PUBLISH, cluster gossip commands, this script's own CONFIG/INFO).
A bind is a check of a new session id (GETEX, EXISTS, two EVALs, and WAIT when a replica must
confirm): its latency is measured with `replica_ack=off` and with the topology's default.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.bench_check import AUDIENCE, ISSUER, SUBJECT, build_check_request  # noqa: E402
from bench.bench_store import _rate  # noqa: E402
from gateway.config import AuthConfig, IssuerConfig, SessionConfig  # noqa: E402
from gateway.example_keys import SigningKeyPair, claims_for, jwks  # noqa: E402
from gateway.identity.verifier import TokenVerifier  # noqa: E402
from gateway.pipeline import Authorizer, PolicyHolder  # noqa: E402
from gateway.policy.loader import default_policy_dir, load_policy_dir  # noqa: E402
from gateway.request import from_check_request  # noqa: E402
from gateway.session import open_store  # noqa: E402
from gateway.session.store import SessionStore, StoreSettings  # noqa: E402
from tests.support.processes import RedisServer  # noqa: E402
from tests.support.redis_topologies import REDIS_PASSWORD, ClusterTopology, SentinelTopology, _client  # noqa: E402

BACKGROUND = ("config", "info", "ping", "publish", "replconf", "cluster", "subscribe", "hello", "client",
              "command", "psync", "sync", "select", "auth", "role")  # fmt: skip


def _authorizer(store: SessionStore, jwks_path: Path) -> Authorizer:
    auth = AuthConfig(issuers=(IssuerConfig(ISSUER, (AUDIENCE,), jwks_file=jwks_path),))
    policies = PolicyHolder(load_policy_dir(default_policy_dir()))
    # A high cap: the bind series binds every session to one identity.
    sessions = SessionConfig(max_per_identity=1_000_000, store_timeout=store.settings.timeout)
    return Authorizer(auth, sessions, TokenVerifier(auth), store, policies)


def _commands(ports: list[int], password: str | None) -> int:
    total = 0
    for port in ports:
        with contextlib.closing(_client(port, password)) as client:  # type: ignore[arg-type]
            for name, value in client.info("commandstats").items():
                if name.removeprefix("cmdstat_").split("|")[0] not in BACKGROUND:
                    total += int(value["calls"])
    return total


def _reset(ports: list[int], password: str | None) -> None:
    for port in ports:
        with contextlib.closing(_client(port, password)) as client:  # type: ignore[arg-type]
            client.config_resetstat()


def _bind_latencies(
    url: str, settings: StoreSettings, jwks_path: Path, token: str, binds: int
) -> dict[str, float]:
    store = open_store(url, settings)
    authorizer = _authorizer(store, jwks_path)
    took = []
    try:
        for n in range(binds + 20):
            context = from_check_request(build_check_request(token, session_id=str(uuid.uuid4())))
            started = time.perf_counter()
            outcome = authorizer.check(context, time.time())
            if n >= 20:  # warm-up: connections, scripts, token cache
                took.append(time.perf_counter() - started)
            assert outcome.allowed and outcome.session_new, outcome.reason
    finally:
        store.close()
    took.sort()
    return {
        "median_ms": round(statistics.median(took) * 1000, 3),
        "p90_ms": round(took[int(len(took) * 0.9)] * 1000, 3),
    }


def measure(checks: int, binds: int) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="bench-topologies-"))
    key = SigningKeyPair.generate("RS256")
    jwks_path = work / "jwks.json"
    jwks_path.write_text(json.dumps(jwks(key)))
    token = key.sign(claims_for(issuer=ISSUER, audience=AUDIENCE, subject=SUBJECT, ttl=3600))
    # The cap is per identity; the bind series binds many sessions for one identity.
    settings = StoreSettings(ttl=86400, idle_timeout=3600, timeout=1.0)
    results: dict[str, Any] = {"checks": checks, "binds": binds}

    (work / "single").mkdir()
    (work / "sentinel").mkdir()
    (work / "cluster").mkdir()
    single = RedisServer(work / "single", password=REDIS_PASSWORD)
    sentinel = SentinelTopology(work / "sentinel")
    cluster = ClusterTopology(work / "cluster")
    try:
        topologies = {
            "single": (single.url, lambda: [single.port]),
            "sentinel": (sentinel.url, lambda: [sentinel.master_port()]),
            "cluster": (cluster.url, cluster.masters),
        }
        for name, (url, masters) in topologies.items():
            store = open_store(url, settings)
            authorizer = _authorizer(store, jwks_path)
            context = from_check_request(build_check_request(token, session_id=str(uuid.uuid4())))
            assert authorizer.check(context, time.time()).allowed  # binds
            _reset(masters(), REDIS_PASSWORD)
            rate = _rate(authorizer, context, checks)
            commands = _commands(masters(), REDIS_PASSWORD)
            store.close()
            off = url + ("&" if "?" in url else "?") + "replica_ack=off"
            results[name] = {
                "checks_per_s": round(rate),
                "commands_per_check": round(commands / (checks + 200), 3),
                "bind_default": _bind_latencies(url, settings, jwks_path, token, binds),
                "bind_replica_ack_off": _bind_latencies(off, settings, jwks_path, token, binds),
            }
    finally:
        cluster.stop()
        sentinel.stop()
        single.stop()
    base = results["single"]["checks_per_s"]
    for name in ("sentinel", "cluster"):
        results[name]["checks_per_s_vs_single"] = round(results[name]["checks_per_s"] / base, 3)
    for name in ("sentinel", "cluster"):
        with_wait = results[name]["bind_default"]["median_ms"]
        without = results[name]["bind_replica_ack_off"]["median_ms"]
        results[name]["wait_extra_median_ms"] = round(with_wait - without, 3)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checks", type=int, default=5000)
    parser.add_argument("--binds", type=int, default=300)
    args = parser.parse_args()
    print(json.dumps(measure(args.checks, args.binds), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
