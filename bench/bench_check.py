"""Checks per second: the gateway against the floor (a no-op Check servicer), in one run.

Both servers answer the same realistic CheckRequest (about 1.2 KB: a real RS256 token, an
MCP session header, the headers Envoy sends) posted by h2load as a gRPC body file. Each
server is pinned to one core (taskset -c 0) and h2load to another (taskset -c 1).

    python bench/bench_check.py                  # 3 alternating rounds of 5 s per server
    python bench/bench_check.py --rounds 1 --duration 3     # a quick look

The helpers (start a pinned server, build the request file, run h2load and parse its
output) are importable: bench/bench_telemetry.py reuses them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from concurrent import futures
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc
import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

try:
    from gateway.envoy_api.envoy.config.core.v3 import address_pb2
    from gateway.envoy_api.envoy.service.auth.v3 import attribute_context_pb2 as attrs
    from gateway.envoy_api.envoy.service.auth.v3 import external_auth_pb2
    from gateway.envoy_api.google.rpc import code_pb2, status_pb2
except ImportError:  # a revision before gateway/envoy_api (bench_inprocess.py --baseline): xds-protos
    from envoy.config.core.v3 import address_pb2
    from envoy.service.auth.v3 import attribute_context_pb2 as attrs
    from envoy.service.auth.v3 import external_auth_pb2
    from google.rpc import code_pb2, status_pb2
try:
    from gateway.example_keys import SigningKeyPair, claims_for, jwks
except ImportError:  # a revision before the rename (bench_inprocess.py --baseline)
    from gateway.testing_keys import SigningKeyPair, claims_for, jwks  # type: ignore[no-redef]
from gateway.policy.loader import default_policy_dir  # noqa: E402

CHECK_PATH = "/envoy.service.auth.v3.Authorization/Check"
ISSUER = "https://idp.bench.example"
AUDIENCE = "https://mcp.bench.example"
SUBJECT = "bench-user"
SESSION_ID = "7f3c2a9e5b1d4c6f8a0e2b4d6f8a1c3e"
GRPC_HEADERS = ("content-type: application/grpc", "te: trailers")


# ---------------------------------------------------------------- the request


def build_check_request(token: str, session_id: str = SESSION_ID) -> external_auth_pb2.CheckRequest:
    """A CheckRequest as Envoy sends it for an MCP tools/call: headers, body, addresses."""
    body = json.dumps(
        {
            "jsonrpc": "2.0",
            "id": 7,
            "method": "tools/call",
            "params": {"name": "search", "arguments": {"q": "report"}},
        },
        separators=(",", ":"),
    )
    request_id = str(uuid.UUID(int=0x5EED))
    headers = {
        ":authority": "mcp.bench.example",
        ":method": "POST",
        ":path": "/mcp",
        ":scheme": "https",
        "accept": "application/json, text/event-stream",
        "authorization": f"Bearer {token}",
        "content-length": str(len(body)),
        "content-type": "application/json",
        "mcp-protocol-version": "2025-06-18",
        "mcp-session-id": session_id,
        "user-agent": "mcp-client/1.0",
        "x-forwarded-proto": "https",
        "x-request-id": request_id,
    }
    http = attrs.AttributeContext.HttpRequest(
        id=request_id,
        method="POST",
        path="/mcp",
        host="mcp.bench.example",
        scheme="https",
        headers=headers,
        body=body,
        size=len(body),
        protocol="HTTP/1.1",
    )

    def peer(address: str, port: int) -> attrs.AttributeContext.Peer:
        return attrs.AttributeContext.Peer(
            address=address_pb2.Address(
                socket_address=address_pb2.SocketAddress(address=address, port_value=port)
            )
        )

    return external_auth_pb2.CheckRequest(
        attributes=attrs.AttributeContext(
            source=peer("10.0.3.17", 53422),
            destination=peer("10.0.1.5", 10000),
            request=attrs.AttributeContext.Request(http=http),
            context_extensions={"route": "mcp"},
        )
    )


def grpc_frame(message: bytes) -> bytes:
    """One gRPC length-prefixed message: flag byte 0 (uncompressed), 4-byte big-endian length."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


def write_request_file(path: Path, request: external_auth_pb2.CheckRequest) -> Path:
    """The HTTP/2 POST body h2load sends: the framed, serialized CheckRequest."""
    path.write_bytes(grpc_frame(request.SerializeToString()))
    return path


