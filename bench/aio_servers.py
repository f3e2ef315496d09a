"""An experiment for bench_envoy.py: the same Check servers on a `grpc.aio` server.

    python bench/aio_servers.py noop PORT              # a no-op Check on grpc.aio
    python bench/aio_servers.py gateway CONFIG PORT    # the gateway's CheckService on grpc.aio

The gateway variant builds the gateway as `serve` does (policies, keys, store), but answers
Check from the event loop: the decision runs inline, with no thread hand-off per call. The
store is called synchronously, so a Redis round trip blocks the loop: this measures the
server stack, not a finished design (no health service, no reload, no admin).
"""

from __future__ import annotations

import asyncio
import gc
import sys
from pathlib import Path
from typing import Any

import grpc

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from gateway.envoy_api.envoy.service.auth.v3 import external_auth_pb2  # noqa: E402
from gateway.envoy_api.google.rpc import code_pb2, status_pb2  # noqa: E402
from gateway.server import SERVICE_NAME, _lenient_parse  # noqa: E402


async def serve(port: int, check: Any, deserializer: Any) -> None:
    handler = grpc.unary_unary_rpc_method_handler(
        check,
        request_deserializer=deserializer,
        response_serializer=external_auth_pb2.CheckResponse.SerializeToString,
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, {"Check": handler}),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def main(argv: list[str]) -> int:
    if argv[0] == "noop":
        allow = external_auth_pb2.CheckResponse(
            status=status_pb2.Status(code=code_pb2.OK), ok_response=external_auth_pb2.OkHttpResponse()
        )

        async def noop(_request: Any, _context: Any) -> Any:
            return allow

        asyncio.run(serve(int(argv[1]), noop, external_auth_pb2.CheckRequest.FromString))
        return 0
    from gateway.app import build_gateway
    from gateway.config import load_config

    gateway = build_gateway(load_config(Path(argv[1])))
    gateway.store_health.start()
    service = gateway.service

    async def check(request: Any, context: Any) -> Any:
        return service.Check(request, context)

    gc.collect()
    gc.freeze()
    asyncio.run(serve(int(argv[2]), check, _lenient_parse))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
