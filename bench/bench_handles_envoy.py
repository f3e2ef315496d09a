"""Through real Envoy: a tool call whose handle the gateway checks, against the same tool call
under a policy set with no handle kind, in one run, rounds alternating.

    python bench/bench_handles_envoy.py              # 5 alternating rounds of 4 s per way (1 s warm-up)
    python bench/bench_handles_envoy.py --quick      # a smoke run (1 round of 1 s)

Two stacks side by side, each its own gateway (memory store, no telemetry) behind its own
Envoy built from examples/envoy/envoy.yaml as it is (ext_authz, then ext_proc; no tracing):
- **checked**: the gateway with examples/policies/handles;
- **unchecked**: the same policy file with its `handles:` section taken out.
One upstream (a third Envoy, `direct_response`) answers every call as the drafts server
answers create_draft, with the draft id `d-bench-1`. Before the load, one create_draft through
the checked stack binds that id to the bench identity (ext_proc reads the answer and binds it,
as in production). h2load (h2c, 32 connections) then posts the same MCP 2026-07-28
`tools/call` to both: `publish_draft` presenting `d-bench-1`. The checked gateway looks the
handle up and compares it with the caller; the unchecked one has nothing to compare. A third
row, **minting**, posts `create_draft` to the checked stack: the response path that reads a
body (ext_proc asks for the request's and the response's).

Each round measures the ways in turn (the order reversed every other round): the CPU time of
the gateway and Envoy processes (utime + stime from /proc, bench_envoy.cpu_seconds) divided by
the requests completed, and from Envoy's admin stats the ext_proc streams and messages per
request, which say whether ext_proc is in the path and whether it read a body. The figure that
counts is checked / unchecked gateway CPU per request, round by round, and its median.
"""

from __future__ import annotations

import argparse
import contextlib
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
from dataclasses import asdict, dataclass
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
    BenchIdentity,
    clean_env,
    free_port,
    gateway_config,
    make_identity,
    start_gateway,
    start_pinned,
    stop,
)
from bench_envoy import cpu_seconds, envoy_binary, h2load  # noqa: E402
from bench_extproc import front_config, upstream_config, wait_grpc, wait_http  # noqa: E402

POLICIES = REPO / "examples" / "policies" / "handles"
DRAFT_ID = "d-bench-1"
MODERN = "2026-07-28"
WAYS = ("checked", "unchecked", "minting")


def call_body(name: str, arguments: dict[str, Any]) -> str:
    message = {
        "jsonrpc": "2.0",
        "id": 7,
        "method": "tools/call",
        "params": {"name": name, "arguments": arguments},
    }
    return json.dumps(message, separators=(",", ":"))


PUBLISH = call_body("publish_draft", {"draft_id": DRAFT_ID})
CREATE = call_body("create_draft", {"title": "bench"})
# What the drafts server answers create_draft (tests/support/drafts_server.py), a fixed id.
CREATED = json.dumps(
    {"jsonrpc": "2.0", "id": 7, "result": {"content": [], "structuredContent": {"draft_id": DRAFT_ID}}},
    separators=(",", ":"),
)


def drafts_upstream_config(port: int) -> str:
    """bench_extproc's direct_response upstream, answering as the drafts server's create_draft."""
    config = yaml.safe_load(upstream_config(port))
    (route,) = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"][
        "route_config"
    ]["virtual_hosts"][0]["routes"]
    route["direct_response"]["body"]["inline_string"] = CREATED
    route["response_headers_to_add"] = [{"header": {"key": "content-type", "value": "application/json"}}]
    return str(yaml.safe_dump(config, sort_keys=False))


def unchecked_policies(target: Path) -> Path:
    """The example policy without its handle kinds: the same rules, the same body reading."""
    target.mkdir()
    for source in sorted(POLICIES.glob("*.yaml")):
        if source.name.endswith("_test.yaml"):
            continue
        document = yaml.safe_load(source.read_text())
        document.pop("handles", None)
        (target / source.name).write_text(yaml.safe_dump(document, sort_keys=False))
    return target


def request_headers(token: str) -> dict[str, str]:
    return {
        "authorization": f"Bearer {token}",
        "content-type": "application/json",
        "accept": "application/json, text/event-stream",
        "mcp-protocol-version": MODERN,
    }


