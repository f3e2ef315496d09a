"""Assembling a running gateway from a Config, and taking it down cleanly."""

from __future__ import annotations

import logging
import socket
import threading
from pathlib import Path

import grpc
from grpc_health.v1 import health

from gateway.config import Config, parse_hostport
from gateway.extproc import ProcessService
from gateway.identity.keys import RemoteKeys
from gateway.identity.verifier import TokenVerifier
from gateway.pipeline import UPSTREAM_HEADERS, Authorizer, PolicyHolder
from gateway.policy.loader import PolicyLoadError, load_policy_dir, resolve_policy_dir
from gateway.policy.model import PolicySet
from gateway.response import ResponseBuilder
from gateway.server import CheckService, DecisionListener, build_server, set_serving
from gateway.session import display_url, open_store
from gateway.session.handles import open_handle_store
from gateway.session.health import HealthTrackedStore, StoreHealth
from gateway.session.replay import replay_cache_for
from gateway.session.store import SessionStore, StoreSettings
from gateway.telemetry import metrics
from gateway.telemetry.admin import AdminServer, start_admin
from gateway.telemetry.decision_log import DecisionLog
from gateway.telemetry.observer import TelemetryObserver
from gateway.telemetry.setup import Telemetry, setup_telemetry
from gateway.telemetry.store_metrics import instrument_store, store_kind
from gateway.telemetry.tracing import PROCESS_SPAN_NAME, CheckSpans, SubjectHasher

log = logging.getLogger(__name__)


def store_settings(config: Config) -> StoreSettings:
    s = config.session
    return StoreSettings(
        ttl=s.ttl,
        idle_timeout=s.idle_timeout,
        max_sessions=s.max_sessions,
        key_prefix=s.key_prefix,
        timeout=s.store_timeout,
    )


