"""Spans to OTLP: the serialized ExportTraceServiceRequest, protobuf wire bytes written directly.

Building a protobuf object for every span, attribute and value (as the SDK's encoder does)
cost more CPU than the Check itself, at one span per Check. The Check span's attributes
repeat (`authz.decision=deny`, `http.request.method=POST`, …), so each encoded key/value pair
of a string, bool or int value is kept in a small cache (not floats: -0.0 == 0.0, yet they
encode apart). The bytes parse to what the SDK's OTLP encoder builds for the same spans,
field for field (tests/test_telemetry_encoding.py holds them equal), and to gateway.otlp_api's
ExportTraceServiceRequest.

An attribute value OTLP cannot carry (an object, an integer beyond 64 bits) is left out of
its span, with a warning naming the key, as the SDK's encoder leaves it out.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext

log = logging.getLogger(__name__)

_PACK_Q = struct.Struct("<Q").pack
_PACK_D = struct.Struct("<d").pack
_CACHE_LIMIT = 4096
# Span flags: SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK (0x100), plus 0x200 when the parent is remote.
_HAS_IS_REMOTE, _IS_REMOTE = 0x100, 0x200
_INT64_MIN, _INT64_END = -(2**63), 2**63

_KINDS = tuple(bytes((value + 1,)) for value in range(5))  # SpanKind.INTERNAL (0) is OTLP's 1
# Status with no message, by code (UNSET, OK, ERROR).
_STATUS_FIELDS = (b"\x7a\x00", b"\x7a\x02\x18\x01", b"\x7a\x02\x18\x02")
# Span.flags (field 16, fixed32) and Link.flags (field 6, fixed32), by whether the context is remote.
_SPAN_FLAGS = {remote: b"\x85\x01" + struct.pack("<I", _HAS_IS_REMOTE | (_IS_REMOTE if remote else 0))
               for remote in (False, True)}
_LINK_FLAGS = {remote: b"\x35" + struct.pack("<I", _HAS_IS_REMOTE | (_IS_REMOTE if remote else 0))
               for remote in (False, True)}
_CACHED_SCALARS = frozenset({str, bool, int})


class UnencodableValue(Exception):
    """An attribute value OTLP has no AnyValue for."""


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


def _int_value(value: int) -> bytes:
    if not _INT64_MIN <= value < _INT64_END:
        raise UnencodableValue("an integer beyond 64 bits")
    return b"\x18" + _varint(value)


def _any_value(value: Any) -> bytes:
    """The fields of an AnyValue holding value (string 1, bool 2, int 3, double 4, array 5,
    kvlist 6, bytes 7); the SDK's choices for subclasses, None (an empty AnyValue) and maps."""
    kind = type(value)
    if kind is str:
        return _field(b"\x0a", value.encode())
    if kind is bool:
        return b"\x10\x01" if value else b"\x10\x00"
    if kind is int:
        return _int_value(value)
    if kind is float:
        return b"\x21" + _PACK_D(value)
    if kind is tuple or kind is list:
        return _field(b"\x2a", b"".join(_field(b"\x0a", _any_value(item)) for item in value))
    # Anything else in the order the SDK's encoder tests it (a bool is an int, a str a Sequence).
    if value is None:
        return b""
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, str):
        return _field(b"\x0a", str(value).encode())
    if isinstance(value, int):
        return _int_value(int(value))
    if isinstance(value, float):
        return b"\x21" + _PACK_D(float(value))
    if isinstance(value, bytes):
        return _field(b"\x3a", bytes(value))
    if isinstance(value, Sequence):
        return _field(b"\x2a", b"".join(_field(b"\x0a", _any_value(item)) for item in value))
    if isinstance(value, Mapping):
        pairs = (_field(b"\x0a", _key_value(str(k), v)) for k, v in value.items())
        return _field(b"\x32", b"".join(pairs))
    raise UnencodableValue(f"a value of type {kind.__name__}")


def _key_value(key: str, value: Any) -> bytes:
    """A KeyValue's fields: key 1, value 2."""
    return _field(b"\x0a", key.encode()) + _field(b"\x12", _any_value(value))


