"""A real MCP server (the SDK's MCPServer, streamable HTTP, stateful) as the upstream behind
Envoy, served by uvicorn in a thread, remembering every HTTP request that reached it."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import uvicorn

from gateway.demo.mcp_server import asgi_app


@dataclass
class SeenRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    status: int | None = None

    @property
    def session_id(self) -> str | None:
        return self.headers.get("mcp-session-id")

    @property
    def rpc_method(self) -> str:
        try:
            message = json.loads(self.body)
        except ValueError:
            return ""
        return str(message.get("method", "")) if isinstance(message, dict) else ""

    @property
    def tool(self) -> str:
        try:
            params = json.loads(self.body).get("params") or {}
        except (ValueError, AttributeError):
            return ""
        return str(params.get("name", ""))


@dataclass
class _Recorder:
    """ASGI middleware: what reached the MCP server, and what it answered."""

    app: Any
    seen: list[SeenRequest] = field(default_factory=list)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        record = SeenRequest(
            method=scope["method"],
            path=scope["path"],
            headers={k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]},
            body=b"",
        )
        self.seen.append(record)

        async def recording_receive() -> Any:
            message = await receive()
            if message["type"] == "http.request":
                record.body += message.get("body", b"")
            return message

        async def recording_send(message: Any) -> None:
            if message["type"] == "http.response.start":
                record.status = int(message["status"])
                # The session id the server handed out, visible to the test.
                for key, value in message.get("headers", []):
                    if key.lower() == b"mcp-session-id":
                        record.headers["x-test-issued-session-id"] = value.decode("latin-1")
            await send(message)

        await self.app(scope, recording_receive, recording_send)


class McpUpstream:
    def __init__(self, port: int) -> None:
        self.port = port
        self._recorder = _Recorder(asgi_app())
        config = uvicorn.Config(
            self._recorder, host="127.0.0.1", port=port, log_level="warning", lifespan="on"
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="mcp-upstream", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 15
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the MCP upstream did not start")
            time.sleep(0.02)

    @property
    def seen(self) -> list[SeenRequest]:
        return list(self._recorder.seen)

    def issued_session_ids(self) -> list[str]:
        """The session ids the server handed out, one per initialize it answered."""
        return [
            r.headers["x-test-issued-session-id"]
            for r in self.seen
            if r.rpc_method == "initialize" and "x-test-issued-session-id" in r.headers
        ]

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)
