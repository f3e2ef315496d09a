"""Building CheckRequests and calling a gateway's Check over real gRPC."""

from __future__ import annotations

from typing import Any

import grpc

from gateway.envoy_api.envoy.service.auth.v3 import attribute_context_pb2 as attrs
from gateway.envoy_api.envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc


def check_request(
    *,
    method: str = "POST",
    path: str = "/mcp",
    host: str = "mcp.example.test",
    headers: dict[str, str] | None = None,
    body: str = "",
    token: str | None = None,
    session_id: str | None = None,
    context_extensions: dict[str, str] | None = None,
) -> external_auth_pb2.CheckRequest:
    all_headers = {":method": method, ":path": path, ":authority": host, **(headers or {})}
    if body and not any(name.lower() == "content-type" for name in all_headers):
        all_headers["content-type"] = "application/json"
    if token is not None:
        all_headers["authorization"] = f"Bearer {token}"
    if session_id is not None:
        all_headers["mcp-session-id"] = session_id
    http = attrs.AttributeContext.HttpRequest(
        id="req-1",
        method=method,
        path=path,
        host=host,
        scheme="http",
        headers=all_headers,
        body=body,
        protocol="HTTP/1.1",
    )
    return external_auth_pb2.CheckRequest(
        attributes=attrs.AttributeContext(
            request=attrs.AttributeContext.Request(http=http),
            context_extensions=context_extensions or {},
        )
    )


class CheckClient:
    def __init__(self, address: str, options: list[tuple[str, Any]] | None = None) -> None:
        # options: e.g. ("grpc.use_local_subchannel_pool", 1) for a connection of its own
        self.channel = grpc.insecure_channel(address, options=options)
        self.stub = external_auth_pb2_grpc.AuthorizationStub(self.channel)

    def check(
        self, request: external_auth_pb2.CheckRequest, metadata: Any = None
    ) -> external_auth_pb2.CheckResponse:
        return self.stub.Check(request, timeout=5, metadata=metadata)

    def status(self, **kwargs: Any) -> int:
        """The HTTP status the gateway answers: 200 for an allow."""
        response = self.check(check_request(**kwargs))
        return 200 if response.HasField("ok_response") else int(response.denied_response.status.code)

    def close(self) -> None:
        self.channel.close()


def http_status(response: external_auth_pb2.CheckResponse) -> int:
    return 200 if response.HasField("ok_response") else int(response.denied_response.status.code)


def denied_headers(response: external_auth_pb2.CheckResponse) -> dict[str, str]:
    return {h.header.key: h.header.value for h in response.denied_response.headers}
