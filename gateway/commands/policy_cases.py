"""Policy test cases (`*_test.yaml`): read them, run them through the real Authorizer.

A case gives a request, the verified claims (or `anonymous: true`), optionally a stored
session, and the expected decision. It runs through `gateway.pipeline.Authorizer` with a
fresh memory store, entering after token verification (`check_identity`), and the
decision is turned into the real CheckResponse, so what a case checks is what Envoy
would get. Nothing here is on the serving path.

    defaults:                       # merged into every case (mappings merge, the rest replaces)
      request: {method: POST, path: /mcp, headers: {mcp-session-id: s-1}}
      claims: {iss: https://idp.example.com, sub: alice}
    cases:
      - name: other-subject-denied
        claims: {sub: mallory}
        session: {bound: {iss: https://idp.example.com, sub: alice}}
        expect: {decision: deny, reason: subject_mismatch, status: 404, session: {state: live}}
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

from yaml.nodes import Node, SequenceNode

from gateway import decision
from gateway.config import AuthConfig, HandlesConfig, SessionConfig
from gateway.decision import Decision
from gateway.envoy_api.envoy.config.core.v3 import address_pb2
from gateway.envoy_api.envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2
from gateway.identity.verifier import Identity, TokenRejected, TokenVerifier, auth_map_for, confirmation_of
from gateway.mcp import Unparseable, UnsafeText, response_messages
from gateway.pipeline import UPSTREAM_HEADERS, Authorizer, PolicyHolder
from gateway.policy.evaluate import Tracer
from gateway.policy.loader import TEST_SUFFIXES
from gateway.policy.model import Location, PolicySet
from gateway.request import PARTIAL_BODY_HEADER, RequestContext, RequestError, from_check_request
from gateway.response import ResponseBuilder
from gateway.session.handles import handle_store_settings, store_key
from gateway.session.memory import MemoryStore
from gateway.session.record import ENDED_REVOKED, ENDED_TERMINATED, new_record, owner_key, tombstone
from gateway.session.store import StoreSettings
from gateway.text import safe_value
from gateway.yaml_reader import NodeReader, Position, YamlError, load, values, wrong_type

# 2026-01-01T00:00:00Z: a fixed clock, so that a case means the same thing every day.
DEFAULT_NOW = 1_767_225_600.0

FILE_KEYS = {"defaults", "cases"}
CASE_KEYS = {
    "name", "description", "now", "request", "claims", "anonymous", "session", "handle", "response", "expect"
}
REQUEST_KEYS = {"method", "path", "host", "scheme", "headers", "body", "partial_body", "context", "source"}
SESSION_KEYS = {"id", "bound", "anonymous", "state", "created", "idle", "record"}
EXPECT_KEYS = {
    "decision", "reason", "status", "policy", "rule", "headers", "body", "audit", "session", "handle"
}
EXPECT_SESSION_KEYS = {"state", "bound", "anonymous"}
HANDLE_KEYS = {"kind", "id", "bound", "anonymous", "state", "created"}
RESPONSE_KEYS = {"status", "headers", "body"}
EXPECT_HANDLE_KEYS = {"kind", "id", "state", "bound", "anonymous", "new"}
HANDLE_STATES = ("live", "terminated", "revoked", "expired", "legacy")
SESSION_STATES = ("live", "terminated", "revoked", "expired", "legacy")
STATES_AFTER = ("absent", *SESSION_STATES)


class CaseFileError(Exception):
    """A test file that cannot be read; each problem is `file:line:col: message`."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class StoredSession:
    id: str
    bound: Mapping[str, Any]
    anonymous: bool
    state: str
    created: float  # seconds before the check
    idle: float  # seconds since its last use
    record: Mapping[str, Any] | None  # written as is (a legacy or odd record)


@dataclass(frozen=True, slots=True)
class StoredHandle:
    kind: str
    id: str
    bound: Mapping[str, Any]
    anonymous: bool
    state: str
    created: float  # seconds before the check


