"""`serve --workers N`: N gateway processes sharing one port (SO_REUSEPORT).

The parent starts the workers (fresh interpreters: gRPC does not survive fork), runs the
admin API when one is configured, passes SIGHUP on, and on SIGTERM or SIGINT stops every
worker gracefully. The kernel spreads connections across the workers, so their store must
be shared: memory:// is refused. A worker that dies on its own stops the others too, and
the parent exits 1, so a supervisor (systemd, Kubernetes) sees the failure.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import replace
from multiprocessing.process import BaseProcess
from typing import Any

from gateway.config import Config, ConfigError, parse_hostport

log = logging.getLogger("gateway.workers")


def check_workers(config: Config) -> None:
    """Refuse what cannot work with several processes, before any starts."""
    if config.workers <= 1:
        return
    if config.store.split("://")[0].lower() == "memory":
        raise ConfigError(
            f"--workers {config.workers} needs a session store shared by the processes: memory:// is "
            "private to each process, so a session bound in one would be unknown to the others. "
            "Use store: sqlite:///path/to/sessions.db (one host) or redis://host:port/db (many hosts)."
        )
    if parse_hostport(config.listen)[1] == 0:
        raise ConfigError(f"--workers {config.workers} needs a fixed port in listen (not {config.listen})")


# What each worker runs: `serve` of gateway/commands/serve.py, passed in (and pickled by
# name to the spawned process) so that this module does not import the command back.
ServeOne = Callable[..., int]


def _worker_main(serve: ServeOne, config: Config, log_level: int, index: int) -> None:
    logging.basicConfig(
        level=log_level,
        format=f"%(asctime)s %(levelname)s %(name)s[worker {index}]: %(message)s",
    )
    try:
        if config.telemetry.metrics_listen:  # one admin port per worker: port + index
            from gateway.telemetry.admin import worker_listen

            listen = worker_listen(config.telemetry.metrics_listen, index)
            config = replace(config, telemetry=replace(config.telemetry, metrics_listen=listen))
        code = serve(replace(config, workers=1), reuse_port=True, admin=False)
    except Exception as exc:  # the same one-line message `serve` prints, from each worker
        print(f"authz-gateway: {exc}", file=sys.stderr)
        code = 2
    raise SystemExit(code)


def serve_workers(config: Config, serve: ServeOne) -> int:
    check_workers(config)
    context = multiprocessing.get_context("spawn")
    level = logging.getLogger().getEffectiveLevel()
    workers: list[BaseProcess] = []
    stopping = threading.Event()

    def on_stop(signum: int, _frame: Any) -> None:
        log.info("signal %d: stopping %d workers", signum, len(workers))
        stopping.set()

    def on_reload(_signum: int, _frame: Any) -> None:
        for worker in workers:
            if worker.pid is not None and worker.is_alive():
                os.kill(worker.pid, signal.SIGHUP)  # each worker reloads its policies

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, on_reload)

    # First, so a port the admin API cannot have stops everything before any worker starts.
    admin_server = None
    admin_store = None
    admin_handles = None
    if config.admin.listen:
        from gateway.admin import admin_access, start_session_admin
        from gateway.app import store_settings
        from gateway.session import open_store
        from gateway.session.handles import open_handle_store

        access = admin_access(config)  # its files checked before the store opens
        admin_store = open_store(config.store, store_settings(config))
        s = config.session
        admin_handles = open_handle_store(config.store, config.handles, s.store_timeout, s.max_sessions)
        try:
            admin_server = start_session_admin(config, admin_store, access, admin_handles)
        except BaseException:
            admin_store.close()
            admin_handles.close()
            raise

    for index in range(config.workers):
        arguments = (serve, config, level, index)
        process = context.Process(target=_worker_main, args=arguments, name=f"worker-{index}")
        process.start()
        workers.append(process)
    pids = ", ".join(str(w.pid) for w in workers)
    log.info("started %d workers on %s (pids %s)", len(workers), config.listen, pids)

    failed = False
    while not stopping.wait(0.2):
        dead = [w for w in workers if not w.is_alive()]
        if dead:
            for gone in dead:
                log.error("%s (pid %s) exited (%s); stopping the others", gone.name, gone.pid, gone.exitcode)
            failed = True
            break

    for worker in workers:
        if worker.is_alive():
            worker.terminate()  # SIGTERM: the worker finishes its in-flight checks
    for worker in workers:
        worker.join(config.shutdown_grace + 5.0)
        if worker.is_alive():
            log.error("%s did not stop in time; killing it", worker.name)
            worker.kill()
            worker.join(5.0)
            failed = True
        elif worker.exitcode != 0:
            failed = True
    if admin_server is not None:
        admin_server.stop(1.0).wait()
    if admin_store is not None:
        admin_store.close()
    if admin_handles is not None:
        admin_handles.close()
    log.info("all workers stopped")
    return 1 if failed else 0
