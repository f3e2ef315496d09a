"""The MCP view of a request: which JSON-RPC method, and which tool, prompt or resource.

It reads the JSON-RPC body when Envoy forwards one, and the `Mcp-Method` / `Mcp-Name`
headers that MCP 2026-07-28 clients send on session-less requests.

The view is read strictly: a body that some server could run as a call, but that the
gateway cannot read exactly as every server would, raises `Unparseable` instead of
yielding an empty view. An empty view would let a policy keyed on `mcp.method` skip the
request while a lenient upstream parser runs the call (an encoded body, a BOM, another
charset, duplicate keys, absurd nesting or numbers).
"""

from __future__ import annotations

import base64
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.text import safe_text

# Bounds on what the gateway agrees to judge. Legitimate MCP messages stay far below them;
# parsers disagree beyond them (recursion limits, big-number handling).
MAX_DEPTH = 64
MAX_NUMBER_LENGTH = 100
_BASE64_OPEN, _BASE64_CLOSE = "=?base64?", "?="
_JSON_MEDIA_SUFFIX = "+json"


# The methods whose `params.arguments` a policy sees as `mcp.arguments`.
ARGUMENT_METHODS = frozenset({"tools/call", "prompts/get"})


@dataclass(frozen=True, slots=True)
class McpCall:
    method: str = ""
    name: str = ""
    protocol_version: str = ""
    # A tools/call's (or prompts/get's) `params.arguments`, as parsed; {} otherwise.
    arguments: dict[str, Any] = field(default_factory=dict, compare=False)
    # The JSON-RPC id as parsed (str, int, float); None for a notification or no body. A
    # refusal that answers this call carries it back, so the client raises an ordinary error.
    request_id: str | int | float | None = field(default=None, compare=False)

    def as_cel(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "name": self.name,
            "protocol_version": self.protocol_version,
            "arguments": self.arguments,
        }


NOT_MCP = McpCall()


class McpHeaderMismatch(ValueError):
    """The Mcp-Method or Mcp-Name header says something other than the body."""


class Unparseable(ValueError):
    """The body may be a call, but the gateway cannot read it exactly as a server would."""


class UnsafeText(ValueError):
    """A string holds a NUL or a lone surrogate: no CEL engine may see it."""


def media_type(headers: Mapping[str, str]) -> tuple[str, str | None]:
    """The lower-case media type of Content-Type, and its charset parameter if any. Of
    several charset parameters, the first that is not UTF-8 counts: servers disagree on which
    one they read, so any other charset must refuse."""
    value = headers.get("content-type", "")
    kind, _, parameters = value.partition(";")
    charset = None
    for parameter in parameters.split(";"):
        key, _, raw = parameter.partition("=")
        if key.strip().lower() == "charset":
            given = raw.strip().strip('"').strip().lower()
            if charset is None or charset in ("utf-8", "utf8"):
                charset = given
    return kind.strip().lower(), charset


def is_json_media(kind: str) -> bool:
    if kind == "application/json":
        return True
    return kind.startswith("application/") and kind.endswith(_JSON_MEDIA_SUFFIX)


def _looks_like_json(body: str) -> bool:
    # Any leading character a parser might skip (whitespace of every kind, controls, a BOM)
    # is skipped here too, so a lenient parser cannot see an object where this sees text.
    for character in body:
        if character in "{[":
            return True
        if not (character.isspace() or ord(character) < 0x20 or character in "\ufeff\x7f"):
            return False
    return False


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        # Parsers disagree on which of two equal keys counts (first or last).
        raise Unparseable("a JSON object repeats a key")
    return result


def _number(text: str) -> float | int:
    if len(text) > MAX_NUMBER_LENGTH:
        raise Unparseable(f"a JSON number is longer than {MAX_NUMBER_LENGTH} characters")
    if "." in text or "e" in text or "E" in text:
        value = float(text)
        if not math.isfinite(value):
            raise Unparseable("a JSON number is out of range")
        return value
    return int(text)


def _constant(text: str) -> Any:
    raise Unparseable(f"{text} is not JSON")


