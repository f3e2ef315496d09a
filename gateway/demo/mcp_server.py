"""A small MCP server (the official SDK's MCPServer) for the demo and the end-to-end tests.

Run it alone with `python -m gateway.demo.mcp_server --port 8080`: streamable HTTP at /mcp,
stateful (Mcp-Session-Id) for handshake-era clients, and the 2026-07-28 single-request
protocol for clients that send that MCP-Protocol-Version.
"""

from __future__ import annotations

import argparse
from typing import Any

from mcp.server.mcpserver import Context, MCPServer

MCP_PATH = "/mcp"
# Set by the gateway on every request it allows (and removed when a client sends it),
# so behind the gateway it names the verified caller. Without the gateway it means nothing.
SUBJECT_HEADER = "x-authz-subject"


def build_server() -> MCPServer:
    # WARNING: at INFO the SDK logs every session id it hands out.
    server: MCPServer = MCPServer("authz-gateway-demo", version="1.0", log_level="WARNING")

    @server.tool()
    def echo(text: str) -> str:
        """Return the text unchanged."""
        return text

    @server.tool()
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    @server.tool()
    def whoami(ctx: Context) -> str:
        """Who the gateway says is calling (the subject it verified)."""
        headers = ctx.headers or {}
        return str(headers.get(SUBJECT_HEADER, "unknown"))

    @server.tool()
    def delete_everything(confirm: bool = False) -> str:
        """A dangerous tool that a scope policy should keep from most callers."""
        return "deleted nothing (demo)" if confirm else "not confirmed"

    return server


def asgi_app(server: MCPServer | None = None, **options: Any) -> Any:
    """The Starlette app: stateful streamable HTTP at /mcp."""
    server = server or build_server()
    return server.streamable_http_app(streamable_http_path=MCP_PATH, stateless_http=False, **options)


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    parser = argparse.ArgumentParser(description="the demo MCP server (streamable HTTP, stateful)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args(argv)
    uvicorn.run(asgi_app(host=args.host), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