@dataclass(frozen=True)
class BenchIdentity:
    key: SigningKeyPair
    token: str
    jwks_path: Path


def make_identity(work_dir: Path) -> BenchIdentity:
    """A fresh RS256 key, its JWKS file, and a token valid for the whole run."""
    key = SigningKeyPair.generate("RS256", kid="bench-rs256")
    jwks_path = work_dir / "jwks.json"
    jwks_path.write_text(json.dumps(jwks(key)))
    token = key.sign(
        claims_for(issuer=ISSUER, audience=AUDIENCE, subject=SUBJECT, ttl=3600, scope="tools:call")
    )
    return BenchIdentity(key, token, jwks_path)


def gateway_config(work_dir: Path, identity: BenchIdentity, port: int, **extra: Any) -> Path:
    """The gateway's config: one issuer (the JWKS file), the default policy, the memory store."""
    config: dict[str, Any] = {
        "listen": f"127.0.0.1:{port}",
        "policies": str(default_policy_dir()),
        "store": "memory://",
        "auth": {
            "issuers": [
                {
                    "issuer": ISSUER,
                    "audiences": [AUDIENCE],
                    "jwks_file": str(identity.jwks_path),
                    "algorithms": ["RS256"],
                }
            ]
        },
        **extra,
    }
    path = work_dir / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


# ---------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_pinned(
    argv: Sequence[str], cpu: int, *, log_path: Path, env: dict[str, str] | None = None, cwd: Path = REPO
) -> subprocess.Popen[bytes]:
    """Start a process pinned to one core (taskset -c CPU), its output in log_path."""
    log = open(log_path, "wb")  # noqa: SIM115 - the child holds it; closed with the process
    return subprocess.Popen(
        ["taskset", "-c", str(cpu), *argv],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env if env is not None else dict(os.environ),
        cwd=cwd,
    )


