"""What telemetry costs: the gateway with telemetry off vs on, in one run.

"On" means every Check span sampled (OTEL_TRACES_SAMPLER=always_on) and exported over
OTLP/gRPC, with the metrics, to a local OTLP receiver; "off" means no OTEL_* settings at
all (nothing is set up). The rounds alternate (off, on, off, on, ...) so a shared
machine's drift hits both alike. The request, the pinning (gateway on cpu 0, h2load and
the receiver on cpu 1) and the h2load harness are those of bench/bench_check.py.

    python bench/bench_telemetry.py                  # 2 rounds of 10 s each
    python bench/bench_telemetry.py --duration 3 --rounds 1

The receiver counts the spans it gets: a figure for "on" only counts if every answered
check's span arrived (a dropped span would flatter the throughput).

On a shared machine the h2load figures move by 20% or more from one round to the next,
so the script also measures what telemetry adds to the CPU time of one Check, called
directly in a process of its own (no gRPC, no load generator; export included, as the
process flushes its spans before the clock stops). That figure moves far less.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent import futures
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc

from gateway.otlp_api.opentelemetry.proto.collector.metrics.v1 import (
    metrics_service_pb2,
    metrics_service_pb2_grpc,
)
from gateway.otlp_api.opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_check import (  # noqa: E402
    SUBJECT,
    LoadResult,
    build_check_request,
    clean_env,
    free_port,
    gateway_config,
    make_identity,
    measure,
    raw_check,
    require_allow,
    run_h2load,
    start_gateway,
    stop,
    wait_answering,
    write_request_file,
)

SPAN_NAME = "envoy.service.auth.v3.Authorization/Check"


class CountingReceiver:
    """An OTLP/gRPC receiver that counts Check spans and keeps nothing else."""

    def __init__(self) -> None:
        self.check_spans = 0
        self.metric_exports = 0
        self._lock = threading.Lock()
        receiver = self

        class Traces(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request: Any, context: Any) -> Any:
                count = sum(
                    1
                    for resource_spans in request.resource_spans
                    for scope_spans in resource_spans.scope_spans
                    for span in scope_spans.spans
                    if span.name == SPAN_NAME
                )
                with receiver._lock:
                    receiver.check_spans += count
                return trace_service_pb2.ExportTraceServiceResponse()

        class Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
            def Export(self, request: Any, context: Any) -> Any:
                with receiver._lock:
                    receiver.metric_exports += 1
                return metrics_service_pb2.ExportMetricsServiceResponse()

        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Traces(), self._server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Metrics(), self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()

    def stop(self) -> None:
        self._server.stop(0)


def telemetry_env(receiver_port: int) -> dict[str, str]:
    return clean_env(
        OTEL_SDK_DISABLED="false",
        OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{receiver_port}",
        OTEL_EXPORTER_OTLP_PROTOCOL="grpc",
        OTEL_TRACES_SAMPLER="always_on",
    )


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads (so the span export thread too)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _DirectRpc:
    """The one thing Check asks of its gRPC context: the call metadata, as Envoy sends it."""

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),)


def direct_checks(work_dir: Path, count: int) -> None:
    """(Child process) CPU microseconds per direct Check call, printed; telemetry as OTEL_* say."""
    from gateway.app import build_gateway
    from gateway.config import load_config

    identity = make_identity(work_dir)
    gateway = build_gateway(load_config(gateway_config(work_dir, identity, free_port())))
    request = build_check_request(identity.token)
    rpc = _DirectRpc()
    for _ in range(2000):  # warm: token cached, session bound
        gateway.service.Check(request, rpc)  # type: ignore[arg-type]
    started = time.process_time()
    for _ in range(count):
        gateway.service.Check(request, rpc)  # type: ignore[arg-type]
    gateway.telemetry.shutdown()  # the export of the last spans is part of the cost
    print(f"{(time.process_time() - started) / count * 1e6:.2f}")


def direct_cpu_us(mode: str, receiver: CountingReceiver, count: int, cpu: int) -> float:
    env = telemetry_env(receiver.port) if mode == "on" else clean_env()
    with tempfile.TemporaryDirectory(prefix="bench-direct-") as work:
        done = subprocess.run(
            ["taskset", "-c", str(cpu), sys.executable, __file__, "--direct-checks", str(count), work],
            env=env, capture_output=True, text=True, timeout=300,
        )
    if done.returncode != 0:
        raise RuntimeError(f"direct {mode}: {done.stderr[-2000:]}")
    return float(done.stdout.split()[-1])


@dataclass(frozen=True)
class Round:
    mode: str
    result: LoadResult
    answered: int  # every check the gateway process answered (warm-up, measured, probes)
    spans_received: int
    cpu_us_per_check: float  # the gateway's CPU time during the measured run, per check


def run_round(
    mode: str, index: int, work_dir: Path, identity: Any, body_file: Path, receiver: CountingReceiver,
    load: dict[str, Any], server_cpu: int,
) -> Round:
    port = free_port()
    label = f"{mode}-{index}"
    round_dir = work_dir / label
    round_dir.mkdir()
    env = telemetry_env(receiver.port) if mode == "on" else clean_env()
    spans_before = receiver.check_spans
    config = gateway_config(round_dir, identity, port)
    gateway = start_gateway(config, server_cpu, round_dir / "gateway.log", env)
    probes = 0
    try:
        address = f"127.0.0.1:{port}"
        wait_answering(address, body_file, gateway)
        probes += 1
        require_allow(raw_check(address, body_file), label, subject=SUBJECT)
        probes += 1
        warmed = 0
        if load["warmup"] > 0:
            warm = run_h2load(
                port, body_file, duration=load["warmup"], clients=load["clients"],
                streams=load["streams"], cpu=load["cpu"],
            )
            warmed = warm.succeeded
        cpu_before = cpu_seconds(gateway.pid)
        result = measure(label, port, body_file, round_dir, **{**load, "warmup": 0})
        cpu_per_check = (cpu_seconds(gateway.pid) - cpu_before) / max(1, result.succeeded) * 1e6
    finally:
        code = stop(gateway)  # SIGTERM: the gateway flushes its spans before it exits
    if code != 0:
        raise RuntimeError(f"{label}: the gateway exited with {code}; see {round_dir / 'gateway.log'}")
    answered = probes + warmed + result.succeeded
    spans = receiver.check_spans - spans_before
    if mode == "on" and spans < answered:
        print(f"warning: {label}: {answered} checks answered but {spans} spans received", file=sys.stderr)
    return Round(mode, result, answered, spans, cpu_per_check)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per round")
    parser.add_argument("--warmup", type=float, default=2.0, help="discarded seconds before each (default 2)")
    parser.add_argument("--rounds", type=int, default=2, help="off/on pairs (default 2)")
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--server-cpu", type=int, default=0)
    parser.add_argument("--load-cpu", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--direct", type=int, default=20000, help="direct Check calls per mode (0: skip)")
    parser.add_argument("--direct-checks", nargs=2, metavar=("COUNT", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.direct_checks:
        direct_checks(Path(args.direct_checks[1]), int(args.direct_checks[0]))
        return 0

    # The receiver runs in this process, on the load core, away from the gateway's.
    os.sched_setaffinity(0, {args.load_cpu})
    work_dir = Path(tempfile.mkdtemp(prefix="bench-telemetry-"))
    identity = make_identity(work_dir)
    request = build_check_request(identity.token)
    body_file = write_request_file(work_dir / "check-request.bin", request)
    load = {
        "duration": args.duration, "warmup": args.warmup, "clients": args.clients,
        "streams": args.streams, "cpu": args.load_cpu,
    }
    print(
        f"CheckRequest {request.ByteSize()} bytes; h2load -c {args.clients} -m {args.streams}; "
        f"{args.rounds} x (off, on), {args.duration:g}s measured after {args.warmup:g}s warm-up each"
    )
    receiver = CountingReceiver()
    rounds: list[Round] = []
    direct: dict[str, list[float]] = {"off": [], "on": []}
    try:
        for index in range(args.rounds):
            for mode in ("off", "on"):
                done = run_round(mode, index, work_dir, identity, body_file, receiver, load, args.server_cpu)
                rounds.append(done)
                r = done.result
                extra = f", {done.spans_received}/{done.answered} spans received" if mode == "on" else ""
                print(f"  {mode:<3} round {index}: {r.checks_per_s:7.0f} checks/s, p50 {r.p50_ms:.2f} ms, "
                      f"p99 {r.p99_ms:.2f} ms, {done.cpu_us_per_check:.0f} us CPU/check{extra}")
        for index in range(args.rounds if args.direct else 0):
            for mode in ("off", "on"):
                direct[mode].append(direct_cpu_us(mode, receiver, args.direct, args.server_cpu))
                print(f"  direct {mode:<3} round {index}: {direct[mode][-1]:.1f} us CPU per Check call")
    finally:
        receiver.stop()

    off = statistics.mean(r.result.checks_per_s for r in rounds if r.mode == "off")
    on = statistics.mean(r.result.checks_per_s for r in rounds if r.mode == "on")
    overhead = 1 - on / off
    cpu_off = statistics.mean(r.cpu_us_per_check for r in rounds if r.mode == "off")
    cpu_on = statistics.mean(r.cpu_us_per_check for r in rounds if r.mode == "on")
    print(f"gateway CPU per check: off {cpu_off:.0f} us, on {cpu_on:.0f} us "
          f"(+{cpu_on / cpu_off - 1:.1%}; the throughput cost this implies: {1 - cpu_off / cpu_on:.1%})")
    print(f"telemetry off: {off:.0f} checks/s, on: {on:.0f} checks/s, cost {overhead:.1%} (target <= 15%)")
    added = None
    if direct["off"]:
        added = statistics.mean(direct["on"]) - statistics.mean(direct["off"])
        direct_off, direct_on = statistics.mean(direct["off"]), statistics.mean(direct["on"])
        print(
            f"direct Check call: off {direct_off:.1f} us, on {direct_on:.1f} us CPU: telemetry adds "
            f"{added:.1f} us per check, {added / cpu_off:.1%} of the gateway's CPU per check under load "
            f"with telemetry off ({cpu_off:.0f} us)"
        )
    if args.json:
        args.json.write_text(json.dumps(
            {
                "rounds": [asdict(r) for r in rounds], "off": off, "on": on, "overhead": overhead,
                "cpu_us_per_check": {"off": cpu_off, "on": cpu_on},
                "direct_cpu_us": direct, "direct_added_us": added,
            },
            indent=2,
        ))
    shutil.rmtree(work_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