def post(port: int, body: str, headers: dict[str, str]) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("POST", "/mcp", body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def ext_proc_stats(admin_port: int) -> dict[str, int]:
    """Envoy's ext_proc counters (streams_started, stream_msgs_sent, ...), by their last name."""
    connection = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=5)
    try:
        connection.request("GET", "/stats?filter=ext_proc")
        text = connection.getresponse().read().decode()
    finally:
        connection.close()
    found: dict[str, int] = {}
    for name, value in re.findall(r"^\S*ext_proc\.(\w+): (\d+)$", text, re.MULTILINE):
        found[name] = found.get(name, 0) + int(value)
    return found


@dataclass
class Stack:
    label: str
    gateway: subprocess.Popen[bytes]
    gateway_port: int
    envoy: subprocess.Popen[bytes]
    listener: int
    admin: int


@dataclass(frozen=True)
class Sample:
    way: str
    round: int
    requests_per_s: float
    requests: int
    gateway_us: float  # gateway CPU per request
    envoy_us: float
    ext_proc: dict[str, float]  # Envoy's ext_proc counters per request


def measure(
    way: str, stack: Stack, body: Path, headers: dict[str, str], number: int, args: argparse.Namespace
) -> Sample:
    load = {"connections": args.connections, "cpu": args.load_cpu}
    if args.warmup > 0:
        # Discarded anyway: on a loaded machine a short warm-up may complete no request at all,
        # which h2load's summary cannot be read for. The measured run checks every answer.
        with contextlib.suppress(RuntimeError):
            h2load(stack.listener, body, headers, duration=args.warmup, **load)
    stats_before = ext_proc_stats(stack.admin)
    before = (cpu_seconds(stack.gateway.pid), cpu_seconds(stack.envoy.pid))
    result = h2load(stack.listener, body, headers, duration=args.duration, **load)
    after = (cpu_seconds(stack.gateway.pid), cpu_seconds(stack.envoy.pid))
    stats_after = ext_proc_stats(stack.admin)
    done = max(result.succeeded, 1)
    return Sample(
        way=way,
        round=number,
        requests_per_s=result.checks_per_s,
        requests=result.succeeded,
        gateway_us=(after[0] - before[0]) * 1e6 / done,
        envoy_us=(after[1] - before[1]) * 1e6 / done,
        ext_proc={k: (stats_after.get(k, 0) - v) / done for k, v in stats_before.items()},
    )