def clean_env(**overrides: str) -> dict[str, str]:
    """This environment without OTEL_* settings (so a stray exporter cannot skew the figures)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(overrides)
    return env


def start_gateway(
    config_path: Path, cpu: int, log_path: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "gateway", "serve", "--config", str(config_path)]
    return start_pinned(argv, cpu, log_path=log_path, env=env if env is not None else clean_env())


def start_noop(port: int, cpu: int, log_path: Path) -> subprocess.Popen[bytes]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--serve-noop", str(port)]
    return start_pinned(argv, cpu, log_path=log_path, env=clean_env())


def serve_noop(port: int, workers: int = 16) -> None:
    """The floor: a sync grpc.server with a thread pool, answering every Check with an allow."""
    allow = external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=code_pb2.OK), ok_response=external_auth_pb2.OkHttpResponse()
    )

    def check(_request: external_auth_pb2.CheckRequest, _context: grpc.ServicerContext) -> Any:
        return allow

    handler = grpc.unary_unary_rpc_method_handler(
        check,
        request_deserializer=external_auth_pb2.CheckRequest.FromString,
        response_serializer=external_auth_pb2.CheckResponse.SerializeToString,
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("envoy.service.auth.v3.Authorization", {"Check": handler}),)
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


def raw_check(address: str, body_file: Path, timeout: float = 5.0) -> external_auth_pb2.CheckResponse:
    """Send exactly the bytes h2load will send (minus the gRPC frame prefix) and parse the answer."""
    message = body_file.read_bytes()[5:]
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(
            CHECK_PATH,
            request_serializer=None,
            response_deserializer=external_auth_pb2.CheckResponse.FromString,
        )
        response: external_auth_pb2.CheckResponse = call(message, timeout=timeout)
        return response


def wait_answering(
    address: str, body_file: Path, process: subprocess.Popen[bytes], timeout: float = 30.0
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server at {address} exited with {process.returncode}")
        try:
            raw_check(address, body_file, timeout=1.0)
            return
        except grpc.RpcError:
            time.sleep(0.1)
    raise TimeoutError(f"no Check answer from {address} after {timeout}s")


def require_allow(
    response: external_auth_pb2.CheckResponse, label: str, *, subject: str | None = None
) -> None:
    """The benchmark measures allows: a deny (cheaper, cached) would flatter the gateway."""
    if not response.HasField("ok_response"):
        raise RuntimeError(
            f"{label}: the Check was denied ({response.denied_response.status.code} "
            f"{response.denied_response.body}); the benchmark needs allows"
        )
    if subject is not None:
        headers = {h.header.key: h.header.value for h in response.ok_response.headers}
        if headers.get("x-authz-subject") != subject:
            raise RuntimeError(f"{label}: the allow does not carry the verified subject: {headers}")


def stop(process: subprocess.Popen[bytes], timeout: float = 15.0) -> int:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
    return int(process.returncode)


# ---------------------------------------------------------------- load


@dataclass(frozen=True)
class LoadResult:
    label: str
    checks_per_s: float
    p50_ms: float
    p99_ms: float
    requests: int
    succeeded: int
    failed: int
    errored: int
    status_2xx: int
    seconds: float
    clients: int
    streams: int


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(fraction * (len(sorted_values) - 1))))
    return sorted_values[index]


def parse_h2load(
    output: str, log_path: Path | None, label: str = "", clients: int = 0, streams: int = 0
) -> LoadResult:
    """h2load's summary (req/s, request counts, status codes) plus p50/p99 from its --log-file."""
    rate = seconds = 0.0
    counts = {"total": 0, "succeeded": 0, "failed": 0, "errored": 0}
    status_2xx = 0
    for line in output.splitlines():
        line = line.strip()
        if line.startswith("finished in"):
            # finished in 5.00s, 4486.40 req/s, 1.02MB/s
            parts = line.replace(",", "").split()
            seconds = float(parts[2].rstrip("s"))
            rate = float(parts[3])
        elif line.startswith("requests:"):
            # requests: 22432 total, 22432 started, 22432 done, 22432 succeeded, 0 failed, 0 errored, …
            fields = line.removeprefix("requests:").split(",")
            for field in fields:
                number, name = field.split()
                if name in counts:
                    counts[name] = int(number)
        elif line.startswith("status codes:"):
            status_2xx = int(line.removeprefix("status codes:").split(",")[0].split()[0])
    if not rate:
        raise RuntimeError(f"cannot parse h2load output:\n{output}")
    latencies_ms: list[float] = []
    if log_path is not None and log_path.exists():
        for row in log_path.read_text().splitlines():
            columns = row.split("\t")
            if len(columns) >= 3 and columns[1] == "200":
                latencies_ms.append(int(columns[2]) / 1000.0)
    latencies_ms.sort()
    return LoadResult(
        label=label,
        checks_per_s=rate,
        p50_ms=percentile(latencies_ms, 0.50),
        p99_ms=percentile(latencies_ms, 0.99),
        requests=counts["total"],
        succeeded=counts["succeeded"],
        failed=counts["failed"],
        errored=counts["errored"],
        status_2xx=status_2xx,
        seconds=seconds,
        clients=clients,
        streams=streams,
    )


