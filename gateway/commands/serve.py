"""`authz-gateway serve`: run the Check server until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import gc
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from gateway.config import Config, ConfigError, load_config, parse_hostport
from gateway.identity.keys import JwksError
from gateway.policy.loader import PolicyLoadError
from gateway.session import StoreURLError

log = logging.getLogger("gateway.serve")


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("serve", help="serve Envoy's ext_authz Check over gRPC")
    parser.add_argument("--config", type=Path, help="YAML config file")
    parser.add_argument("--listen", help="HOST:PORT for the Check server (default 127.0.0.1:9191)")
    parser.add_argument(
        "--policies", type=Path, help="policy directory (default ./policies, else the built-in)"
    )
    parser.add_argument("--store", help="session store URL (default memory://)")
    parser.add_argument("--workers", type=int, help="processes sharing the port (SO_REUSEPORT)")
    parser.set_defaults(run=run)


def resolve_config(args: argparse.Namespace) -> Config:
    config = load_config(args.config) if args.config else Config()
    if args.listen:
        parse_hostport(args.listen)
    return config.with_overrides(
        listen=args.listen,
        policies=args.policies.resolve() if args.policies else None,
        store=args.store,
        workers=getattr(args, "workers", None),
    )


def serve(config: Config, *, reuse_port: bool = False, admin: bool = True) -> int:
    if config.workers > 1:
        from gateway.workers import serve_workers

        return serve_workers(config, serve)
    from gateway.admin import admin_access, start_session_admin
    from gateway.app import build_gateway
    from gateway.policy.watch import PolicyWatcher

    # Before the gateway starts: admin files (certificates, keys) that cannot serve stop it here.
    access = admin_access(config) if admin else None
    gateway = build_gateway(config, reuse_port=reuse_port)
    stop = threading.Event()

    def on_stop(signum: int, _frame: Any) -> None:
        log.info("signal %d: finishing in-flight checks", signum)
        stop.set()

    def on_reload(_signum: int, _frame: Any) -> None:
        threading.Thread(target=gateway.reload_policies, name="sighup-reload", daemon=True).start()

    # Before serving: a SIGTERM that comes as soon as the port answers still stops cleanly.
    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, on_reload)
    port = gateway.start()
    # Everything built so far (modules, policies, keys) lives as long as the process: keep
    # it out of the cyclic collector's way, so that collecting a check's garbage stays cheap.
    gc.collect()
    gc.freeze()
    admin_server = None
    if access is not None:
        admin_server = start_session_admin(config, gateway.store, access, gateway.handle_store)
    watcher = PolicyWatcher(gateway.policy_dir, gateway.reload_policies, debounce=config.reload_debounce)
    watcher.start()
    log.info(
        "authz-gateway listening on %s (port %d), policies from %s, store %s",
        config.listen,
        port,
        gateway.policy_dir,
        config.store.split("://")[0] + "://",
    )
    stop.wait()
    watcher.stop()
    if admin_server is not None:
        admin_server.stop(1.0).wait()
    gateway.stop()
    log.info("stopped")
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        config = resolve_config(args)
        return serve(config)
    except (ConfigError, PolicyLoadError, JwksError, StoreURLError, ValueError, OSError) as exc:
        print(f"authz-gateway: {exc}", file=sys.stderr)
        return 2