@dataclass(frozen=True, slots=True)
class CaseResponse:
    """The upstream's answer to the request, for the kinds' `minted` expressions."""

    status: int
    headers: Mapping[str, str]
    body: bytes


@dataclass(frozen=True, slots=True)
class Expectation:
    decision: str  # allow | deny
    reason: str | None
    status: int | None
    policy: str | None
    rule: str | None
    headers: Mapping[str, str]
    body: str | None
    audit: tuple[Mapping[str, Any], ...] | None
    session: Mapping[str, Any] | None
    handle: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class PolicyCase:
    name: str
    location: Location
    request: Mapping[str, Any]
    claims: Mapping[str, Any] | None  # None: anonymous
    now: float
    session: StoredSession | None
    expect: Expectation | None
    description: str = ""
    handle: StoredHandle | None = None
    response: CaseResponse | None = None


@dataclass(slots=True)
class Outcome:
    decision: Decision
    response: external_auth_pb2.CheckResponse
    session_after: Mapping[str, Any] | None  # the stored record after the check; None if absent
    session_id: str
    handle_after: Mapping[str, Any] | None = None  # the expected handle's record after; None if absent
    handle_key: str = ""  # kind:id of that handle


@dataclass(slots=True)
class CaseResult:
    case: PolicyCase
    engine: str
    failures: list[str] = field(default_factory=list)
    outcome: Outcome | None = None

    @property
    def passed(self) -> bool:
        return not self.failures


# ---------------------------------------------------------------------- reading test files