def format_table(samples: dict[str, list[Sample]]) -> str:
    lines = [
        f"{'way':<10} {'req/s':>7} {'gateway µs':>11} {'envoy µs':>9} {'ext_proc streams':>17} "
        f"{'msgs sent':>10} {'msgs received':>14}   (per request, median of rounds)"
    ]
    for way, rows in samples.items():

        def median(values: list[float]) -> float:
            return statistics.median(values)

        streams = median([r.ext_proc.get("streams_started", 0.0) for r in rows])
        sent = median([r.ext_proc.get("stream_msgs_sent", 0.0) for r in rows])
        received = median([r.ext_proc.get("stream_msgs_received", 0.0) for r in rows])
        lines.append(
            f"{way:<10} {median([r.requests_per_s for r in rows]):>7.0f} "
            f"{median([r.gateway_us for r in rows]):>11.0f} {median([r.envoy_us for r in rows]):>9.0f} "
            f"{streams:>17.2f} {sent:>10.2f} {received:>14.2f}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (default 5)")
    parser.add_argument(
        "--duration", type=float, default=4.0, help="seconds at maximum rate per way and round"
    )
    parser.add_argument("--warmup", type=float, default=1.0, help="discarded seconds before each (default 1)")
    parser.add_argument("--connections", type=int, default=32, help="h2load connections (default 32)")
    parser.add_argument("--quick", action="store_true", help="1 round of 1 s (a smoke run)")
    parser.add_argument("--server-cpu", type=int, default=0)
    parser.add_argument("--load-cpu", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write every sample here")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.duration, args.warmup = 1, 1.0, 0.2

    os.sched_setaffinity(0, {args.load_cpu})  # this script's own work stays off the servers' core
    work = Path(tempfile.mkdtemp(prefix="bench-handles-envoy-"))
    identity: BenchIdentity = make_identity(work)
    headers = request_headers(identity.token)
    bodies = {"publish": work / "publish.json", "create": work / "create.json"}
    bodies["publish"].write_text(PUBLISH)
    bodies["create"].write_text(CREATE)
    env = clean_env(PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    base_id = 30000 + os.getpid() % 10000
    started: list[subprocess.Popen[bytes]] = []

    def envoy(name: str, text: str) -> subprocess.Popen[bytes]:
        path = work / f"{name}.yaml"
        path.write_text(text)
        argv = [envoy_binary(), "-c", str(path), "--concurrency", "1", "--base-id",
                str(base_id + len(started)), "--disable-hot-restart", "--log-level", "warn"]  # fmt: skip
        process = start_pinned(argv, args.server_cpu, log_path=work / f"{name}.log")
        started.append(process)
        return process

    print(
        f"h2load (h2c) -c {args.connections} -m 1 on cpu {args.load_cpu}; gateways and Envoys on cpu "
        f"{args.server_cpu}; {args.rounds} round(s) of {args.duration:g} s per way after {args.warmup:g} s "
        f"warm-up; publish body {len(PUBLISH)} B, token {len(identity.token)} B"
    )
    try:
        upstream_port = free_port()
        envoy("upstream", drafts_upstream_config(upstream_port))
        stacks: dict[str, Stack] = {}
        for label, policies in (
            ("checked", POLICIES),
            ("unchecked", unchecked_policies(work / "unchecked-policies")),
        ):
            directory = work / label
            directory.mkdir(exist_ok=True)
            port = free_port()
            config = gateway_config(directory, identity, port, policies=str(policies))
            gateway = start_gateway(config, args.server_cpu, directory / "gateway.log", env=env)
            started.append(gateway)
            listener, admin = free_port(), free_port()
            front = envoy(
                f"envoy-{label}", front_config(listener, admin, port, upstream_port, with_ext_proc=True)
            )
            stacks[label] = Stack(label, gateway, port, front, listener, admin)
        wait_http(upstream_port)
        for stack in stacks.values():
            wait_grpc(stack.gateway_port)
            wait_http(stack.listener)
        sanity(stacks, identity, headers)

        plan = {
            "checked": (stacks["checked"], bodies["publish"]),
            "unchecked": (stacks["unchecked"], bodies["publish"]),
            "minting": (stacks["checked"], bodies["create"]),
        }
        samples: dict[str, list[Sample]] = {way: [] for way in plan}
        for number in range(1, args.rounds + 1):
            order = list(plan) if number % 2 else list(reversed(plan))
            for way in order:
                stack, body = plan[way]
                sample = measure(way, stack, body, headers, number, args)
                samples[way].append(sample)
                print(
                    f"round {number} {way:<10} {sample.requests_per_s:7.0f} req/s  gateway "
                    f"{sample.gateway_us:5.0f} µs  envoy {sample.envoy_us:5.0f} µs  ext_proc streams "
                    f"{sample.ext_proc.get('streams_started', 0):.2f}, msgs sent "
                    f"{sample.ext_proc.get('stream_msgs_sent', 0):.2f} per request",
                    flush=True,
                )
        # Still checked after the load: bob is refused, the owner passes.
        sanity(stacks, identity, headers)
    finally:
        for process in reversed(started):
            stop(process)
        shutil.rmtree(work, ignore_errors=True)

    print()
    print(format_table(samples))
    ratios = [
        checked.gateway_us / unchecked.gateway_us
        for checked, unchecked in zip(samples["checked"], samples["unchecked"], strict=True)
    ]
    print(
        f"checked / unchecked gateway CPU per request by round: {', '.join(f'{r:.2f}' for r in ratios)} "
        f"(median {statistics.median(ratios):.2f}; target <= 1.25)"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {"samples": {k: [asdict(s) for s in v] for k, v in samples.items()}, "ratios": ratios},
                indent=2,
            )
        )
    return 0


def sanity(stacks: dict[str, Stack], identity: BenchIdentity, headers: dict[str, str]) -> None:
    """The owner's create_draft binds d-bench-1 through the checked stack; then the owner's
    publish passes both stacks, and another identity's publish is refused by the checked one
    only: what is measured is a real check, not a pass-through."""
    status, body = post(stacks["checked"].listener, CREATE, headers)
    if status != 200 or DRAFT_ID.encode() not in body:
        raise RuntimeError(f"create_draft through the checked stack: {status} {body[:200]!r}")
    now = int(time.time())
    other = identity.key.sign(
        {"iss": ISSUER, "aud": AUDIENCE, "sub": "someone-else", "iat": now, "exp": now + 600}
    )
    bob = {**headers, "authorization": f"Bearer {other}"}
    for label, stack in stacks.items():
        owner_status, _ = post(stack.listener, PUBLISH, headers)
        if owner_status != 200:
            raise RuntimeError(f"{label}: the owner's publish_draft got {owner_status}")
        other_status, _ = post(stack.listener, PUBLISH, bob)
        if (other_status == 200) != (label == "unchecked"):
            raise RuntimeError(f"{label}: another identity's publish_draft got {other_status}")


if __name__ == "__main__":
    raise SystemExit(main())
