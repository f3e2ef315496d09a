"""The per-check local instruments: thread tables merged into ordinary cumulative metrics."""

from __future__ import annotations

import threading

from opentelemetry.sdk.metrics.export import MetricsData
from opentelemetry.sdk.resources import Resource

from gateway.telemetry import local_metrics
from gateway.telemetry.local_metrics import LocalCounter, LocalHistogram, with_local_metrics


def test_threads_merge_into_one_sum_and_histogram() -> None:
    counter = LocalCounter("t_checks", "1", "test")
    histogram = LocalHistogram("t_duration", "s", "test", (0.001, 0.01))
    local_metrics.enable(Resource.create({"service.name": "t"}))
    try:
        def work(n: int) -> None:
            for i in range(1000):
                counter.add(1, {"decision": "allow" if i % 2 else "deny"})
                histogram.record(0.0005 if i % 10 else 0.5, {"op": "load"})

        threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        merged = with_local_metrics(MetricsData([]))
    finally:
        local_metrics.disable()
        local_metrics._instruments.remove(counter)
        local_metrics._instruments.remove(histogram)
    assert merged is not None
    scope = merged.resource_metrics[0].scope_metrics[-1]
    assert scope.scope.name == "authz-gateway"
    found = {m.name: m for m in scope.metrics}
    sums = {p.attributes["decision"]: p.value for p in found["t_checks"].data.data_points}
    assert sums == {"allow": 4000, "deny": 4000}
    assert found["t_checks"].data.is_monotonic
    (point,) = found["t_duration"].data.data_points
    assert point.count == 8000
    assert list(point.bucket_counts) == [7200, 0, 800]
    assert point.min == 0.0005 and point.max == 0.5
    assert abs(point.sum - (7200 * 0.0005 + 800 * 0.5)) < 1e-6
    assert tuple(point.explicit_bounds) == (0.001, 0.01)