def find_test_files(directory: Path) -> list[Path]:
    """The `*_test.yaml` files beside the policies, in name order."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_file() and p.name.endswith(TEST_SUFFIXES))


def _merge(base: Any, override: Any) -> Any:
    """A case over the defaults: mappings merge, other values replace, null removes."""
    if isinstance(base, Mapping) and isinstance(override, Mapping):
        merged = dict(base)
        for key, value in override.items():
            if value is None:
                merged.pop(key, None)
            else:
                merged[key] = _merge(base[key], value) if key in base else value
        return merged
    return override


class _CaseReader(NodeReader):
    """Validates one test file, with the node tree for locations and plain values for content."""

    def __init__(self, path: str, text: str, single: bool = False) -> None:
        super().__init__(path, text)
        # One case on its own (an `explain` input): its name defaults to the file's, and
        # it need not expect anything.
        self.single = single
        self.problems: list[str] = []

    def report(self, position: Position, message: str) -> None:
        self.problems.append(f"{position}: {message}")

    def keys(self, node: Node | None, allowed: set[str], what: str) -> dict[str, Node]:
        """The mapping's value nodes by name; unknown keys are problems (YAML `<<` merges pass)."""
        found = self.fields(node, allowed, what, constructed=True) or {}
        return {key: value_node for key, (_, value_node) in found.items()}

    def validate_case_keys(self, node: Node | None) -> dict[str, Node]:
        """Unknown keys anywhere in a case (or in `defaults`), each at its own line."""
        nodes = self.keys(node, CASE_KEYS, "a case")
        self.keys(nodes.get("request"), REQUEST_KEYS, "request")
        self.keys(nodes.get("session"), SESSION_KEYS, "session")
        self.keys(nodes.get("handle"), HANDLE_KEYS, "handle")
        self.keys(nodes.get("response"), RESPONSE_KEYS, "response")
        expect = self.keys(nodes.get("expect"), EXPECT_KEYS, "expect")
        self.keys(expect.get("session"), EXPECT_SESSION_KEYS, "expect.session")
        self.keys(expect.get("handle"), EXPECT_HANDLE_KEYS, "expect.handle")
        return nodes

    def mapping_value(self, value: Any, node: Node | None, what: str) -> Mapping[str, Any] | None:
        if value is None:
            return None
        if wrong := wrong_type(value, "mapping"):
            self.problem(node, f"{what} {wrong}")
            return None
        return cast(Mapping[str, Any], value)

    def strings(self, value: Any, node: Node | None, what: str) -> dict[str, str]:
        mapping = self.mapping_value(value, node, what) or {}
        result: dict[str, str] = {}
        for key, item in mapping.items():
            if isinstance(item, bool) or not isinstance(item, str | int | float):
                self.problem(node, f"{what}.{key} must be a string")
                continue
            result[str(key)] = str(item)
        return result

    def case(
        self, value: Any, node: Node | None, index: int, defaults: Mapping[str, Any]
    ) -> PolicyCase | None:
        if not isinstance(value, Mapping):
            self.problem(node, f"case {index + 1} must be a mapping")
            return None
        before = len(self.problems)
        nodes = self.validate_case_keys(node)
        merged: Mapping[str, Any] = _merge(defaults, value)
        name = merged.get("name")
        if self.single and name is None:
            name = Path(self.path).stem
        if not isinstance(name, str) or not name:
            self.problem(node, f"case {index + 1} needs a name")
            name = f"case-{index + 1}"
        location = Location(*self.where(node))
        request = self.request(merged.get("request") or {}, nodes.get("request", node))
        anonymous = merged.get("anonymous", False)
        if wrong := wrong_type(anonymous, "boolean"):
            self.problem(nodes.get("anonymous", node), f"anonymous {wrong}")
        claims = (
            None
            if anonymous is True
            else self.mapping_value(merged.get("claims"), nodes.get("claims", node), "claims")
        )
        if anonymous is not True and claims is None:
            self.problem(node, f"case {name!r} needs claims, or anonymous: true")
        elif claims is not None:
            for claim in ("iss", "sub"):
                if not isinstance(claims.get(claim), str) or not claims.get(claim):
                    self.problem(nodes.get("claims", node), f"claims.{claim} must be a non-empty string")
        now = self.now(merged.get("now", DEFAULT_NOW), nodes.get("now", node))
        session = None
        if merged.get("session") is not None:
            session = self.session(merged["session"], nodes.get("session", node), request)
        handle = None
        if merged.get("handle") is not None:
            handle = self.stored_handle(merged["handle"], nodes.get("handle", node))
        response = None
        if merged.get("response") is not None:
            response = self.response(merged["response"], nodes.get("response", node))
        expect = None
        if merged.get("expect") is None:
            if not self.single:
                self.problem(node, f"case {name!r} has no expect")
        else:
            expect = self.expectation(merged["expect"], nodes.get("expect", node))
        if len(self.problems) > before:
            return None
        return PolicyCase(
            name=name,
            location=location,
            request=request,
            claims=claims,
            now=now,
            session=session,
            expect=expect,
            description=str(merged.get("description", "")),
            handle=handle,
            response=response,
        )

    def stored_handle(self, value: Any, node: Node | None) -> StoredHandle | None:
        mapping = self.mapping_value(value, node, "handle")
        if mapping is None:
            return None
        kind, handle_id = mapping.get("kind"), mapping.get("id")
        if not isinstance(kind, str) or not kind or not isinstance(handle_id, str) or not handle_id:
            self.problem(node, "handle.kind and handle.id must be non-empty strings")
            return None
        state = mapping.get("state", "live")
        if state not in HANDLE_STATES:
            self.problem(node, f"handle.state must be one of {', '.join(HANDLE_STATES)}")
            return None
        created = mapping.get("created", 60.0)
        if isinstance(created, bool) or not isinstance(created, int | float) or created < 0:
            self.problem(node, "handle.created must be a number of seconds >= 0")
            return None
        bound = self.mapping_value(mapping.get("bound"), node, "handle.bound") or {}
        anonymous = mapping.get("anonymous") is True
        return StoredHandle(kind, handle_id, bound, anonymous, str(state), float(created))

    def response(self, value: Any, node: Node | None) -> CaseResponse | None:
        mapping = self.mapping_value(value, node, "response")
        if mapping is None:
            return None
        status = mapping.get("status", 200)
        if wrong := wrong_type(status, "integer"):
            self.problem(node, f"response.status {wrong}")
            return None
        given = self.strings(mapping.get("headers"), node, "response.headers")
        headers = {k.lower(): v for k, v in given.items()}
        body = mapping.get("body", "")
        # A mapping or a list is a JSON body written as YAML (a JSON-RPC response).
        if not isinstance(body, str):
            body = json.dumps(body, separators=(",", ":"))
            headers.setdefault("content-type", "application/json")
        return CaseResponse(int(status), headers, body.encode("utf-8", "surrogatepass"))

    def now(self, value: Any, node: Node | None) -> float:
        if isinstance(value, datetime.datetime):
            moment = value if value.tzinfo else value.replace(tzinfo=datetime.UTC)
            return moment.timestamp()
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.problem(node, "now must be seconds since the epoch or a timestamp (2026-01-01T00:00:00Z)")
            return DEFAULT_NOW
        return float(value)

    def request(self, value: Any, node: Node | None) -> Mapping[str, Any]:
        mapping = self.mapping_value(value, node, "request") or {}
        request: dict[str, Any] = {
            "method": str(mapping.get("method", "POST")).upper(),
            "path": str(mapping.get("path", "/mcp")),
            "host": str(mapping.get("host", "mcp.example.com")),
            "scheme": str(mapping.get("scheme", "https")),
            "headers": {
                k.lower(): v for k, v in self.strings(mapping.get("headers"), node, "request.headers").items()
            },
            "context": self.strings(mapping.get("context"), node, "request.context"),
            "source": self.strings(mapping.get("source"), node, "request.source"),
            "partial_body": mapping.get("partial_body", False) is True,
        }
        body = mapping.get("body", "")
        # A mapping or a list is a JSON body written as YAML (a JSON-RPC message, a batch).
        if isinstance(body, str):
            request["body"] = body
        else:
            request["body"] = json.dumps(body, separators=(",", ":"))
            request["headers"].setdefault("content-type", "application/json")
        return request

    def session(self, value: Any, node: Node | None, request: Mapping[str, Any]) -> StoredSession | None:
        mapping = self.mapping_value(value, node, "session")
        if mapping is None:
            return None
        session_id = mapping.get("id", request["headers"].get("mcp-session-id"))
        if not isinstance(session_id, str) or not session_id:
            self.problem(node, "session.id is required when the request has no mcp-session-id header")
            return None
        state = mapping.get("state", "live")
        if state not in SESSION_STATES:
            self.problem(node, f"session.state must be one of {', '.join(SESSION_STATES)}")
            return None
        bound = self.mapping_value(mapping.get("bound"), node, "session.bound") or {}
        record = self.mapping_value(mapping.get("record"), node, "session.record")
        anonymous = mapping.get("anonymous", False)
        created = mapping.get("created", 60.0)
        idle = mapping.get("idle", 1.0)
        for what, number in (("created", created), ("idle", idle)):
            if isinstance(number, bool) or not isinstance(number, int | float) or number < 0:
                self.problem(node, f"session.{what} must be a number of seconds >= 0")
                return None
        return StoredSession(
            session_id, bound, anonymous is True, str(state), float(created), float(idle), record
        )

    def expectation(self, value: Any, node: Node | None) -> Expectation | None:
        mapping = self.mapping_value(value, node, "expect")
        if mapping is None:
            return None
        nodes = {k: v for k, v in values(node).items() if k in EXPECT_KEYS}
        outcome = mapping.get("decision")
        if outcome not in ("allow", "deny"):
            self.problem(nodes.get("decision", node), "expect.decision must be allow or deny")
            return None
        status = mapping.get("status")
        if status is not None and (wrong := wrong_type(status, "integer")):
            self.problem(nodes.get("status", node), f"expect.status {wrong}")
            return None
        audit = mapping.get("audit")
        if audit is not None and not (isinstance(audit, list) and all(isinstance(a, Mapping) for a in audit)):
            self.problem(nodes.get("audit", node), "expect.audit must be a list of {policy, rule, reason}")
            return None
        session = self.mapping_value(mapping.get("session"), nodes.get("session", node), "expect.session")
        if session is not None and session.get("state", "live") not in STATES_AFTER:
            self.problem(
                nodes.get("session", node),
                f"expect.session.state must be one of {', '.join(STATES_AFTER)}",
            )
        return Expectation(
            decision=str(outcome),
            reason=str(mapping["reason"]) if "reason" in mapping else None,
            status=status,
            policy=str(mapping["policy"]) if "policy" in mapping else None,
            rule=str(mapping["rule"]) if "rule" in mapping else None,
            headers={
                k.lower(): v for k, v in self.strings(mapping.get("headers"), node, "expect.headers").items()
            },
            body=str(mapping["body"]) if "body" in mapping else None,
            audit=tuple(audit) if audit is not None else None,
            session=session,
            handle=self.mapping_value(mapping.get("handle"), nodes.get("handle", node), "expect.handle"),
        )


