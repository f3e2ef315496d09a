"""Metrics to OTLP: the SDK's MetricsData as gateway.otlp_api's ExportMetricsServiceRequest.

Sum (temporality, monotonicity), Gauge, Histogram and ExponentialHistogram points, with their
exemplars, as the SDK's OTLP encoder fills them (tests/test_telemetry_encoding.py compares
the two). A metric export happens once per interval, not per Check: plain message objects
are fast enough here. Attribute values are encoded as for spans (otlp_encoding), so both
signals carry every value type the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry.sdk.metrics.export import (
    ExponentialHistogram,
    Gauge,
    Histogram,
    Metric,
    MetricsData,
    Sum,
)
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from gateway.otlp_api.opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from gateway.otlp_api.opentelemetry.proto.common.v1 import common_pb2
from gateway.otlp_api.opentelemetry.proto.metrics.v1 import metrics_pb2
from gateway.telemetry.otlp_encoding import SpanEncoder

log = logging.getLogger(__name__)


class MetricEncoder:
    def __init__(self) -> None:
        self._attributes = SpanEncoder()  # its attribute encoding and cache

    def _key_values(self, attributes: Mapping[str, Any] | None) -> Sequence[common_pb2.KeyValue]:
        if not attributes:
            return ()
        # The KeyValue fields, read back as KeyValueList.values (its field 1).
        encoded = b"".join(self._attributes.attributes(b"\x0a", attributes))
        values: Sequence[common_pb2.KeyValue] = common_pb2.KeyValueList.FromString(encoded).values
        return values

    def _scope(self, scope: InstrumentationScope) -> common_pb2.InstrumentationScope:
        return common_pb2.InstrumentationScope(
            name=scope.name, version=scope.version or "", attributes=self._key_values(scope.attributes)
        )

    def _exemplars(self, exemplars: Sequence[Any]) -> list[metrics_pb2.Exemplar]:
        out = []
        for exemplar in exemplars:
            message = metrics_pb2.Exemplar(
                time_unix_nano=exemplar.time_unix_nano,
                filtered_attributes=self._key_values(exemplar.filtered_attributes),
            )
            if exemplar.span_id is not None and exemplar.trace_id is not None:
                message.span_id = exemplar.span_id.to_bytes(8, "big")
                message.trace_id = exemplar.trace_id.to_bytes(16, "big")
            if isinstance(exemplar.value, float):
                message.as_double = exemplar.value
            else:
                message.as_int = exemplar.value
            out.append(message)
        return out

    def _number_point(self, point: Any, start: bool) -> metrics_pb2.NumberDataPoint:
        message = metrics_pb2.NumberDataPoint(
            attributes=self._key_values(point.attributes),
            time_unix_nano=point.time_unix_nano,
            exemplars=self._exemplars(point.exemplars),
        )
        if start:
            message.start_time_unix_nano = point.start_time_unix_nano
        if isinstance(point.value, int):
            message.as_int = point.value
        else:
            message.as_double = point.value
        return message

    def metric(self, metric: Metric) -> metrics_pb2.Metric | None:
        message = metrics_pb2.Metric(
            name=metric.name, description=metric.description or "", unit=metric.unit or ""
        )
        data = metric.data
        if isinstance(data, Sum):
            message.sum.aggregation_temporality = data.aggregation_temporality.value
            message.sum.is_monotonic = data.is_monotonic
            message.sum.data_points.extend(self._number_point(p, start=True) for p in data.data_points)
        elif isinstance(data, Gauge):
            message.gauge.data_points.extend(self._number_point(p, start=False) for p in data.data_points)
        elif isinstance(data, Histogram):
            message.histogram.aggregation_temporality = data.aggregation_temporality.value
            for point in data.data_points:
                message.histogram.data_points.append(
                    metrics_pb2.HistogramDataPoint(
                        attributes=self._key_values(point.attributes),
                        start_time_unix_nano=point.start_time_unix_nano,
                        time_unix_nano=point.time_unix_nano,
                        count=point.count,
                        sum=point.sum,
                        bucket_counts=point.bucket_counts,
                        explicit_bounds=point.explicit_bounds,
                        exemplars=self._exemplars(point.exemplars),
                        min=point.min,
                        max=point.max,
                    )
                )
        elif isinstance(data, ExponentialHistogram):
            message.exponential_histogram.aggregation_temporality = data.aggregation_temporality.value
            buckets = metrics_pb2.ExponentialHistogramDataPoint.Buckets
            for exp_point in data.data_points:
                exponential = metrics_pb2.ExponentialHistogramDataPoint(
                    attributes=self._key_values(exp_point.attributes),
                    start_time_unix_nano=exp_point.start_time_unix_nano,
                    time_unix_nano=exp_point.time_unix_nano,
                    count=exp_point.count,
                    sum=exp_point.sum,
                    scale=exp_point.scale,
                    zero_count=exp_point.zero_count,
                    flags=exp_point.flags,
                    exemplars=self._exemplars(exp_point.exemplars),
                    min=exp_point.min,
                    max=exp_point.max,
                )
                for name in ("positive", "negative"):  # absent when it has no buckets
                    side = getattr(exp_point, name)
                    if side.bucket_counts:
                        getattr(exponential, name).CopyFrom(
                            buckets(offset=side.offset, bucket_counts=side.bucket_counts)
                        )
                message.exponential_histogram.data_points.append(exponential)
        else:
            log.warning("telemetry: metric %r of type %s not exported", metric.name, type(data).__name__)
            return None
        return message

    def request(self, data: MetricsData) -> bytes:
        """The serialized ExportMetricsServiceRequest for one collection."""
        request = metrics_service_pb2.ExportMetricsServiceRequest()
        for resource_metrics in data.resource_metrics:
            resource = resource_metrics.resource
            out = request.resource_metrics.add(schema_url=resource.schema_url or "")
            out.resource.attributes.extend(self._key_values(resource.attributes))
            for scope_metrics in resource_metrics.scope_metrics:
                scope_out = out.scope_metrics.add(
                    scope=self._scope(scope_metrics.scope), schema_url=scope_metrics.scope.schema_url or ""
                )
                for metric in scope_metrics.metrics:
                    encoded = self.metric(metric)
                    if encoded is not None:
                        scope_out.metrics.append(encoded)
        serialized: bytes = request.SerializeToString()
        return serialized
