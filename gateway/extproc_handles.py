"""Handles on the response path: the handles a server mints, read from its response as it
passes through Envoy's external processing, and bound before the client sees them.

Only a request that Check judged able to mint one (some kind's `minted_by` held, and every
policy allowed it) is followed here: Check says so in Envoy's dynamic metadata
(`MINT_METADATA_KEY` in the ext_authz namespace, forwarded to ext_proc by the example config),
and only then are the request's body and the response's body asked for.

- A JSON (or any non-SSE) response is buffered whole, at most `handles.max_response_bytes`, and
  read strictly (gateway.mcp.response_messages); nothing of it has reached the client, so a
  refusal is the client's 502.
- An SSE response is read event by event as it streams (gateway.mcp.EventStream): each chunk is
  passed on only up to the end of its last complete event, so an event is delivered only after
  its handle is bound. A refused event ends the stream: what came before it was delivered, it
  and what follows never are.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from gateway import decision
from gateway.decision import Decision
from gateway.identity.verifier import Identity
from gateway.mcp import EventStream, Unparseable, UnsafeText, read_json, response_messages
from gateway.pipeline import ResponsePath
from gateway.pipeline.minting import unreadable
from gateway.request import RequestContext
from gateway.response import MINT_METADATA_KEY

EXT_AUTHZ_NAMESPACE = "envoy.filters.http.ext_authz"
EVENT_STREAM = "text/event-stream"
PASSED = Decision(True, decision.ALLOWED)  # a response that passes, changing nothing


def may_mint(metadata_context: Any) -> str | None:
    """Check's mark on a request whose response may mint a handle: the "policy/kind" pairs it
    decided may mint, comma-joined; None when unmarked. A mark that is not a string (a Check of
    an older version) is kept as "", which names no kind: the response is refused, not passed."""
    namespace = metadata_context.filter_metadata.get(EXT_AUTHZ_NAMESPACE)
    if namespace is None:
        return None
    value = namespace.fields.get(MINT_METADATA_KEY)
    if value is None or value.WhichOneof("kind") in (None, "null_value"):
        return None
    if value.WhichOneof("kind") == "string_value":
        return str(value.string_value)
    if value.WhichOneof("kind") == "bool_value" and not value.bool_value:
        return None
    return ""


def with_body(context: RequestContext, body: bytes) -> RequestContext:
    """The request as Check saw it: its headers, and its body (which ext_proc asked for)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return replace(context, body="", body_undecodable=True, parsed_mcp=None)
    return replace(context, body=text, parsed_mcp=None)


class ResponseMinting:
    """One response being read for handles; `outcome` holds what was minted or refused."""

    def __init__(
        self,
        response_path: ResponsePath,
        context: RequestContext,
        identity: Identity | None,
        status: int,
        headers: Mapping[str, str],
        max_bytes: int,
        now: float,
        kinds: str,
    ) -> None:
        self._response_path = response_path
        self._kinds = kinds
        self._context = context
        self._identity = identity
        self._status = status
        self._headers = dict(headers)
        self._max = max_bytes
        self._now = now
        self.streamed = headers.get("content-type", "").strip().lower().startswith(EVENT_STREAM)
        self._events = EventStream(max_bytes) if self.streamed else None
        self._body = b""
        self._released = 0  # SSE bytes passed on so far
        self.outcome: Decision = PASSED

    def _mint(self, message: Any) -> Decision | None:
        """Bind what one JSON message mints; a refusal, or None."""
        variable = {"status": self._status, "headers": self._headers, "json": message}
        minted = self._response_path.mint(self._context, self._identity, variable, self._now, self._kinds)
        if not minted.allowed:
            self.outcome = minted
            return minted
        if minted.handle_kind and not self.outcome.handle_new:
            self.outcome = minted
        return None

    def no_body(self) -> Decision | None:
        """A response without a body: `minted` sees `response.json` as null."""
        return self._mint(None)

    def buffered(self, body: bytes) -> Decision | None:
        """A whole non-SSE response: every handle it mints bound, or the refusal."""
        if not body:
            return self._mint(None)
        content_type = self._headers.get("content-type", "application/json")
        try:
            # Whatever its content type says, a body a client could read as JSON is read as JSON.
            messages = response_messages(content_type if "json" in content_type else "application/json",
                                         body, self._max)
        except (Unparseable, UnsafeText) as exc:
            self.outcome = unreadable(f"the response cannot be read: {exc}")
            return self.outcome
        for message in messages:
            refused = self._mint(message)
            if refused is not None:
                return refused
        return None

    def streamed_chunk(self, chunk: bytes, end: bool) -> tuple[bytes, Decision | None]:
        """The bytes of this SSE chunk that may go on now (up to the last complete event, held
        bytes of earlier chunks included), or a refusal that ends the stream."""
        assert self._events is not None
        self._body += chunk
        try:
            events = self._events.feed(chunk)
            if end:
                events += self._events.finish()
            for event in events:
                refused = self._mint(read_json(event))
                if refused is not None:
                    return b"", refused
        except (Unparseable, UnsafeText) as exc:
            self.outcome = unreadable(f"the response cannot be read: {exc}")
            return b"", self.outcome
        complete = self._events.complete
        start = self._released
        released = self._body[: complete - start]
        self._body = self._body[complete - start :]
        self._released = complete
        return released, None