def parse_cases(path: str, text: str) -> list[PolicyCase]:
    """The cases of one test file (a mapping with `cases`, or one case on its own)."""
    try:
        node, value = load(path, text)
    except YamlError as exc:
        raise CaseFileError([str(exc)]) from None
    single = isinstance(value, Mapping) and "cases" not in value
    reader = _CaseReader(path, text, single)
    if isinstance(value, Mapping) and "cases" in value:
        nodes = reader.keys(node, FILE_KEYS, "a test file")
        reader.validate_case_keys(nodes.get("defaults"))
        defaults = reader.mapping_value(value.get("defaults"), nodes.get("defaults"), "defaults") or {}
        items, items_node = value["cases"], nodes.get("cases")
        if not isinstance(items, list):
            reader.problem(items_node, "cases must be a list")
            raise CaseFileError(reader.problems)
        item_nodes: list[Node | None] = (
            list(items_node.value) if isinstance(items_node, SequenceNode) else [None] * len(items)
        )
    elif isinstance(value, Mapping):
        defaults, items, item_nodes = {}, [value], [node]
    else:
        reader.problem(node, "a test file is a mapping with `cases` (or one case)")
        raise CaseFileError(reader.problems)
    cases = []
    names: set[str] = set()
    for index, (item, item_node) in enumerate(zip(items, item_nodes, strict=True)):
        case = reader.case(item, item_node, index, defaults)
        if case is None:
            continue
        if case.name in names:
            reader.problem(item_node, f"duplicate case name {case.name!r}")
        names.add(case.name)
        cases.append(case)
    if reader.problems:
        raise CaseFileError(reader.problems)
    return cases