class Gateway:
    """One gateway process: the Check server, its policies, keys, store and telemetry."""

    def __init__(
        self,
        config: Config,
        *,
        telemetry: Telemetry | None = None,
        store: SessionStore | None = None,
        handle_store: SessionStore | None = None,
        listeners: tuple[DecisionListener, ...] = (),
        reuse_port: bool = False,
    ) -> None:
        self.config = config
        self.policy_dir: Path = resolve_policy_dir(config.policies)
        self.telemetry = telemetry if telemetry is not None else Telemetry()
        self.policies = PolicyHolder(self._load_policies())
        _log_policies(self.policies.current, "loaded")
        metrics.policy_reloads.add(1, {"result": "success"})
        observer = TelemetryObserver()
        self.verifier = TokenVerifier(config.auth, observer=observer)
        if store is None:
            store = open_store(config.store, store_settings(config), observer)
        self.store = store
        self.store_health = StoreHealth(store, self._store_changed)
        tracked = HealthTrackedStore(store, self.store_health)
        # Store timings cost a few µs per check: only measure when something collects metrics.
        collecting = self.telemetry.meter_provider is not None
        measured = instrument_store(tracked, config.store) if collecting else tracked
        # Handles (MCP 2026-07-28) live in the same backend, in a key space of their own.
        if handle_store is None:
            handle_store = open_handle_store(
                config.store, config.handles, config.session.store_timeout,
                config.session.max_sessions, observer,
            )
        self.handle_store = handle_store
        self.authorizer = Authorizer(
            config.auth, config.session, self.verifier, measured, self.policies,
            self.handle_store, config.handles, replay_cache_for(store),
        )
        kind = store_kind(config.store)
        self._unwatch_sessions = metrics.watch_live_sessions(kind, self.store.live_count)
        self._unwatch_store_up = metrics.watch_store_up(kind, lambda: self.store_health.up)
        self.admin: AdminServer | None = None
        if config.telemetry.decision_log:
            listeners = (*listeners, DecisionLog())
        hasher = SubjectHasher(config.telemetry.record_subject, config.telemetry.subject_hash_key)
        responses = ResponseBuilder(config.auth, UPSTREAM_HEADERS, config.responses)
        self.service = CheckService(
            self.authorizer, responses, CheckSpans(hasher), config.max_request_bytes, listeners
        )
        self.processor = ProcessService(
            self.authorizer.response_path,
            responses,
            CheckSpans(hasher, name=PROCESS_SPAN_NAME),
            config.max_request_bytes,
            config.responses.session_not_found.body,
            config.session.max_id_length,
            config.max_process_streams,
        )
        self.health = health.HealthServicer()
        set_serving(self.health, False)
        self.server: grpc.Server = build_server(
            self.service, self.health, max_workers=16, reuse_port=reuse_port, processor=self.processor
        )
        self.port = 0
        self._reload_lock = threading.Lock()
        self._stopped = threading.Event()
        self._started = False
        self._reuse_port = reuse_port

    def _store_changed(self, up: bool, why: str) -> None:
        where = display_url(self.config.store)
        if up:
            log.info("session store %s answers: serving", where)
        else:
            # The reason names the failing operation and the error type, never the URL's password.
            log.error("session store %s does not answer (%s): NOT_SERVING until it does", where, why)
        self._update_serving()

    def _update_serving(self) -> None:
        """SERVING only while started, with every issuer's keys and a store that answers."""
        serving = self._started and not self._stopped.is_set() and self.keys_loaded() and self.store_health.up
        set_serving(self.health, serving)

    def _load_policies(self) -> PolicySet:
        allow = self.config.allow_no_enforcing_policy
        policies = load_policy_dir(self.policy_dir, self.config.engine, allow_unprotected=allow)
        if not any(not policy.audit for policy in policies.policies):
            log.warning("no enforcing policy in %s: allowed by allow_no_enforcing_policy", self.policy_dir)
        return policies

    def keys_loaded(self) -> bool:
        return all(not isinstance(k, RemoteKeys) or k.loaded for k in self.verifier.key_sources)

    def _load_remote_keys(self) -> None:
        """Fetch remote JWKS until every issuer has keys, then report SERVING."""
        pending = [k for k in self.verifier.key_sources if isinstance(k, RemoteKeys)]
        while not self._stopped.is_set():
            pending = [k for k in pending if not k.fetch_now()]
            if not pending:
                break
            self._stopped.wait(1.0)
        self._update_serving()

    def start(self) -> int:
        if not self._reuse_port:
            _refuse_a_taken_port(self.config.listen)
        try:
            self.port = self.server.add_insecure_port(self.config.listen)
        except RuntimeError:  # grpcio's "Failed to bind": in use, or not an address of this host
            self.port = 0
        if self.port == 0:
            raise OSError(f"cannot listen on {self.config.listen}: the address is in use or not available")
        self.server.start()
        if self.config.telemetry.metrics_listen:
            self.admin = start_admin(self.config.telemetry.metrics_listen, self)
        self._started = True
        self.store_health.start()  # reports the store's state, and SERVING when all is ready
        self._update_serving()
        if not self.keys_loaded():
            threading.Thread(target=self._load_remote_keys, name="jwks-initial", daemon=True).start()
        return self.port

    def reload_policies(self) -> bool:
        """Load the directory as one unit; on any problem keep serving the previous set."""
        with self._reload_lock:
            try:
                policies = self._load_policies()
            except PolicyLoadError as exc:
                metrics.policy_reloads.add(1, {"result": "failure"})
                for problem in exc.problems:
                    log.error("policy reload rejected: %s", problem)
                return False
            self.policies.swap(policies)
            metrics.policy_reloads.add(1, {"result": "success"})
            log.info("policies reloaded from %s (%d policies)", self.policy_dir, len(policies.policies))
            _log_policies(policies, "reloaded")
            return True

    def stop(self, grace: float | None = None) -> None:
        """Finish in-flight checks, then flush telemetry and close the store."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        set_serving(self.health, False)
        self.server.stop(self.config.shutdown_grace if grace is None else grace).wait()
        if self.admin is not None:
            self.admin.stop()
        self._unwatch_sessions()
        self._unwatch_store_up()
        self.store_health.stop()
        self.store.close()
        self.handle_store.close()
        self.telemetry.shutdown()


def _log_policies(policies: PolicySet, what: str) -> None:
    for policy in policies.policies:
        log.info("policy %s %s (%s) from %s", policy.name, what, policy.mode, policy.location.file)


def _refuse_a_taken_port(listen: str) -> None:
    """One clear error for a port in use, before grpcio tries (and logs a C-core error line)."""
    host, port = parse_hostport(listen)
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return  # grpcio says what is wrong with the name
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as grpcio binds
        try:
            probe.bind(address)
        except OSError as exc:
            raise OSError(f"cannot listen on {listen}: {exc.strerror}") from None


def build_gateway(config: Config, **kwargs: object) -> Gateway:
    telemetry = setup_telemetry(
        metrics_http=bool(config.telemetry.metrics_listen), fast_path=config.telemetry.fast_path
    )
    return Gateway(config, telemetry=telemetry, **kwargs)  # type: ignore[arg-type]
