"""A tool call whose handle the gateway checks, against one it does not, in one run.

    python bench/bench_handles.py

One gateway in process (`Gateway(...).service.Check`, no telemetry, the memory store) with
examples/policies/handles, and two real CheckRequests of MCP 2026-07-28 `tools/call`s with
the same token: `publish_draft` presenting a draft id bound to the caller (the handle is looked
up in the store and compared with the caller), and `list_drafts` presenting none (the same
policy, the body read the same way). Small batches of each alternate; each figure is the best batch,
in µs of process CPU per Check, and the ratio is checked / unchecked. Check is the whole of the
gateway's work per request but grpc's; through Envoy, grpc's share (DESIGN.md §6: about 85% of
the gateway's time) makes the ratio of the whole process smaller still.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from bench_check import AUDIENCE, ISSUER, SUBJECT, SigningKeyPair, build_check_request, claims_for, jwks  # noqa: E402


def tool_call(token: str, name: str, arguments: dict[str, Any]) -> Any:
    request = build_check_request(token)
    http = request.attributes.request.http
    body = json.dumps(
        {"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": name, "arguments": arguments}},
        separators=(",", ":"),
    )
    http.body = body
    http.size = len(body)
    http.headers["content-length"] = str(len(body))
    http.headers["mcp-protocol-version"] = "2026-07-28"
    del http.headers["mcp-session-id"]
    return request


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # Many small batches, alternating: on a shared machine the best of many is the figure least
    # disturbed by other processes.
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--size", type=int, default=500)
    args = parser.parse_args()

    import yaml

    from gateway.app import Gateway
    from gateway.config import load_config
    from gateway.telemetry.setup import Telemetry

    work = Path(tempfile.mkdtemp(prefix="bench-handles-"))
    key = SigningKeyPair.generate("RS256")
    (work / "jwks.json").write_text(json.dumps(jwks(key)))
    config = {
        "listen": "127.0.0.1:0",
        "store": "memory://",
        "policies": str(REPO / "examples" / "policies" / "handles"),
        "auth": {
            "issuers": [{"issuer": ISSUER, "audiences": [AUDIENCE], "jwks_file": str(work / "jwks.json")}]
        },
    }
    (work / "gateway.yaml").write_text(yaml.safe_dump(config))
    gateway = Gateway(load_config(work / "gateway.yaml"), telemetry=Telemetry())
    token = key.sign(claims_for(issuer=ISSUER, audience=AUDIENCE, subject=SUBJECT))
    minted = gateway.authorizer.handle_binder.mint(
        "draft", "d-bench-1", (ISSUER, SUBJECT), lambda: {"iss": ISSUER, "sub": SUBJECT}, time.time()
    )
    assert not hasattr(minted, "reason"), minted
    requests = {
        "checked": tool_call(token, "publish_draft", {"draft_id": "d-bench-1"}),
        "unchecked": tool_call(token, "list_drafts", {}),
    }

    class Rpc:
        def invocation_metadata(self) -> tuple[()]:
            return ()

    rpc = Rpc()
    check = gateway.service.Check
    for name, request in requests.items():
        if not check(request, rpc).HasField("ok_response"):
            raise SystemExit(f"{name}: the check was not allowed")
    best = dict.fromkeys(requests, float("inf"))
    for _ in range(args.batches):
        for name, request in requests.items():
            started = time.process_time()
            for _ in range(args.size):
                check(request, rpc)
            best[name] = min(best[name], (time.process_time() - started) / args.size * 1e6)
    for name, micros in best.items():
        print(f"{name:10} {micros:6.1f} µs CPU per Check")
    print(f"ratio      {best['checked'] / best['unchecked']:.2f} (checked / unchecked; target <= 1.25)")


if __name__ == "__main__":
    main()