def load_case_file(path: Path) -> list[PolicyCase]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CaseFileError([f"{path}:1:1: cannot read: {exc}"]) from None
    return parse_cases(str(path), text)


# ---------------------------------------------------------------------- running a case


def identity_from_claims(claims: Mapping[str, Any], now: float) -> Identity:
    """What TokenVerifier would produce for a token carrying these (already trusted) claims."""
    issuer, subject = str(claims["iss"]), str(claims["sub"])
    raw = claims.get("scope", claims.get("scp", ()))
    scopes = tuple(raw.split()) if isinstance(raw, str) else tuple(s for s in raw if isinstance(s, str))
    jkt, x5t = confirmation_of(claims)  # as if the proof or certificate had passed
    auth_map = auth_map_for(issuer, subject, scopes, jkt, x5t)
    expires = claims.get("exp", now + 3600)
    expires_at = float(expires) if isinstance(expires, int | float) else now + 3600
    return Identity(dict(claims), issuer, subject, scopes, expires_at, auth_map, jkt, x5t)


def check_request_for(request: Mapping[str, Any]) -> external_auth_pb2.CheckRequest:
    """The CheckRequest Envoy would send for this request (pseudo-headers included)."""
    headers = {
        ":method": request["method"],
        ":path": request["path"],
        ":authority": request["host"],
        ":scheme": request["scheme"],
        **request["headers"],
    }
    if request["partial_body"]:
        headers[PARTIAL_BODY_HEADER] = "true"
    http = attribute_context_pb2.AttributeContext.HttpRequest(
        id="policy-test",
        method=request["method"],
        path=request["path"],
        host=request["host"],
        scheme=request["scheme"],
        headers=headers,
        # As bytes, like Envoy with pack_as_bytes: the text field stands for a lossy body.
        raw_body=request["body"].encode("utf-8", "surrogatepass"),
        protocol="HTTP/1.1",
    )
    source = request["source"]
    peer = attribute_context_pb2.AttributeContext.Peer(
        address=address_pb2.Address(
            socket_address=address_pb2.SocketAddress(
                address=source.get("address", "127.0.0.1"), port_value=50000
            )
        ),
        principal=source.get("principal", ""),
    )
    return external_auth_pb2.CheckRequest(
        attributes=attribute_context_pb2.AttributeContext(
            source=peer,
            request=attribute_context_pb2.AttributeContext.Request(http=http),
            context_extensions=request["context"],
        )
    )


