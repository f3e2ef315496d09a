"""An MCP upstream that answers every POST with an SSE stream in two steps: a first event goes
out at once, and the second only after the test says so (`release`). A test reads the first
event through Envoy before the second exists, so the second arrives mid-stream, after the
headers and the first event reached the client. Plain ASGI, served by uvicorn."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

FIRST_EVENT = (
    b'event: message\ndata: {"jsonrpc":"2.0","method":"notifications/progress",'
    b'"params":{"progressToken":1,"progress":1}}\n\n'
)


def result_event(draft_id: str) -> bytes:
    message = {
        "jsonrpc": "2.0",
        "id": 1,
        "result": {"content": [], "structuredContent": {"draft_id": draft_id}},
    }
    return b"event: message\ndata: " + json.dumps(message, separators=(",", ":")).encode() + b"\n\n"


class PausingSseUpstream:
    def __init__(self) -> None:
        self.second_event = b""
        self.released = threading.Event()
        self.second_sent = threading.Event()
        self.requests = 0

    def arm(self, second_event: bytes) -> None:
        """The next answer's second event; it waits for the next `release`."""
        self.second_event = second_event
        self.released.clear()
        self.second_sent.clear()

    def release(self) -> None:
        self.released.set()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        more = True
        while more:
            message = await receive()
            more = message.get("more_body", False)
        self.requests += 1
        headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": FIRST_EVENT, "more_body": True})
        deadline = time.monotonic() + 20
        while not self.released.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await send({"type": "http.response.body", "body": self.second_event, "more_body": True})
        self.second_sent.set()
        await send({"type": "http.response.body", "body": b"", "more_body": False})