def _check_values(message: Any) -> None:
    """Depth within MAX_DEPTH, and every string (keys too) safe for the engines."""
    stack: list[tuple[Any, int]] = [(message, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise Unparseable(f"the JSON nests deeper than {MAX_DEPTH}")
        if isinstance(value, str):
            if not safe_text(value):
                raise UnsafeText("a JSON string holds a NUL or a lone surrogate")
        elif isinstance(value, dict):
            for key, item in value.items():
                if not safe_text(key):
                    raise UnsafeText("a JSON key holds a NUL or a lone surrogate")
                stack.append((item, depth + 1))
        elif isinstance(value, list):
            stack.extend((item, depth + 1) for item in value)


def _load(body: str) -> Any:
    try:
        message = json.loads(
            body, object_pairs_hook=_pairs, parse_int=_number, parse_float=_number, parse_constant=_constant
        )
    except RecursionError:
        raise Unparseable(f"the JSON nests deeper than {MAX_DEPTH}") from None
    except Unparseable:
        raise
    except ValueError:
        raise Unparseable("the body is not valid JSON") from None
    _check_values(message)
    return message


def _string_param(params: Mapping[str, Any], key: str, method: str) -> str:
    value = params.get(key, "")
    if not isinstance(value, str):
        raise Unparseable(f"{method}: params.{key} is not a string")
    return value


def _call_from_message(message: Any, protocol_version: str) -> McpCall:
    if not isinstance(message, dict) or message.get("jsonrpc") != "2.0":
        raise Unparseable("not a JSON-RPC 2.0 message")
    request_id = message.get("id")
    if isinstance(request_id, bool) or not isinstance(request_id, str | int | float | None):
        raise Unparseable("the JSON-RPC id is not a string or a number")
    if "method" not in message:
        if "result" in message or "error" in message:
            # A JSON-RPC response sent by a client: no method to authorize.
            return McpCall(protocol_version=protocol_version)
        raise Unparseable("a JSON-RPC message with neither a method nor a result")
    method = message["method"]
    if not isinstance(method, str):
        raise Unparseable("the JSON-RPC method is not a string")
    params = message.get("params")
    if params is None:
        params = {}
    if isinstance(params, list):
        # By-position params name no tool the gateway could judge; MCP never sends them.
        raise Unparseable("JSON-RPC params by position")
    if not isinstance(params, dict):
        raise Unparseable("the JSON-RPC params are not an object")
    # What the server acts on: resources are named by uri (a `name` beside it is ignored by
    # the SDKs, so it must not be what a policy sees); tools and prompts by name.
    if method.startswith("resources/"):
        name = _string_param(params, "uri", method)
    elif "name" in params:
        name = _string_param(params, "name", method)
    else:
        name = _string_param(params, "uri", method)
    if method == "initialize" and not protocol_version:
        version = params.get("protocolVersion", "")
        protocol_version = version if isinstance(version, str) else ""
    arguments: dict[str, Any] = {}
    if method in ARGUMENT_METHODS and params.get("arguments") is not None:
        arguments = params["arguments"]
        if not isinstance(arguments, dict):
            # A server might read a list by position; what a policy sees must be what it runs.
            raise Unparseable(f"{method}: params.arguments is not an object")
    return McpCall(method, name, protocol_version, arguments, request_id)


def parse_body(headers: Mapping[str, str], body: str, protocol_version: str) -> tuple[McpCall, ...]:
    """The calls in a body: one, several for a batch, none when it cannot be a call.

    Raises Unparseable when it may be a call that the gateway cannot read exactly, and
    UnsafeText when it holds a string no engine may see.
    """
    kind, _ = media_type(headers)
    if not is_json_media(kind):
        # Some servers parse JSON whatever the Content-Type says; judging the body as "not
        # MCP" would let them run a call that no policy saw.
        if _looks_like_json(body):
            raise Unparseable(f"a JSON body sent as {kind or 'no content type'}")
        return ()
    message = _load(body)
    if isinstance(message, list):
        if not message:
            raise Unparseable("an empty JSON-RPC batch")
        # Each call of a batch is judged on its own; one the gateway cannot read refuses all.
        return tuple(_call_from_message(item, protocol_version) for item in message)
    return (_call_from_message(message, protocol_version),)


def _header_value(value: str | None) -> str | None:
    """An Mcp-* header's value: MCP 2026-07-28 wraps a value that is not plain visible ASCII
    as `=?base64?PAYLOAD?=`. A wrapped value that does not decode canonically to UTF-8 is
    Unparseable: it can match no body."""
    if value is None or not (value.startswith(_BASE64_OPEN) and value.endswith(_BASE64_CLOSE)):
        return value
    payload = value[len(_BASE64_OPEN) : -len(_BASE64_CLOSE)]
    try:
        raw = base64.b64decode(payload, validate=True)
        if base64.b64encode(raw).decode("ascii") != payload:
            raise ValueError("not canonical")
        decoded = raw.decode("utf-8")
    except ValueError:  # binascii.Error and UnicodeDecodeError are ValueErrors
        raise Unparseable("an Mcp-* header holds malformed base64") from None
    if not safe_text(decoded):
        raise UnsafeText("an Mcp-* header holds a NUL or a lone surrogate")
    return decoded


def mcp_view(headers: Mapping[str, str], body: str) -> tuple[McpCall, ...]:
    """Every call the request makes; at least one element (NOT_MCP when it is not MCP)."""
    protocol_version = headers.get("mcp-protocol-version", "")
    header_method = _header_value(headers.get("mcp-method"))
    header_name = _header_value(headers.get("mcp-name"))
    calls = parse_body(headers, body, protocol_version) if body else ()
    if calls:
        if header_method is not None or header_name is not None:
            if len(calls) != 1:
                raise McpHeaderMismatch("Mcp-Method/Mcp-Name headers on a batch")
            call = calls[0]
            if header_method is not None and header_method != call.method:
                raise McpHeaderMismatch("Mcp-Method header differs from the body")
            if header_name is not None and header_name != call.name:
                raise McpHeaderMismatch("Mcp-Name header differs from the body")
        return calls
    if header_method is not None:
        return (McpCall(header_method, header_name or "", protocol_version),)
    if protocol_version:
        return (McpCall(protocol_version=protocol_version),)
    return (NOT_MCP,)


def read_json(text: str) -> Any:
    """One JSON value read as strictly as a request body: no duplicate keys, bounded depth and
    numbers, no NUL or lone surrogate. Raises Unparseable or UnsafeText."""
    return _load(text)


class EventStream:
    """A `text/event-stream` body read event by event, as it arrives: never buffered whole.

    `feed` takes the next bytes and returns the data of each event they complete (the
    `data:` lines joined with newlines; an event without data is a keep-alive, left out).
    An event larger than `max_event_bytes`, or not UTF-8, raises Unparseable; so does
    `finish` when the stream ends inside an event (a truncated event is never judged)."""

    def __init__(self, max_event_bytes: int) -> None:
        self._max = max_event_bytes
        self._pending = b""
        self._data: list[str] = []
        self._event_bytes = 0
        self._started = False
        # Bytes read as whole lines, and of them those up to the end of the last complete event
        # (a blank line): what may be delivered so far, byte for byte.
        self.consumed = 0
        self.complete = 0

    def feed(self, chunk: bytes) -> list[str]:
        # Lines are found from an offset and the pending bytes cut once per feed: re-slicing
        # per line made a chunk of many short lines quadratic.
        pending = self._pending + chunk
        events: list[str] = []
        start = 0
        while True:
            if self._started and not self._data and self._event_bytes == 0:
                # Between events: a run of blank lines (keep-alives) completes no event, taken at once.
                blank = _BLANK_LINES.match(pending, start)
                if blank is not None:
                    self.consumed += blank.end() - start
                    self.complete = self.consumed
                    start = blank.end()
            cut = _line_end(pending, start)
            if cut is None:
                break
            end, after = cut
            line = pending[start:end]
            self._event_bytes += after - start
            self.consumed += after - start
            start = after
            if self._event_bytes > self._max:
                raise Unparseable(f"an event is larger than {self._max} bytes")
            event = self._line(line)
            if event is not None:
                events.append(event)
        self._pending = pending[start:]
        if self._event_bytes + len(self._pending) > self._max:
            raise Unparseable(f"an event is larger than {self._max} bytes")
        return events

    def finish(self) -> list[str]:
        """The events the end of the stream completes (a last line ended by a lone CR)."""
        events = []
        if self._pending.endswith(b"\r"):
            self.consumed += len(self._pending)
            event = self._line(self._pending[:-1])
            self._pending = b""
            if event is not None:
                events.append(event)
        if self._pending or self._data:
            raise Unparseable("the stream ended inside an event")
        return events

    def _line(self, raw: bytes) -> str | None:
        if not self._started:
            self._started = True
            raw = raw.removeprefix(b"\xef\xbb\xbf")
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise Unparseable("an event is not UTF-8") from None
        if not line:
            data, self._data, self._event_bytes = self._data, [], 0
            self.complete = self.consumed
            return "\n".join(data) if data else None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        return None


_BLANK_LINES = re.compile(rb"(?:\r\n|\n)+")


def _line_end(buffer: bytes, start: int = 0) -> tuple[int, int] | None:
    """Where the first line from `start` ends (CRLF, LF or CR) and where the next begins; None
    while a lone CR at the end may yet be followed by LF. A CR is looked for only before the
    next LF, so each line costs its own length."""
    newline = buffer.find(b"\n", start)
    carriage = buffer.find(b"\r", start, newline if newline >= 0 else len(buffer))
    if carriage < 0:
        return None if newline < 0 else (newline, newline + 1)
    if carriage + 1 == len(buffer):
        return None
    crlf = buffer[carriage + 1 : carriage + 2] == b"\n"
    return (carriage, carriage + 2 if crlf else carriage + 1)


def response_messages(content_type: str, body: bytes, max_bytes: int) -> list[Any]:
    """The JSON messages of a whole response: one for JSON, one per event for SSE. Raises
    Unparseable or UnsafeText for a body the gateway cannot read exactly."""
    kind, charset = media_type({"content-type": content_type})
    if len(body) > max_bytes:
        raise Unparseable(f"the response is larger than {max_bytes} bytes")
    if charset not in (None, "utf-8", "utf8"):
        raise Unparseable(f"a response in charset {charset}")
    if kind == "text/event-stream":
        stream = EventStream(max_bytes)
        events = stream.feed(body)
        events.extend(stream.finish())
        return [read_json(event) for event in events]
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise Unparseable("the response is not UTF-8") from None
    if text.startswith("\ufeff"):
        raise Unparseable("the response starts with a byte order mark")
    return [read_json(text)]