def _store_session(store: MemoryStore, session: StoredSession, now: float, settings: SessionConfig) -> None:
    if session.record is not None:
        store.write_raw(session.id, session.record, now)
        return
    if session.state == "legacy":
        # The shape of a record written before sessions were bound to iss+sub.
        store.write_raw(session.id, {"sub": session.bound.get("sub", ""), "token_hash": "0" * 64}, now)
        return
    created = session.created
    if session.state == "expired":
        created = max(created, settings.ttl + 60)
    owner = ""
    if not session.anonymous:
        owner = owner_key(str(session.bound.get("iss", "")), str(session.bound.get("sub", "")))
    record = new_record(anonymous=session.anonymous, bound=session.bound, owner=owner, now=now - created)
    if session.state in ("terminated", "revoked"):
        ended = ENDED_TERMINATED if session.state == "terminated" else ENDED_REVOKED
        record = tombstone(record, ended, now - session.idle)
    store.replace(session.id, record, now - session.idle)


def _store_handle(store: MemoryStore, handle: StoredHandle, now: float, ttl: float) -> None:
    bound = handle.bound
    owner = "" if handle.anonymous else owner_key(str(bound.get("iss", "")), str(bound.get("sub", "")))
    key = store_key(handle.kind, handle.id)
    if handle.state == "legacy":
        store.write_raw(key, {"sub": handle.bound.get("sub", ""), "token_hash": "0" * 64}, now)
        return
    created = max(handle.created, ttl + 60) if handle.state == "expired" else handle.created
    record = new_record(anonymous=handle.anonymous, bound=handle.bound, owner=owner, now=now - created)
    if handle.state in ("terminated", "revoked"):
        ended = ENDED_TERMINATED if handle.state == "terminated" else ENDED_REVOKED
        record = tombstone(record, ended, now - 1)
    store.replace(key, record, now - 1)


def _expected_handle_key(case: PolicyCase) -> str:
    expected = case.expect.handle if case.expect is not None and case.expect.handle is not None else {}
    kind = expected.get("kind", case.handle.kind if case.handle else None)
    handle_id = expected.get("id", case.handle.id if case.handle else None)
    return store_key(str(kind), str(handle_id)) if kind and handle_id else ""


def _respond(
    authorizer: Authorizer,
    context: RequestContext,
    identity: Identity | None,
    case: PolicyCase,
    checked: Decision,
    max_bytes: int,
    trace: Tracer | None,
) -> Decision:
    """The response side of a case: the upstream's answer read as the gateway reads it, and
    every handle it mints bound; a refusal (502) replaces the allow. Only for a call Check
    marked as one that may mint (`checked.mints_handles`), as the gateway does."""
    assert case.response is not None
    response = case.response
    try:
        messages = response_messages(response.headers.get("content-type", ""), response.body, max_bytes)
    except (Unparseable, UnsafeText) as exc:
        return decision.deny(decision.HANDLE_UNREADABLE, error=f"the response cannot be read: {exc}")
    result = checked
    for message in messages:
        variable = {"status": response.status, "headers": dict(response.headers), "json": message}
        minted = authorizer.response_path.mint(
            context, identity, variable, case.now, checked.mints_handles, trace
        )
        if not minted.allowed:
            return minted
        if minted.handle_kind and not result.handle_new:
            result = replace(
                result, handle_kind=minted.handle_kind, handle_new=minted.handle_new,
                handle_id=minted.handle_id,
            )
    return result


