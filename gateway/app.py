"""Assembling a running gateway from a Config, and taking it down cleanly."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import grpc
from grpc_health.v1 import health

from gateway.config import Config
from gateway.identity.keys import RemoteKeys
from gateway.identity.verifier import TokenVerifier
from gateway.pipeline import UPSTREAM_HEADERS, Authorizer, PolicyHolder
from gateway.policy.loader import PolicyLoadError, load_policy_dir, resolve_policy_dir
from gateway.response import ResponseBuilder
from gateway.server import CheckService, DecisionListener, build_server, set_serving
from gateway.session import open_store
from gateway.session.store import SessionStore, StoreSettings
from gateway.telemetry import metrics
from gateway.telemetry.admin import AdminServer, start_admin
from gateway.telemetry.decision_log import DecisionLog
from gateway.telemetry.observer import TelemetryObserver
from gateway.telemetry.setup import Telemetry, setup_telemetry
from gateway.telemetry.store_metrics import instrument_store, store_kind
from gateway.telemetry.tracing import CheckSpans, SubjectHasher

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
        listeners: tuple[DecisionListener, ...] = (),
        reuse_port: bool = False,
    ) -> None:
        self.config = config
        self.policy_dir: Path = resolve_policy_dir(config.policies)
        self.telemetry = telemetry if telemetry is not None else Telemetry()
        self.policies = PolicyHolder(load_policy_dir(self.policy_dir, config.engine))
        metrics.policy_reloads.add(1, {"result": "success"})
        observer = TelemetryObserver()
        self.verifier = TokenVerifier(config.auth, observer=observer)
        if store is None:
            store = open_store(config.store, store_settings(config), observer)
        self.store = store
        # Store timings cost a few µs per check: only measure when something collects metrics.
        collecting = self.telemetry.meter_provider is not None
        measured = instrument_store(self.store, config.store) if collecting else self.store
        self.authorizer = Authorizer(config.auth, config.session, self.verifier, measured, self.policies)
        self._unwatch_sessions = metrics.watch_live_sessions(store_kind(config.store), self.store.live_count)
        self.admin: AdminServer | None = None
        if config.telemetry.decision_log:
            listeners = (*listeners, DecisionLog())
        hasher = SubjectHasher(config.telemetry.record_subject, config.telemetry.subject_hash_key)
        self.service = CheckService(
            self.authorizer,
            ResponseBuilder(config.auth, UPSTREAM_HEADERS, config.responses),
            CheckSpans(hasher),
            config.max_request_bytes,
            listeners,
        )
        self.health = health.HealthServicer()
        set_serving(self.health, False)
        self.server: grpc.Server = build_server(
            self.service, self.health, max_workers=16, reuse_port=reuse_port
        )
        self.port = 0
        self._reload_lock = threading.Lock()
        self._stopped = threading.Event()

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
        if not self._stopped.is_set():
            set_serving(self.health, True)

    def start(self) -> int:
        self.port = self.server.add_insecure_port(self.config.listen)
        if self.port == 0:
            raise OSError(f"cannot listen on {self.config.listen}")
        self.server.start()
        if self.config.telemetry.metrics_listen:
            self.admin = start_admin(self.config.telemetry.metrics_listen, self)
        if self.keys_loaded():
            set_serving(self.health, True)
        else:
            threading.Thread(target=self._load_remote_keys, name="jwks-initial", daemon=True).start()
        return self.port

    def reload_policies(self) -> bool:
        """Load the directory as one unit; on any problem keep serving the previous set."""
        with self._reload_lock:
            try:
                policies = load_policy_dir(self.policy_dir, self.config.engine)
            except PolicyLoadError as exc:
                metrics.policy_reloads.add(1, {"result": "failure"})
                for problem in exc.problems:
                    log.error("policy reload rejected: %s", problem)
                return False
            self.policies.swap(policies)
            metrics.policy_reloads.add(1, {"result": "success"})
            log.info("policies reloaded from %s (%d policies)", self.policy_dir, len(policies.policies))
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
        self.store.close()
        self.telemetry.shutdown()


def build_gateway(config: Config, **kwargs: object) -> Gateway:
    telemetry = setup_telemetry(
        metrics_http=bool(config.telemetry.metrics_listen), fast_path=config.telemetry.fast_path
    )
    return Gateway(config, telemetry=telemetry, **kwargs)  # type: ignore[arg-type]
