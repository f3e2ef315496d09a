"""The gateway's OTel instruments, created once at import.

The rare ones come from the global meter provider: before telemetry is set up (or when
it is disabled) they are the API's no-ops. The three recorded on every check are local
instruments (gateway.telemetry.local_metrics), aggregated without the SDK's per-call
cost and handed to the same readers when they collect. Prometheus
sees them as `authz_checks_total`, `authz_check_duration_seconds_*`,
`authz_policy_reloads_total`, `authz_store_operation_duration_seconds_*`,
`authz_store_errors_total`, `authz_jwks_refreshes_total` and `authz_sessions_live`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

from gateway.telemetry.local_metrics import LocalCounter, LocalHistogram

_meter = metrics.get_meter("authz-gateway")

# Seconds. The SDK's default buckets (0, 5, 10, … 10000) suit milliseconds: every check
# would land in the first one. A check takes ~0.1–1 ms; a store round trip ~0.1–250 ms.
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)

checks = LocalCounter("authz_checks", "1", "Checks answered, by decision, reason and policy")
check_duration = LocalHistogram("authz_check_duration", "s", "Time to answer one Check", LATENCY_BUCKETS)
policy_reloads = _meter.create_counter(
    "authz_policy_reloads", unit="1", description="Policy set (re)loads, by result"
)
store_operation_duration = LocalHistogram(
    "authz_store_operation_duration", "s", "Session store operations, by store and operation", LATENCY_BUCKETS
)
store_errors = _meter.create_counter(
    "authz_store_errors", unit="1", description="Session store operations that failed, by store and operation"
)
jwks_refreshes = _meter.create_counter(
    "authz_jwks_refreshes", unit="1", description="JWKS fetches, by issuer and result (success, failure)"
)

# The live-session count is read only when metrics are collected (a scrape or an OTLP
# export), never per check. Sources are the stores that can tell cheaply.
_live_sources: list[tuple[str, Callable[[], int | None]]] = []
_live_lock = threading.Lock()


def _observe_live_sessions(_options: CallbackOptions) -> Iterable[Observation]:
    with _live_lock:
        sources = list(_live_sources)
    observations = []
    for store, count in sources:
        try:
            value = count()
        except Exception:  # a store that cannot answer now reports nothing, not a crash
            continue
        if value is not None:
            observations.append(Observation(value, {"store": store}))
    return observations


sessions_live = _meter.create_observable_gauge(
    "authz_sessions_live",
    callbacks=[_observe_live_sessions],
    unit="{session}",
    description="Session records the store holds (tombstones included), where it can tell cheaply",
)


def watch_live_sessions(store: str, count: Callable[[], int | None]) -> Callable[[], None]:
    """Report `count()` as authz_sessions_live{store}; returns a function that stops it."""
    entry = (store, count)
    with _live_lock:
        _live_sources.append(entry)

    def unwatch() -> None:
        with _live_lock:
            if entry in _live_sources:
                _live_sources.remove(entry)

    return unwatch


# Whether the session store answers (1) or not (0), per store kind, from the store health
# tracker (gateway/session/health.py).
_store_states: dict[str, Callable[[], bool]] = {}


def _observe_store_up(_options: CallbackOptions) -> Iterable[Observation]:
    return [Observation(1 if up() else 0, {"store": store}) for store, up in list(_store_states.items())]


store_up = _meter.create_observable_gauge(
    "authz_store_up",
    callbacks=[_observe_store_up],
    unit="1",
    description="Whether the session store answers (1) or not (0), by store",
)


def watch_store_up(store: str, up: Callable[[], bool]) -> Callable[[], None]:
    """Report `up()` as authz_store_up{store}; returns a function that stops it."""
    _store_states[store] = up

    def unwatch() -> None:
        if _store_states.get(store) is up:
            del _store_states[store]

    return unwatch