def session_state(record: Mapping[str, Any] | None) -> str:
    if record is None:
        return "absent"
    if "schema" not in record:
        return "legacy"
    if record.get("terminated"):
        return str(record.get("ended") or "terminated")
    return "live"


class CaseRunner:
    """Runs cases against one loaded policy set, each with a fresh memory store."""

    def __init__(
        self,
        policies: PolicySet,
        auth: AuthConfig | None = None,
        sessions: SessionConfig | None = None,
        handles: HandlesConfig | None = None,
    ) -> None:
        self.policies = policies
        self.auth = auth or AuthConfig()
        self.sessions = sessions or SessionConfig()
        self.handles = handles or HandlesConfig()
        self.responses = ResponseBuilder(self.auth, UPSTREAM_HEADERS)

    def run(self, case: PolicyCase, trace: Tracer | None = None) -> Outcome:
        settings = StoreSettings(ttl=self.sessions.ttl, idle_timeout=self.sessions.idle_timeout)
        store = MemoryStore(settings)
        if case.session is not None:
            _store_session(store, case.session, case.now, self.sessions)
        handle_store = MemoryStore(
            handle_store_settings(self.handles, self.sessions.store_timeout, self.sessions.max_sessions)
        )
        if case.handle is not None:
            _store_handle(handle_store, case.handle, case.now, self.handles.ttl)
        authorizer = Authorizer(
            self.auth, self.sessions, TokenVerifier(self.auth), store, PolicyHolder(self.policies),
            handle_store, self.handles,
        )
        outcome = self._decide(authorizer, case, trace)
        session_id = case.session.id if case.session else case.request["headers"].get("mcp-session-id", "")
        after = None
        if session_id:
            loaded = store.load(session_id, case.now)
            after = loaded.data if loaded is not None else None
        handle_key = _expected_handle_key(case)
        handle_after = None
        if handle_key:
            loaded = handle_store.load(handle_key, case.now)
            handle_after = loaded.data if loaded is not None else None
        return Outcome(outcome, self.responses.build(outcome), after, session_id, handle_after, handle_key)

    def _decide(self, authorizer: Authorizer, case: PolicyCase, trace: Tracer | None) -> Decision:
        try:
            context: RequestContext = from_check_request(check_request_for(case.request))
        except RequestError as exc:
            return decision.deny(exc.reason, error=str(exc))
        if case.claims is not None and not safe_value(case.claims):
            # As the verifier refuses such a token: no NUL or lone surrogate reaches an engine.
            return decision.deny(decision.TOKEN_INVALID, error="a claim holds a NUL or a lone surrogate")
        try:
            identity = identity_from_claims(case.claims, case.now) if case.claims is not None else None
        except TokenRejected as rejected:  # a `cnf` the verifier would refuse
            return decision.deny(rejected.reason, error=str(rejected))
        checked = authorizer.check_identity(context, identity, case.now, trace)
        # The gateway reads a response only when Check marked the call as one that may mint.
        if not checked.allowed or case.response is None or not checked.mints_handles:
            return checked
        return _respond(authorizer, context, identity, case, checked, self.handles.max_response_bytes, trace)


def _status(response: external_auth_pb2.CheckResponse) -> int:
    return 200 if response.HasField("ok_response") else int(response.denied_response.status.code)


def summary(outcome: Outcome) -> str:
    d = outcome.decision
    return f"{'allow' if d.allowed else 'deny'} {d.reason} {_status(outcome.response)}"


