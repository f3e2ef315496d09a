"""A faster OTLP span encoder: protobuf wire bytes written directly.

The SDK's encoder builds a protobuf object for every span, attribute and value; at one
span per Check that cost more CPU than the Check itself. The Check span's attributes
repeat (`authz.decision=deny`, `http.request.method=POST`, …), so each encoded key/value
pair is kept in a small cache. The output parses to exactly what the SDK's encoder
builds (tests/test_telemetry_encoding.py holds them equal); anything it does not cover
(links, unusual attribute types) goes to the SDK's encoder instead.

Only public names here; the exporter that uses it (through the exporter's private
`_translate_data`) is in gateway.telemetry.fast_path.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan

_PACK_Q = struct.Struct("<Q").pack
_PACK_I = struct.Struct("<I").pack
_PACK_D = struct.Struct("<d").pack
_CACHE_LIMIT = 4096
# Span flags: SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK (0x100), plus 0x200 when the parent is remote.
_HAS_IS_REMOTE, _IS_REMOTE = 0x100, 0x200


_KINDS = tuple(bytes((value + 1,)) for value in range(5))
# Status with no message, by code (UNSET, OK, ERROR); span flags field, by value.
_STATUS_FIELDS = (b"\x7a\x00", b"\x7a\x02\x18\x01", b"\x7a\x02\x18\x02")
_FLAGS_FIELDS = {
    flags: b"\x85\x01" + struct.pack("<I", flags) for flags in (_HAS_IS_REMOTE, _HAS_IS_REMOTE | _IS_REMOTE)
}


class Unsupported(Exception):
    """A span this encoder does not cover; the batch goes to the SDK's encoder."""


def _varint(value: int) -> bytes:
    if value < 0:
        value &= 0xFFFFFFFFFFFFFFFF  # int64 as protobuf writes it: two's complement, 10 bytes
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(tag: bytes, payload: bytes) -> bytes:
    return tag + _varint(len(payload)) + payload


def _any_value(value: Any) -> bytes:
    kind = type(value)
    if kind is str:
        return _field(b"\x0a", value.encode())
    if kind is bool:
        return b"\x10\x01" if value else b"\x10\x00"
    if kind is int:
        return b"\x18" + _varint(value)
    if kind is float:
        return b"\x21" + _PACK_D(value)
    if kind is bytes:
        return _field(b"\x3a", value)
    if kind in (tuple, list):
        return _field(b"\x2a", b"".join(_field(b"\x0a", _any_value(item)) for item in value))
    raise Unsupported(f"attribute value of type {kind.__name__}")


