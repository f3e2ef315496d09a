"""Ask a running gateway one Check, as Envoy would, and print its answer.

    python scripts/try_check.py                      # no token: a deny (401)
    python scripts/try_check.py --token "$TOKEN"     # a valid token: an allow
    python scripts/try_check.py --token "$TOKEN" --issue s-1   # an allow whose answer issues s-1
    python scripts/try_check.py --wait               # wait until the gateway is SERVING

It sends a CheckRequest for `POST /mcp` with an MCP JSON-RPC body to 127.0.0.1:9191
(--address to change) and prints the decision, the HTTP status Envoy would return, and
the headers: the upstream headers on an allow, the WWW-Authenticate challenge on a deny.
With --issue, an allowed request's response then carries `Mcp-Session-Id: <id>`, shown to
the gateway as Envoy's ext_proc filter would (request headers, then response headers): with
`session.bind_on: response` the id is bound to the token's identity then.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.envoy_api.envoy.config.core.v3 import base_pb2
from gateway.envoy_api.envoy.service.auth.v3 import attribute_context_pb2 as attrs
from gateway.envoy_api.envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from gateway.envoy_api.envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc_pb2


def wait_serving(address: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=0.5)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return True
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    return False


def build_request(token: str | None, session_id: str | None, path: str) -> external_auth_pb2.CheckRequest:
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
    headers = {
        ":method": "POST",
        ":path": path,
        ":authority": "mcp.example.com",
        "content-type": "application/json",
    }
    if token:
        headers["authorization"] = f"Bearer {token}"
    if session_id:
        headers["mcp-session-id"] = session_id
    http = attrs.AttributeContext.HttpRequest(
        id="try-check",
        method="POST",
        path=path,
        host="mcp.example.com",
        scheme="http",
        headers=headers,
        body=body,
    )
    return external_auth_pb2.CheckRequest(
        attributes=attrs.AttributeContext(request=attrs.AttributeContext.Request(http=http))
    )


def _header_map(headers: dict[str, str]) -> base_pb2.HeaderMap:
    return base_pb2.HeaderMap(
        headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in headers.items()]
    )


def issue(channel: grpc.Channel, token: str | None, session_id: str | None, path: str, issued: str) -> str:
    """The response path, as Envoy's ext_proc filter plays it: what the client would get."""
    request = {":method": "POST", ":path": path, ":authority": "mcp.example.com"}
    if token:
        request["authorization"] = f"Bearer {token}"
    if session_id:
        request["mcp-session-id"] = session_id
    response = {":status": "200", "content-type": "application/json", "mcp-session-id": issued}
    messages = [
        ext_proc_pb2.ProcessingRequest(request_headers=ext_proc_pb2.HttpHeaders(headers=_header_map(request))),
        ext_proc_pb2.ProcessingRequest(response_headers=ext_proc_pb2.HttpHeaders(headers=_header_map(response))),
    ]
    process = channel.stream_stream(
        "/envoy.service.ext_proc.v3.ExternalProcessor/Process",
        request_serializer=ext_proc_pb2.ProcessingRequest.SerializeToString,
        response_deserializer=ext_proc_pb2.ProcessingResponse.FromString,
    )
    for reply in process(iter(messages), timeout=5):
        if reply.HasField("immediate_response"):
            refused = reply.immediate_response
            return f"Envoy answers {refused.status.code} {refused.body.decode()} instead ({refused.details})"
    return f"the client gets the response, with mcp-session-id: {issued}"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--address", default="127.0.0.1:9191")
    parser.add_argument("--token", help="the bearer token (e.g. from `authz-gateway token`)")
    parser.add_argument("--session", help="an Mcp-Session-Id header value")
    parser.add_argument("--path", default="/mcp")
    parser.add_argument("--issue", metavar="ID", help="the upstream's response issues this Mcp-Session-Id")
    parser.add_argument("--wait", action="store_true", help="only wait (up to 60 s) for SERVING")
    args = parser.parse_args()
    if args.wait:
        if wait_serving(args.address, 60):
            return 0
        print(f"the gateway at {args.address} is not SERVING", file=sys.stderr)
        return 1
    try:
        with grpc.insecure_channel(args.address) as channel:
            response = external_auth_pb2_grpc.AuthorizationStub(channel).Check(
                build_request(args.token, args.session, args.path), timeout=5
            )
            issued = None
            if args.issue and response.HasField("ok_response"):
                issued = issue(channel, args.token, args.session, args.path, args.issue)
    except grpc.RpcError as error:
        print(f"try_check: no gateway answers at {args.address} ({error.code().name})", file=sys.stderr)
        return 2
    if response.HasField("ok_response"):
        added = ", ".join(f"{h.header.key}: {h.header.value}" for h in response.ok_response.headers)
        removed = ", ".join(response.ok_response.headers_to_remove)
        print(
            f"ALLOW  -> Envoy forwards the request upstream, adding [{added}]"
            + (f" and removing [{removed}]" if removed else "")
        )
        if issued:
            print(f"         then the upstream answers: {issued}")
        return 0
    denied = response.denied_response
    print(f"DENY   -> Envoy answers {denied.status.code} {denied.body}")
    for option in denied.headers:
        if option.header.key == "www-authenticate":
            print(f"          www-authenticate: {option.header.value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
