"""A real gateway inside the test process: real gRPC on a free loopback port, every decision recorded.

Faster than a GatewayProcess, and the recorded Decision gives the exact reason code of
each check (the response body only carries the public error).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from gateway.app import Gateway
from gateway.config import config_from_mapping
from gateway.decision import Decision
from tests.support.checks import CheckClient


class InProcessGateway:
    def __init__(self, config: dict[str, Any], base: Path | None = None) -> None:
        self.decisions: list[Decision] = []
        self._lock = threading.Lock()
        parsed = config_from_mapping({**config, "listen": "127.0.0.1:0"}, "test-config.yaml", base)
        self.gateway = Gateway(parsed, listeners=(self._record,))
        self.port = self.gateway.start()
        self.address = f"127.0.0.1:{self.port}"
        self.client = CheckClient(self.address)

    def _record(self, outcome: Decision, _context: Any, _span: Any) -> None:
        with self._lock:
            self.decisions.append(outcome)

    @property
    def last(self) -> Decision:
        with self._lock:
            return self.decisions[-1]

    def stop(self) -> None:
        self.client.close()
        self.gateway.stop(grace=1.0)
