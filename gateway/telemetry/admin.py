"""The small admin HTTP port (`telemetry.metrics_listen`): /metrics, /healthz, /readyz.

/metrics is Prometheus text from the OTel PrometheusMetricReader's registry.
/healthz answers 200 while the process serves HTTP at all.
/readyz answers 200 only when policies and keys are loaded and the store answers;
otherwise 503 with the reasons (never a secret: no URLs, no ids).
It runs on its own threads, so a slow scrape never holds up a Check.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

from gateway.config import parse_hostport
from gateway.policy.model import PolicyHolder
from gateway.session.store import SessionStore

log = logging.getLogger(__name__)

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Readiness(Protocol):
    """What /readyz asks of the gateway."""

    @property
    def store(self) -> SessionStore: ...

    @property
    def policies(self) -> PolicyHolder: ...

    def keys_loaded(self) -> bool: ...


def readiness_problems(target: Readiness) -> list[str]:
    problems = []
    if target.policies.current is None:
        problems.append("policies not loaded")
    if not target.keys_loaded():
        problems.append("signing keys not loaded")
    try:
        target.store.ping()
    except Exception as exc:  # any failure to answer means not ready
        problems.append(f"session store not answering ({type(exc).__name__})")
    return problems


def prometheus_text() -> bytes:
    from prometheus_client import REGISTRY, generate_latest

    return bytes(generate_latest(REGISTRY))


class AdminServer:
    def __init__(
        self, listen: str, problems: Callable[[], list[str]], metrics_text: Callable[[], bytes]
    ) -> None:
        host, port = parse_hostport(listen)
        admin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                path = self.path.partition("?")[0]
                if path == "/metrics":
                    self._reply(200, admin._metrics_text(), PROMETHEUS_CONTENT_TYPE)
                elif path == "/healthz":
                    self._reply(200, b"ok\n", "text/plain; charset=utf-8")
                elif path == "/readyz":
                    found = admin._problems()
                    body = json.dumps({"ready": not found, "problems": found}).encode() + b"\n"
                    self._reply(503 if found else 200, body, "application/json")
                else:
                    self._reply(404, b"not found\n", "text/plain; charset=utf-8")

            def _reply(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("content-type", content_type)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                return  # scrapes every few seconds would drown the log

        self._problems = problems
        self._metrics_text = metrics_text
        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, name="admin-http", daemon=True)

    def start(self) -> int:
        self._thread.start()
        log.info("admin HTTP (/metrics, /healthz, /readyz) on port %d", self.port)
        return self.port

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def worker_listen(listen: str, index: int) -> str:
    """The admin address of worker `index` under --workers: the port plus the index (0 stays 0).

    Each worker process has its own metrics and readiness, so each serves its own port.
    """
    host, port = parse_hostport(listen)
    if port == 0:
        return listen
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{port + index}"


def start_admin(listen: str, target: Readiness) -> AdminServer:
    server = AdminServer(listen, lambda: readiness_problems(target), prometheus_text)
    server.start()
    return server
