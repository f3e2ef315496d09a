"""Per-check instruments aggregated in plain Python, handed to the OTel readers at collection.

The SDK's Counter.add / Histogram.record validate and hash the attributes and take locks
on every call: about as much CPU as a whole check, three or four times per check. These
instruments keep one table per thread (no lock on the hot path: each thread writes only
its own), and turn the sum of the tables into the SDK's own Metric data only when a
reader collects (an OTLP export every OTEL_METRIC_EXPORT_INTERVAL, or a Prometheus
scrape). The readers see ordinary cumulative Sum and Histogram metrics: the names,
units and exported shape are what an SDK instrument of the same name would give.

Handing the data to the readers takes their private `_receive_metrics` hook
(gateway.telemetry.fast_path.metric_readers). With `telemetry.fast_path: false` the readers
are the SDK's own, and each local instrument records through an SDK instrument of the same
name, unit, description and buckets instead (record_through).

Until telemetry is set up (or with OTEL_SDK_DISABLED) recording returns at once.
"""

from __future__ import annotations

import threading
import time
from bisect import bisect_left
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from opentelemetry.metrics import Meter
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricsData,
    NumberDataPoint,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

SCOPE = InstrumentationScope("authz-gateway")


class _State:
    enabled = False
    started_ns = 0
    resource: Resource | None = None
    meter: Meter | None = None  # set by record_through: the plain path


_state = _State()
_instruments: list[_LocalInstrument] = []


class _LocalInstrument:
    def __init__(self, name: str, unit: str, description: str) -> None:
        self.name = name
        self.unit = unit
        self.description = description
        self._local = threading.local()
        self._tables: list[dict[Any, Any]] = []
        self._tables_lock = threading.Lock()
        # The plain path (fast_path off): the SDK instrument every recording goes to instead.
        self._sdk: Any = self.sdk_instrument(_state.meter) if _state.meter is not None else None
        _instruments.append(self)

    def sdk_instrument(self, meter: Meter) -> Any:
        raise NotImplementedError

    def _table(self) -> dict[Any, Any]:
        try:
            table: dict[Any, Any] = self._local.table
        except AttributeError:
            table = {}
            self._local.table = table
            with self._tables_lock:
                self._tables.append(table)
        return table

    def _snapshots(self) -> list[dict[Any, Any]]:
        with self._tables_lock:
            tables = list(self._tables)
        # dict(table) is one C call under the GIL: a consistent copy while its thread writes on.
        return [dict(table) for table in tables]

    def metric(self, now_ns: int) -> Metric | None:
        raise NotImplementedError


class LocalCounter(_LocalInstrument):
    """A monotonic counter: add(amount, attributes)."""

    def add(self, amount: int, attributes: Mapping[str, Any]) -> None:
        if not _state.enabled:
            if self._sdk is not None:
                self._sdk.add(amount, attributes)
            return
        table = self._table()
        key = tuple(attributes.items())
        table[key] = table.get(key, 0) + amount

    def metric(self, now_ns: int) -> Metric | None:
        totals: dict[Any, int] = {}
        for table in self._snapshots():
            for key, value in table.items():
                totals[key] = totals.get(key, 0) + value
        if not totals:
            return None
        started = _state.started_ns
        points = [NumberDataPoint(dict(key), started, now_ns, value) for key, value in totals.items()]
        return Metric(
            self.name, self.description, self.unit,
            Sum(points, AggregationTemporality.CUMULATIVE, is_monotonic=True),
        )

    def sdk_instrument(self, meter: Meter) -> Any:
        return meter.create_counter(self.name, unit=self.unit, description=self.description)


class LocalHistogram(_LocalInstrument):
    """An explicit-bucket histogram: record(value, attributes)."""

    def __init__(self, name: str, unit: str, description: str, boundaries: Sequence[float]) -> None:
        super().__init__(name, unit, description)
        self.boundaries = tuple(boundaries)

    def record(self, value: float, attributes: Mapping[str, Any]) -> None:
        if not _state.enabled:
            if self._sdk is not None:
                self._sdk.record(value, attributes)
            return
        table = self._table()
        key = tuple(attributes.items())
        cell = table.get(key)
        if cell is None:
            # [count, sum, min, max, bucket counts...]: one list, updated in place.
            cell = table[key] = [0, 0.0, value, value] + [0] * (len(self.boundaries) + 1)
        cell[0] += 1
        cell[1] += value
        if value < cell[2]:
            cell[2] = value
        if value > cell[3]:
            cell[3] = value
        cell[4 + bisect_left(self.boundaries, value)] += 1

    def metric(self, now_ns: int) -> Metric | None:
        merged: dict[Any, list[Any]] = {}
        for table in self._snapshots():
            for key, cell in table.items():
                cell = list(cell)
                into = merged.get(key)
                if into is None:
                    merged[key] = cell
                    continue
                into[0] += cell[0]
                into[1] += cell[1]
                into[2] = min(into[2], cell[2])
                into[3] = max(into[3], cell[3])
                for index in range(4, len(into)):
                    into[index] += cell[index]
        if not merged:
            return None
        points = [
            HistogramDataPoint(
                attributes=dict(key),
                start_time_unix_nano=_state.started_ns,
                time_unix_nano=now_ns,
                count=cell[0],
                sum=cell[1],
                bucket_counts=cell[4:],
                explicit_bounds=self.boundaries,
                min=cell[2],
                max=cell[3],
            )
            for key, cell in merged.items()
        ]
        return Metric(
            self.name, self.description, self.unit, Histogram(points, AggregationTemporality.CUMULATIVE)
        )

    def sdk_instrument(self, meter: Meter) -> Any:
        return meter.create_histogram(
            self.name,
            unit=self.unit,
            description=self.description,
            explicit_bucket_boundaries_advisory=self.boundaries,
        )


def enable(resource: Resource) -> None:
    _state.resource = resource
    _state.started_ns = time.time_ns()
    _state.enabled = True


def disable() -> None:
    _state.enabled = False


def record_through(meter: Meter | None) -> None:
    """The plain path: every local instrument records through an SDK instrument from `meter`.

    The readers then see what any SDK instrument gives, with no hook into them. None stops it.
    """
    _state.enabled = False
    _state.meter = meter
    for instrument in _instruments:
        instrument._sdk = instrument.sdk_instrument(meter) if meter is not None else None


def with_local_metrics(metrics_data: MetricsData | None) -> MetricsData | None:
    """The SDK's collection plus the local instruments, under the gateway's scope."""
    if not _state.enabled or _state.resource is None:
        return metrics_data
    now = time.time_ns()
    local = [metric for metric in (i.metric(now) for i in _instruments) if metric is not None]
    if not local:
        return metrics_data
    resource_metrics = list(metrics_data.resource_metrics) if metrics_data is not None else []
    if not resource_metrics:
        resource_metrics = [ResourceMetrics(_state.resource, [], "")]
    first = resource_metrics[0]
    scopes = list(first.scope_metrics)
    for index, scope in enumerate(scopes):
        if scope.scope.name == SCOPE.name:
            scopes[index] = replace(scope, metrics=[*scope.metrics, *local])
            break
    else:
        scopes.append(ScopeMetrics(SCOPE, local, ""))
    resource_metrics[0] = replace(first, scope_metrics=scopes)
    return MetricsData(resource_metrics)