class SpanEncoder:
    def __init__(self) -> None:
        # (field tag, key, value type, value) -> the whole encoded attribute field.
        self._fields: dict[tuple[bytes, str, type, Any], bytes] = {}
        self._names: dict[str, bytes] = {}

    def _attribute(self, tag: bytes, key: str, value: Any) -> bytes:
        kind = type(value)
        if kind is list:  # not hashable
            return _field(tag, _field(b"\x0a", key.encode()) + _field(b"\x12", _any_value(value)))
        cache_key = (tag, key, kind, value)
        found = self._fields.get(cache_key)
        if found is None:
            found = _field(tag, _field(b"\x0a", key.encode()) + _field(b"\x12", _any_value(value)))
            if len(self._fields) >= _CACHE_LIMIT:
                self._fields.clear()  # high-cardinality values (paths) must not grow it forever
            self._fields[cache_key] = found
        return found

    def _attributes(self, tag: bytes, attributes: Mapping[str, Any] | None) -> list[bytes]:
        if not attributes:
            return []
        attribute = self._attribute
        return [attribute(tag, key, value) for key, value in attributes.items()]

    def _name(self, name: str) -> bytes:
        found = self._names.get(name)
        if found is None:
            found = _field(b"\x2a", name.encode()) + b"\x30"
            if len(self._names) >= _CACHE_LIMIT:
                self._names.clear()
            self._names[name] = found
        return found

    def span(self, span: ReadableSpan) -> bytes:
        if span.links:
            raise Unsupported("links")
        context = span.get_span_context()
        if context is None:
            raise Unsupported("no span context")
        parts = [b"\x0a\x10", context.trace_id.to_bytes(16, "big"), b"\x12\x08"]
        parts.append(context.span_id.to_bytes(8, "big"))
        if context.trace_state:
            state = ",".join(f"{k}={v}" for k, v in context.trace_state.items())
            parts.append(_field(b"\x1a", state.encode()))
        flags = _HAS_IS_REMOTE
        parent = span.parent
        if parent is not None:
            parts += (b"\x22\x08", parent.span_id.to_bytes(8, "big"))
            if parent.is_remote:
                flags |= _IS_REMOTE
        # The name field, then the kind's tag; SpanKind.INTERNAL (0) is OTLP's 1.
        parts += (self._name(span.name), _KINDS[span.kind.value])
        if span.start_time is not None:
            parts += (b"\x39", _PACK_Q(span.start_time))
        if span.end_time is not None:
            parts += (b"\x41", _PACK_Q(span.end_time))
        parts += self._attributes(b"\x4a", span.attributes)
        if span.dropped_attributes:
            parts += (b"\x50", _varint(span.dropped_attributes))
        for event in span.events:
            event_parts = [b"\x09", _PACK_Q(event.timestamp), _field(b"\x12", event.name.encode())]
            event_parts += self._attributes(b"\x1a", event.attributes)
            if event.dropped_attributes:
                event_parts += (b"\x20", _varint(event.dropped_attributes))
            parts.append(_field(b"\x5a", b"".join(event_parts)))
        if span.dropped_events:
            parts += (b"\x60", _varint(span.dropped_events))
        if span.dropped_links:
            parts += (b"\x70", _varint(span.dropped_links))
        status = span.status
        if status.description:
            status_parts = _field(b"\x12", status.description.encode())
            if status.status_code.value:
                status_parts += b"\x18" + _varint(status.status_code.value)
            parts.append(_field(b"\x7a", status_parts))
        else:
            parts.append(_STATUS_FIELDS[status.status_code.value])
        parts.append(_FLAGS_FIELDS[flags])
        return b"".join(parts)

    def _scope(self, scope: Any) -> bytes:
        if scope is None:
            return b"\x0a\x00"  # the SDK sends an empty scope then
        parts = [_field(b"\x0a", scope.name.encode())]
        if scope.version:
            parts.append(_field(b"\x12", scope.version.encode()))
        parts += self._attributes(b"\x1a", scope.attributes)
        return _field(b"\x0a", b"".join(parts))

    def request(self, spans: Sequence[ReadableSpan]) -> bytes:
        """The serialized ExportTraceServiceRequest for these spans."""
        # Resource → scope → spans, in first-seen order, as the SDK groups them.
        groups: dict[int, tuple[Any, dict[Any, list[bytes]]]] = {}
        for span in spans:
            resource = span.resource
            _, scopes = groups.setdefault(id(resource), (resource, {}))
            scope = span.instrumentation_scope or None
            scopes.setdefault(scope, []).append(self.span(span))
        out = []
        for resource, scopes in groups.values():
            resource_bytes = b"".join(self._attributes(b"\x0a", resource.attributes))
            parts = [_field(b"\x0a", resource_bytes)]
            for scope, encoded in scopes.items():
                scope_parts = [self._scope(scope)]
                scope_parts += [_field(b"\x12", one) for one in encoded]
                if scope is not None and scope.schema_url:
                    scope_parts.append(_field(b"\x1a", scope.schema_url.encode()))
                parts.append(_field(b"\x12", b"".join(scope_parts)))
            if resource.schema_url:
                parts.append(_field(b"\x1a", resource.schema_url.encode()))
            out.append(_field(b"\x0a", b"".join(parts)))
        return b"".join(out)


def encode_request(encoder: SpanEncoder, spans: Sequence[ReadableSpan]) -> ExportTraceServiceRequest:
    """The request message, from the fast encoder when it covers the batch, else from the SDK's."""
    try:
        request: ExportTraceServiceRequest = ExportTraceServiceRequest.FromString(encoder.request(spans))
    except Unsupported:
        request = encode_spans(spans)
    return request
