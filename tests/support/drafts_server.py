"""A small "drafts" MCP server (the official SDK's MCPServer) for handles, MCP 2026-07-28.

`create_draft` returns a new draft id as `structuredContent.draft_id`; `publish_draft` and
`delete_draft` take it as the argument `draft_id`. Like most servers, it does NOT check who
owns a draft: anyone holding an id can publish or delete it. The gateway's handle binding
(examples/policies/handles) is what keeps a draft to its creator.

Run it alone, from the repository root:

    python -m tests.support.drafts_server --port 8080

Streamable HTTP at /mcp. A 2026-07-28 request is one POST; the answer is JSON, or an SSE
stream when the tool reports progress (call `create_draft` with a progress callback).
`DraftsServer.calls` records every tool call the server executed, for the tests.
"""

from __future__ import annotations

import argparse
import secrets
import threading
from dataclasses import dataclass, field
from typing import Any, TypedDict

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError

MCP_PATH = "/mcp"


class NewDraft(TypedDict):
    draft_id: str
    title: str


@dataclass
class DraftsServer:
    """The server's state: drafts by id, and what it executed (tool, draft id)."""

    drafts: dict[str, dict[str, Any]] = field(default_factory=dict)
    calls: list[tuple[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def build(self) -> MCPServer:
        server: MCPServer = MCPServer("drafts", version="1.0", log_level="WARNING")

        @server.tool()
        async def create_draft(title: str, ctx: Context, idempotency_key: str = "") -> NewDraft:
            """Start a new draft; returns its id. A retry with the same idempotency key gets the
            same id back, whoever asks: the kind of server bug the gateway refuses (502)."""
            draft_id = idempotency_key or "d-" + secrets.token_urlsafe(12)
            with self.lock:
                self.drafts[draft_id] = {"title": title, "published": False}
                self.calls.append(("create_draft", draft_id))
            # With a progress token this is an SSE answer: the progress event, then the result.
            await ctx.report_progress(1, 1, "created")
            return {"draft_id": draft_id, "title": title}

        @server.tool()
        def publish_draft(draft_id: str) -> str:
            """Publish a draft."""
            with self.lock:
                self.calls.append(("publish_draft", draft_id))
                draft = self.drafts.get(draft_id)
                if draft is None:
                    raise ToolError("no such draft")
                draft["published"] = True
            return f"published {draft['title']}"

        @server.tool()
        def delete_draft(draft_id: str) -> str:
            """Delete a draft."""
            with self.lock:
                self.calls.append(("delete_draft", draft_id))
                if self.drafts.pop(draft_id, None) is None:
                    raise ToolError("no such draft")
            return "deleted"

        return server

    def executed(self, tool: str, draft_id: str) -> bool:
        with self.lock:
            return (tool, draft_id) in self.calls


def asgi_app(state: DraftsServer | None = None, **options: Any) -> Any:
    server = (state or DraftsServer()).build()
    return server.streamable_http_app(streamable_http_path=MCP_PATH, **options)


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    parser = argparse.ArgumentParser(description="the drafts MCP server (MCP 2026-07-28 handles)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args(argv)
    uvicorn.run(asgi_app(host=args.host), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
