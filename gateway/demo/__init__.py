"""`authz-gateway demo`: the whole MCP story on this machine, with real Envoy and a real MCP server."""