def failures(expect: Expectation, outcome: Outcome) -> list[str]:
    """What differs from the expectation; empty when the case passes."""
    found: list[str] = []
    d = outcome.decision
    got = summary(outcome)
    wanted = " ".join(
        str(part) for part in (expect.decision, expect.reason, expect.status) if part is not None
    )
    if (
        ("allow" if d.allowed else "deny") != expect.decision
        or (expect.reason is not None and d.reason != expect.reason)
        or (expect.status is not None and _status(outcome.response) != expect.status)
    ):
        found.append(f"expected {wanted}, got {got}")
    if expect.policy is not None and d.policy != expect.policy:
        found.append(f"expected policy {expect.policy!r}, got {d.policy!r}")
    if expect.rule is not None and d.rule != expect.rule:
        found.append(f"expected rule {expect.rule!r}, got {d.rule!r}")
    if expect.headers:
        # A header may come more than once (a 401's Bearer and DPoP challenges): any value may match.
        headers: dict[str, list[str]] = {}
        for option in (*outcome.response.denied_response.headers, *outcome.response.ok_response.headers):
            headers.setdefault(option.header.key.lower(), []).append(option.header.value)
        for name, value in expect.headers.items():
            values = headers.get(name, [])
            if value not in values:
                shown = values[0] if len(values) == 1 else values or None
                found.append(f"expected header {name}: {value!r}, got {shown!r}")
    if expect.body is not None and outcome.response.denied_response.body != expect.body:
        found.append(f"expected body {expect.body!r}, got {outcome.response.denied_response.body!r}")
    if expect.audit is not None:
        got_audit = [{"policy": a.policy, "rule": a.rule, "reason": a.reason} for a in d.audit_denies]
        matches = len(got_audit) == len(expect.audit) and all(
            all(str(g.get(k)) == str(v) for k, v in e.items())
            for g, e in zip(got_audit, expect.audit, strict=True)
        )
        if not matches:
            found.append(f"expected audit {list(expect.audit)}, got {got_audit}")
    if expect.session is not None:
        found.extend(_session_failures(expect.session, outcome))
    if expect.handle is not None:
        found.extend(_handle_failures(expect.handle, outcome))
    return found


def _handle_failures(expected: Mapping[str, Any], outcome: Outcome) -> list[str]:
    record = outcome.handle_after
    state = session_state(record)
    found = []
    if not outcome.handle_key:
        return ["expect.handle needs kind and id (or a handle in the case)"]
    wanted = expected.get("state", "live")
    if state != wanted:
        found.append(f"expected the handle {outcome.handle_key} to be {wanted}, it is {state}")
    held = record or {}
    if record is not None and "bound" in expected and dict(held.get("bound", {})) != dict(expected["bound"]):
        found.append(f"expected the handle bound to {dict(expected['bound'])}, got {record.get('bound')}")
    anonymous = bool(held.get("anonymous"))
    if record is not None and "anonymous" in expected and anonymous != expected["anonymous"]:
        found.append(f"expected handle anonymous={expected['anonymous']}, got {record.get('anonymous')}")
    if "new" in expected and outcome.decision.handle_new != expected["new"]:
        found.append(f"expected authz.handle.new={expected['new']}, got {outcome.decision.handle_new}")
    return found


def _session_failures(expected: Mapping[str, Any], outcome: Outcome) -> list[str]:
    record = outcome.session_after
    state = session_state(record)
    found = []
    if state != expected.get("state", "live"):
        found.append(f"expected the stored session to be {expected.get('state', 'live')}, it is {state}")
    if (
        record is not None
        and "bound" in expected
        and dict(record.get("bound", {})) != dict(expected["bound"])
    ):
        found.append(f"expected the session bound to {dict(expected['bound'])}, got {record.get('bound')}")
    if (
        record is not None
        and "anonymous" in expected
        and bool(record.get("anonymous")) != expected["anonymous"]
    ):
        found.append(f"expected session anonymous={expected['anonymous']}, got {record.get('anonymous')}")
    return found


def run_case(runner: CaseRunner, case: PolicyCase, engine: str) -> CaseResult:
    result = CaseResult(case, engine)
    try:
        result.outcome = runner.run(case)
    except Exception as exc:  # a crash is a failed case, reported, not a traceback
        result.failures.append(f"the check raised {type(exc).__name__}: {exc}")
        return result
    if case.expect is not None:
        result.failures.extend(failures(case.expect, result.outcome))
    return result