class SpanEncoder:
    """Encodes batches of finished spans; one per exporter (its caches are not locked: the
    batch processor exports from one thread at a time)."""

    def __init__(self) -> None:
        # (field tag, key, value type, value) -> the whole encoded attribute field.
        self._fields: dict[tuple[bytes, str, type, Any], bytes] = {}
        self._names: dict[str, bytes] = {}

    def attribute(self, tag: bytes, key: str, value: Any) -> bytes:
        """One attribute as the repeated KeyValue field `tag`; b"" when OTLP cannot carry it."""
        kind = type(value)
        # A tuple (1,) equals (True,), and -0.0 equals 0.0 but encodes with its sign: neither
        # sequences nor floats are cached.
        cacheable = kind in _CACHED_SCALARS
        if cacheable:
            found = self._fields.get((tag, key, kind, value))
            if found is not None:
                return found
        try:
            encoded = _field(tag, _key_value(key, value))
        except UnencodableValue as exc:
            log.warning("telemetry: attribute %r left out of the OTLP export: %s", key, exc)
            return b""
        if cacheable:
            if len(self._fields) >= _CACHE_LIMIT:
                self._fields.clear()  # high-cardinality values (paths) must not grow it forever
            self._fields[(tag, key, kind, value)] = encoded
        return encoded

    def attributes(self, tag: bytes, attributes: Mapping[str, Any] | None) -> list[bytes]:
        if not attributes:
            return []
        attribute = self.attribute
        return [attribute(tag, key, value) for key, value in attributes.items()]

    def _name(self, name: str) -> bytes:
        found = self._names.get(name)
        if found is None:
            found = _field(b"\x2a", name.encode()) + b"\x30"  # the name field, then the kind's tag
            if len(self._names) >= _CACHE_LIMIT:
                self._names.clear()
            self._names[name] = found
        return found

    def span(self, span: ReadableSpan, context: SpanContext) -> bytes:
        """One Span message's fields (trace_id 1 … flags 16)."""
        parts = [b"\x0a\x10", context.trace_id.to_bytes(16, "big"), b"\x12\x08"]
        parts.append(context.span_id.to_bytes(8, "big"))
        if context.trace_state:
            state = ",".join(f"{k}={v}" for k, v in context.trace_state.items())
            parts.append(_field(b"\x1a", state.encode()))
        parent = span.parent
        if parent is not None:
            parts += (b"\x22\x08", parent.span_id.to_bytes(8, "big"))
        parts += (self._name(span.name), _KINDS[span.kind.value])
        if span.start_time:
            parts += (b"\x39", _PACK_Q(span.start_time))
        if span.end_time:
            parts += (b"\x41", _PACK_Q(span.end_time))
        parts += self.attributes(b"\x4a", span.attributes)
        if span.dropped_attributes:
            parts += (b"\x50", _varint(span.dropped_attributes))
        for event in span.events:
            event_parts = [b"\x09", _PACK_Q(event.timestamp)] if event.timestamp else []
            if event.name:
                event_parts.append(_field(b"\x12", event.name.encode()))
            event_parts += self.attributes(b"\x1a", event.attributes)
            if event.dropped_attributes:
                event_parts += (b"\x20", _varint(event.dropped_attributes))
            parts.append(_field(b"\x5a", b"".join(event_parts)))
        if span.dropped_events:
            parts += (b"\x60", _varint(span.dropped_events))
        for link in span.links:
            # The SDK's encoder sends no trace_state for a link; nor does this one.
            linked = link.context
            link_parts = [b"\x0a\x10", linked.trace_id.to_bytes(16, "big"), b"\x12\x08"]
            link_parts.append(linked.span_id.to_bytes(8, "big"))
            link_parts += self.attributes(b"\x22", link.attributes)
            if link.dropped_attributes:
                link_parts += (b"\x28", _varint(link.dropped_attributes))
            link_parts.append(_LINK_FLAGS[bool(linked.is_remote)])
            parts.append(_field(b"\x6a", b"".join(link_parts)))
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
        parts.append(_SPAN_FLAGS[parent is not None and bool(parent.is_remote)])
        return b"".join(parts)

    def _scope(self, scope: InstrumentationScope | None) -> bytes:
        if scope is None:
            return b"\x0a\x00"  # an empty scope, as the SDK's encoder sends then
        parts = [_field(b"\x0a", scope.name.encode())] if scope.name else []
        if scope.version:
            parts.append(_field(b"\x12", scope.version.encode()))
        parts += self.attributes(b"\x1a", scope.attributes)
        return _field(b"\x0a", b"".join(parts))

    def request(self, spans: Sequence[ReadableSpan]) -> bytes:
        """The serialized ExportTraceServiceRequest for these spans."""
        # Resource → scope → spans, in first-seen order, as the SDK's encoder groups them. By
        # the resource's id first (hashing a Resource serializes its attributes), then merged
        # by equality: resources equal but distinct share one ResourceSpans there too.
        by_id: dict[int, tuple[Resource, dict[InstrumentationScope | None, list[bytes]]]] = {}
        for span in spans:
            context = span.get_span_context()
            if context is None:
                continue  # a ReadableSpan built without a context has no ids to send
            resource = span.resource
            _, scopes = by_id.setdefault(id(resource), (resource, {}))
            scopes.setdefault(span.instrumentation_scope or None, []).append(self.span(span, context))
        groups: list[tuple[Resource, dict[InstrumentationScope | None, list[bytes]]]] = []
        for resource, scopes in by_id.values():
            same = next((g for g in groups if g[0] is resource or g[0] == resource), None)
            if same is None:
                groups.append((resource, scopes))
            else:
                for scope, encoded in scopes.items():
                    same[1].setdefault(scope, []).extend(encoded)
        out = []
        for resource, scopes in groups:
            parts = [_field(b"\x0a", b"".join(self.attributes(b"\x0a", resource.attributes)))]
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
