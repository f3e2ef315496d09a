"""Real MCP servers built with the two official SDKs, for differential tests of body parsing.

- `ts_sdk_server()`: tests/node/mcp_server.mjs, the TypeScript SDK's `createMcpExpressApp()`
  with a stateless StreamableHTTPServerTransport, in a node subprocess.
- `python_sdk_server()`: the Python SDK's (`mcp`) low-level `Server`, stateless streamable
  HTTP, served by uvicorn in a thread.

Both run handlers that accept ANY tool (prompt, resource) name and record each call they
executed. `send(headers, body)` posts raw bytes, exactly as given (no re-encoding), and
returns the HTTP status and the calls that request made the server execute, as
(method, name) pairs. Each request carries a unique `x-test-tag` header, so the calls of one
request are told apart from any other's. The node dependencies come from
`npm ci --prefix tests/node` (scripts/setup-env.sh runs it).
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import itertools
import json
import os
import shutil
import subprocess
import threading
import time
import uuid
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import mcp_types as types
import uvicorn
from mcp.server.lowlevel import Server
from mcp.server.transport_security import TransportSecuritySettings

from tests.support.processes import REPO, free_port

NODE_DIR = REPO / "tests" / "node"
TS_SERVER_SCRIPT = NODE_DIR / "mcp_server.mjs"
TAG_HEADER = "x-test-tag"
# What an MCP client sends; a request's own headers replace it.
DEFAULT_ACCEPT = "application/json, text/event-stream"

ExecutedCall = tuple[str, str]


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    calls: list[ExecutedCall]
    tag: str


class SdkServer:
    """An MCP server at `url` that records the calls it executes, by request tag."""

    name = ""

    def __init__(self, url: str) -> None:
        self.url = url
        self._client = httpx.Client(timeout=20)
        self._tags = itertools.count()

    def send(self, headers: Mapping[str, str], body: bytes) -> tuple[int, list[ExecutedCall]]:
        """POST `body` with `headers`; the status and the calls the server executed for it."""
        reply = self.post(headers, body)
        return reply.status, reply.calls

    def post(self, headers: Mapping[str, str], body: bytes, *, url: str | None = None) -> Reply:
        tag = f"{self.name}-{next(self._tags)}-{uuid.uuid4().hex[:8]}"
        # httpx adds accept, accept-encoding, user-agent and connection by default; keep only
        # what the request names, plus the accept an MCP client sends, and never re-encode.
        sent = {"accept": DEFAULT_ACCEPT, **{k.lower(): v for k, v in headers.items()}, TAG_HEADER: tag}
        request = self._client.build_request("POST", url or self.url, content=body)
        for default in ("accept-encoding", "user-agent"):
            if default not in sent:
                request.headers.pop(default, None)
        for key, value in sent.items():
            request.headers[key] = value
        response = self._client.send(request)
        content = response.read()  # stateless servers end the stream after the last response
        if response.status_code == 202:
            time.sleep(0.05)  # a notification is acknowledged before it is handled
        headers = {k.lower(): v for k, v in response.headers.items()}
        return Reply(response.status_code, headers, content, self.calls(tag), tag)

    def calls(self, tag: str) -> list[ExecutedCall]:
        """The calls the server executed for the request with this tag."""
        raise NotImplementedError

    def close(self) -> None:
        self._client.close()


# ---- the TypeScript SDK (node) ----


class TsSdkServer(SdkServer):
    name = "ts"

    def __init__(self, log_dir: Path) -> None:
        node = shutil.which("node")
        if node is None:
            raise RuntimeError("node is not installed; the TypeScript SDK server needs Node >= 18")
        if not (NODE_DIR / "node_modules" / "@modelcontextprotocol" / "sdk").is_dir():
            raise RuntimeError("tests/node has no node_modules: run `npm ci --prefix tests/node`")
        self.port = free_port()
        self.log_path = log_dir / f"ts-sdk-server-{self.port}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [node, str(TS_SERVER_SCRIPT), str(self.port)],
            cwd=NODE_DIR,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env={**os.environ, "NODE_ENV": "test"},
        )
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read_stdout, name="ts-sdk-stdout", daemon=True)
        self._reader.start()
        if not self._ready.wait(20) or self.proc.poll() is not None:
            self.close()
            raise RuntimeError(f"the TypeScript SDK server did not start:\n{self.log_text()}")
        super().__init__(f"http://127.0.0.1:{self.port}/mcp")

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self._log.write(raw)
            with contextlib.suppress(ValueError, TypeError):
                if "ready" in json.loads(raw):
                    self._ready.set()

    def log_text(self) -> str:
        with contextlib.suppress(ValueError):
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def calls(self, tag: str) -> list[ExecutedCall]:
        response = self._client.get(f"http://127.0.0.1:{self.port}/calls", params={"tag": tag})
        response.raise_for_status()
        return [(c["method"], c["name"]) for c in response.json()]

    def requests(self, tag: str) -> list[dict[str, str]]:
        """The HTTP requests with this tag that reached the server, parsed or not."""
        response = self._client.get(f"http://127.0.0.1:{self.port}/requests", params={"tag": tag})
        response.raise_for_status()
        return list(response.json())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()
        with contextlib.suppress(AttributeError):
            super().close()


@contextlib.contextmanager
def ts_sdk_server(log_dir: Path) -> Iterator[TsSdkServer]:
    server = TsSdkServer(log_dir)
    try:
        yield server
    finally:
        server.close()


# ---- the Python SDK (mcp) ----


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, ExecutedCall]] = []
        self._lock = threading.Lock()

    def record(self, ctx: Any, method: str, name: Any) -> None:
        request = getattr(ctx, "request", None)
        headers = getattr(request, "headers", None) or {}
        tag = str(headers.get(TAG_HEADER, ""))
        with self._lock:
            self.calls.append((tag, (method, name if isinstance(name, str) else json.dumps(name))))


def _python_server(recorder: _Recorder) -> Server[Any]:
    async def list_tools(ctx: Any, params: Any) -> types.ListToolsResult:
        recorder.record(ctx, "tools/list", "")
        return types.ListToolsResult(tools=[])

    async def call_tool(ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
        recorder.record(ctx, "tools/call", params.name)
        return types.CallToolResult(content=[types.TextContent(type="text", text=f"ran {params.name}")])

    async def list_prompts(ctx: Any, params: Any) -> types.ListPromptsResult:
        recorder.record(ctx, "prompts/list", "")
        return types.ListPromptsResult(prompts=[])

    async def get_prompt(ctx: Any, params: types.GetPromptRequestParams) -> types.GetPromptResult:
        recorder.record(ctx, "prompts/get", params.name)
        return types.GetPromptResult(messages=[])

    async def list_resources(ctx: Any, params: Any) -> types.ListResourcesResult:
        recorder.record(ctx, "resources/list", "")
        return types.ListResourcesResult(resources=[])

    async def read_resource(ctx: Any, params: types.ReadResourceRequestParams) -> types.ReadResourceResult:
        recorder.record(ctx, "resources/read", str(params.uri))
        return types.ReadResourceResult(contents=[])

    return Server(
        "authz-gateway-py-test-server",
        version="1.0.0",
        # No schema: the 2026-07-28 path would otherwise call tools/list itself to check
        # Mcp-Param-* headers, a call no client made.
        get_tool_input_schema=lambda name: None,
        on_list_tools=list_tools,
        on_call_tool=call_tool,
        on_list_prompts=list_prompts,
        on_get_prompt=get_prompt,
        on_list_resources=list_resources,
        on_read_resource=read_resource,
    )


class PythonSdkServer(SdkServer):
    name = "py"

    def __init__(self) -> None:
        self._recorder = _Recorder()
        # Behind a proxy the Host is the public name, so DNS-rebinding protection (Host and
        # Origin allow-lists) is off, as such deployments run it; the SDK still checks the
        # Content-Type.
        app = _python_server(self._recorder).streamable_http_app(
            streamable_http_path="/mcp",
            stateless_http=True,
            transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
        )
        self.port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error", lifespan="on")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="py-sdk-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 15
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the Python SDK server did not start")
            time.sleep(0.02)
        super().__init__(f"http://127.0.0.1:{self.port}/mcp")

    def calls(self, tag: str) -> list[ExecutedCall]:
        return [call for t, call in list(self._recorder.calls) if t == tag]

    def close(self) -> None:
        super().close()
        self._server.should_exit = True
        self._thread.join(10)


@contextlib.contextmanager
def python_sdk_server() -> Iterator[PythonSdkServer]:
    server = PythonSdkServer()
    try:
        yield server
    finally:
        server.close()


# ---- the corpus of request bodies (tests/corpus/mcp_bodies.json) ----

CORPUS = REPO / "tests" / "corpus" / "mcp_bodies.json"


def _encode(text: str, encoding: str) -> bytes:
    boms = {
        "utf-8-bom": (b"\xef\xbb\xbf", "utf-8"),
        "utf-16le-bom": (b"\xff\xfe", "utf-16-le"),
        "utf-16be-bom": (b"\xfe\xff", "utf-16-be"),
    }
    if encoding in boms:
        bom, codec = boms[encoding]
        return bom + text.encode(codec)
    codecs = {"utf-8": "utf-8", "utf-16le": "utf-16-le", "utf-16be": "utf-16-be", "utf-32le": "utf-32-le"}
    return text.encode(codecs[encoding])


def _compress(data: bytes, how: str) -> bytes:
    if how == "gzip":
        return gzip.compress(data, mtime=0)
    if how == "deflate":  # HTTP's deflate: the zlib format
        return zlib.compress(data)
    if how == "deflate-raw":
        packer = zlib.compressobj(wbits=-15)
        return packer.compress(data) + packer.flush()
    raise ValueError(f"unknown compression {how!r}")


@dataclass(frozen=True)
class CorpusEntry:
    """One request body of the corpus, with what the gateway and each SDK do with it.

    `body` is text, or a list of parts where a part is text or [text, times] (for the
    deep and long bodies); it is encoded with `encode` (default UTF-8) and then compressed
    with `compress`. `body_b64` gives raw bytes instead. `gateway` is the reason the
    gateway refuses the request with, or "calls": then `calls` are the (method, name)
    pairs it judges. `ts` and `py` are the calls each SDK server executed.
    """

    id: str
    comment: str
    headers: dict[str, str]
    body: bytes
    gateway: str
    calls: tuple[ExecutedCall, ...]
    ts: tuple[ExecutedCall, ...]
    py: tuple[ExecutedCall, ...]
    envoy: bool

    @property
    def refused(self) -> bool:
        return self.gateway != "calls"


def _text(value: Any) -> str:
    """Text, or a list of parts: text, or [text, times] for a long run."""
    if isinstance(value, str):
        return value
    return "".join(part if isinstance(part, str) else part[0] * part[1] for part in value)


def _body_bytes(raw: dict[str, Any]) -> bytes:
    if "body_b64" in raw:
        return base64.b64decode(raw["body_b64"])
    data = _encode(_text(raw.get("body", "")), raw.get("encode", "utf-8"))
    if "compress" in raw:
        data = _compress(data, raw["compress"])
    return data


def _pairs(items: Any) -> tuple[ExecutedCall, ...]:
    return tuple((str(m), _text(n)) for m, n in items or ())


def load_corpus(path: Path = CORPUS) -> list[CorpusEntry]:
    entries = []
    for raw in json.loads(path.read_text())["entries"]:
        entries.append(
            CorpusEntry(
                id=raw["id"],
                comment=raw["comment"],
                headers=dict(raw.get("headers", {})),
                body=_body_bytes(raw),
                gateway=raw["gateway"],
                calls=_pairs(raw.get("calls")),
                ts=_pairs(raw.get("ts")),
                py=_pairs(raw.get("py")),
                envoy=bool(raw.get("envoy", False)),
            )
        )
    return entries