def run_h2load(
    port: int,
    body_file: Path,
    *,
    duration: float,
    clients: int = 2,
    streams: int = 8,
    cpu: int = 1,
    log_path: Path | None = None,
    label: str = "",
    host: str = "127.0.0.1",
) -> LoadResult:
    """h2load, pinned to `cpu`, posting the gRPC body for `duration` seconds (h2c, prior knowledge)."""
    binary = shutil.which("h2load")
    if binary is None:
        raise RuntimeError("h2load is not installed (apt-get install nghttp2-client)")
    argv = [
        "taskset",
        "-c",
        str(cpu),
        binary,
        f"http://{host}:{port}{CHECK_PATH}",
        "-d",
        str(body_file),
        "-c",
        str(clients),
        "-m",
        str(streams),
        "-t",
        "1",
        "-D",
        f"{duration:g}",
    ]
    for header in GRPC_HEADERS:
        argv += ["-H", header]
    if log_path is not None:
        argv += ["--log-file", str(log_path)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    if done.returncode != 0:
        raise RuntimeError(f"h2load failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return parse_h2load(done.stdout, log_path, label, clients, streams)


def measure(
    label: str,
    port: int,
    body_file: Path,
    work_dir: Path,
    *,
    duration: float,
    warmup: float,
    clients: int,
    streams: int,
    cpu: int,
) -> LoadResult:
    """A warm-up run (discarded), then the measured run."""
    if warmup > 0:
        run_h2load(port, body_file, duration=warmup, clients=clients, streams=streams, cpu=cpu)
    result = run_h2load(
        port,
        body_file,
        duration=duration,
        clients=clients,
        streams=streams,
        cpu=cpu,
        log_path=work_dir / f"h2load-{label}.log",
        label=label,
    )
    if result.failed or result.errored or result.status_2xx != result.requests or not result.requests:
        raise RuntimeError(f"{label}: not every request succeeded: {result}")
    return result


# ---------------------------------------------------------------- the run


def format_table(results: Sequence[LoadResult]) -> str:
    lines = [f"{'server':<10} {'checks/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'requests':>9}"]
    for r in results:
        lines.append(
            f"{r.label:<10} {r.checks_per_s:>10.0f} {r.p50_ms:>8.2f} {r.p99_ms:>8.2f} {r.requests:>9}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--duration", type=float, default=5.0, help="measured seconds per server and round (default 5)"
    )
    parser.add_argument("--warmup", type=float, default=2.0, help="discarded seconds before each (default 2)")
    parser.add_argument("--clients", type=int, default=2, help="h2load connections (default 2)")
    parser.add_argument(
        "--streams", type=int, default=8, help="concurrent streams per connection (default 8)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="alternating floor/gateway rounds (default 3)")
    parser.add_argument("--server-cpu", type=int, default=0)
    parser.add_argument("--load-cpu", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, request file)")
    parser.add_argument("--serve-noop", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_noop:
        serve_noop(args.serve_noop)
        return 0

    work_dir = Path(tempfile.mkdtemp(prefix="bench-check-"))
    identity = make_identity(work_dir)
    request = build_check_request(identity.token)
    body_file = write_request_file(work_dir / "check-request.bin", request)
    print(
        f"CheckRequest: {request.ByteSize()} bytes serialized (token {len(identity.token)} bytes); "
        f"h2load -c {args.clients} -m {args.streams}, {args.duration:g}s measured after "
        f"{args.warmup:g}s warm-up; servers on cpu {args.server_cpu}, h2load on cpu {args.load_cpu}"
    )
    load = {
        "duration": args.duration,
        "warmup": args.warmup,
        "clients": args.clients,
        "streams": args.streams,
        "cpu": args.load_cpu,
    }
    noop_port, gateway_port = free_port(), free_port()
    noop = start_noop(noop_port, args.server_cpu, work_dir / "noop.log")
    gateway = start_gateway(
        gateway_config(work_dir, identity, gateway_port), args.server_cpu, work_dir / "gateway.log"
    )
    rounds: list[tuple[LoadResult, LoadResult]] = []
    try:
        wait_answering(f"127.0.0.1:{noop_port}", body_file, noop)
        require_allow(raw_check(f"127.0.0.1:{noop_port}", body_file), "floor")
        address = f"127.0.0.1:{gateway_port}"
        wait_answering(address, body_file, gateway)
        # The first check verifies the token (then cached) and binds the session; from here on
        # every check is an allow for the same identity on the same session.
        require_allow(raw_check(address, body_file), "gateway", subject=SUBJECT)
        # Both servers stay up, idle while the other is measured; rounds alternate so that a
        # noisy neighbour on a shared machine hits both alike, and the median ratio is reported.
        for number in range(1, args.rounds + 1):
            floor = measure("floor", noop_port, body_file, work_dir, **load)
            gw = measure("gateway", gateway_port, body_file, work_dir, **load)
            rounds.append((floor, gw))
            print(
                f"round {number}: floor {floor.checks_per_s:.0f}/s, gateway {gw.checks_per_s:.0f}/s, "
                f"ratio {gw.checks_per_s / floor.checks_per_s:.2f}"
            )
        require_allow(raw_check(address, body_file), "gateway (after the run)", subject=SUBJECT)
    finally:
        stop(noop)
        code = stop(gateway)
        if code != 0:
            print(f"warning: the gateway exited with {code}; see {work_dir / 'gateway.log'}", file=sys.stderr)

    ratios = sorted(gw.checks_per_s / floor.checks_per_s for floor, gw in rounds)
    ratio = ratios[len(ratios) // 2]
    median_round = next(r for r in rounds if r[1].checks_per_s / r[0].checks_per_s == ratio)
    results = list(median_round)
    print("median round:")
    print(format_table(results))
    print(f"ratio gateway/floor: {ratio:.2f} (median of {len(ratios)} rounds; target >= 0.80)")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "rounds": [[asdict(f), asdict(g)] for f, g in rounds],
                    "ratios": ratios,
                    "ratio": ratio,
                    "request_bytes": request.ByteSize(),
                },
                indent=2,
            )
        )
    if args.keep:
        print(f"work directory: {work_dir}")
    else:
        shutil.rmtree(work_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
