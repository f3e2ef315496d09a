"""Strings and the CEL engines: what the native engine mishandles never reaches it.

cel-expr-python (the `cel` engine) cuts a string passed in an activation at its first NUL
(`"alice\\x00mallory" == "alice"` is true there) and fails on a lone surrogate. The gateway
refuses every such string before an activation is built: in a claim (token_invalid), in
request data (request_invalid), in the body or MCP view when a policy reads them
(request_invalid), in a stored binding (session_legacy_format).

1. The two engines agree on strings rich in control characters (no NUL, no lone surrogate).
2. Through the real Check path, a NUL or lone surrogate put in any one place is a clean
   deny with the expected reason, and no activation of either engine ever holds one; with
   control characters instead, `engine: cel` and `engine: celpy` gateways judge alike.
3. One regression test per attack of the issue.
4. The upstream bug itself, pinned, so that a fixed cel-expr-python is noticed.
"""

from __future__ import annotations

import datetime
import itertools
import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote

import grpc
import pytest
from google.protobuf import timestamp_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import decision
from gateway.config import SessionConfig
from gateway.envoy_api.envoy.config.core.v3 import address_pb2
from gateway.envoy_api.envoy.service.auth.v3 import attribute_context_pb2 as attrs
from gateway.envoy_api.envoy.service.auth.v3 import external_auth_pb2
from gateway.policy.engines import VARIABLES, CelpyEngine, NativeEngine, make_engine
from gateway.policy.loader import default_policy_dir, load_policy_set
from gateway.session.record import new_record, owner_key, valid_session_id
from tests.support.checks import check_request, http_status
from tests.support.inprocess import InProcessGateway
from tests.support.issuer import TestIssuer

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parent.parent
TOOL_SCOPES = REPO / "examples" / "policies" / "tool-scopes"
ENGINES = ("cel", "celpy")

# ------------------------------------------------------------------------------ alphabets

# Control characters of every kind, odd whitespace and separators, non-ASCII letters (some
# that change length under case mapping), astral characters; never NUL, never a surrogate.
RICH = (
    [chr(c) for c in range(0x01, 0x20)]
    + ["\x7f", "\x80", "\x85", "\x9f", "\xa0", "\u2028", "\u2029", "\ufeff", "\u200b", "\u200e"]
    + ["\ufffd", "\uffff", "é", "ß", "İ", "ı", "Ω", "ж", "中", "ﬁ", "\u0301"]
    + ["\U0001f600", "\U00010000", "\U0010ffff", "\U0001d11e", "\U000e0001"]
    + list("azAZ09 -_.:/\\\"',=&%+#?@")
)
rich_char = st.one_of(st.sampled_from(RICH), st.characters(codec="utf-8", exclude_characters="\x00"))
rich_text = st.text(rich_char, max_size=10)
NUL = "\x00"
nul = st.just(NUL)
lone_surrogate = st.integers(0xD800, 0xDFFF).map(chr)


def unsafe(text: str) -> bool:
    """What must never reach an engine: a NUL, or a code point U+D800..U+DFFF."""
    return NUL in text or any(0xD800 <= ord(c) <= 0xDFFF for c in text)


# ============================================================ 1. the engines agree on strings

AGREEMENT_EXPRESSIONS = {
    "equal": "claims.a == claims.b",
    "not-equal": "claims.a != claims.b",
    "equal-literal": 'claims.a == "alice"',
    "equal-across-maps": "session.sub == claims.a",
    "string-map-equal": "mcp.name == claims.b",
    "starts-with": "claims.a.startsWith(claims.b)",
    "ends-with": "claims.a.endsWith(claims.b)",
    "contains": "claims.a.contains(claims.b)",
    "size": "size(claims.a)",
    "size-string-map": "size(mcp.name)",
    "size-of-concatenation": "size(claims.a + claims.b) == size(claims.a) + size(claims.b)",
    "in-list": "claims.a in claims.list",
    "in-literal-list": 'mcp.name in ["echo", "alice", claims.b]',
    "concatenation-equals-literal": '"tools:" + mcp.name == "tools:echo"',
    "concatenation-in-scopes": '("tools:" + mcp.name) in claims.scopes',
    "concatenation-equals-variable": "claims.a + claims.b == session.joined",
    "map-has-key": "claims.a in claims.m",
    "map-lookup": 'claims.a in claims.m ? claims.m[claims.a] : "<missing>"',
    "string-map-lookup": 'claims.a in context ? context[claims.a] : "<missing>"',
    "map-keys-exist": "request.headers.exists(k, k == claims.b)",
    "less-than": "claims.a < claims.b",
    "value": "claims.a",
    "value-concatenated": 'claims.a + "|" + mcp.name',
    "matches-tool-name": 'claims.a.matches("^[A-Za-z0-9_.-]+$")',
    "matches-any-line": 'claims.a.matches("^.*$")',
    "matches-whitespace": 'claims.a.matches("\\\\s")',
    "matches-short": 'claims.a.matches("^.{0,3}$")',
    "matches-letter": 'claims.a.matches("\\\\pL")',
    "matches-control": 'claims.a.matches("[\\\\x{1}-\\\\x{1f}\\\\x{7f}-\\\\x{9f}]")',
}


Compiled = list[tuple[str, Any, list[tuple[str, Any]]]]


@pytest.fixture(scope="module")
def compiled() -> Compiled:
    """Each engine, with every expression compiled once."""
    result: Compiled = []
    for name in ENGINES:
        engine = make_engine(name)
        expressions = [
            (label, engine.compile(source, "any")) for label, source in AGREEMENT_EXPRESSIONS.items()
        ]
        result.append((name, engine, expressions))
    return result


@st.composite
def activations(draw: st.DrawFn) -> dict[str, Any]:
    a = draw(rich_text)
    cut = draw(st.integers(0, len(a)))
    b = draw(
        st.one_of(
            st.just(a),
            rich_text,
            st.just(a[:cut]),  # a prefix: what a cut-short string would look like
            st.just(a[cut:]),
            rich_text.map(lambda extra: a + extra),
            rich_char.map(lambda c: a[:cut] + c + a[cut + 1 :]),
        )
    )
    keys = draw(st.lists(st.one_of(rich_text, st.just(a), st.just(b)), max_size=4, unique=True))
    mapping = {key: draw(rich_text) for key in keys}
    listed = draw(st.lists(st.one_of(rich_text, st.just(a), st.just(b)), max_size=4))
    name = draw(st.one_of(st.just("echo"), rich_text, st.just(a), st.just(b)))
    scopes = draw(st.lists(st.one_of(st.just("tools:echo"), st.just("tools:" + name), rich_text), max_size=3))
    joined = draw(st.one_of(st.just(a + b), st.just(b + a), rich_text))
    return {
        "claims": {"a": a, "b": b, "m": mapping, "list": listed, "scopes": scopes},
        "session": {"sub": b, "joined": joined},
        "mcp": {"method": "tools/call", "name": name, "protocol_version": ""},
        "context": {key: value for key, value in mapping.items()},
        "request": {"headers": {key: "1" for key in keys}},
        "auth": {},
        "source": {"address": "", "principal": ""},
        "now": datetime.datetime.now(datetime.UTC),
    }


def _outcome(expression: Any, activation: Any) -> tuple[str, Any]:
    try:
        return ("value", expression.evaluate(activation))
    except Exception as exc:  # compared across engines: both must fail, or neither
        return ("error", type(exc).__name__)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(variables=activations())
def test_engines_agree_on_strings_with_control_characters(
    compiled: Compiled, variables: dict[str, Any]
) -> None:
    results: dict[str, dict[str, tuple[str, Any]]] = {}
    for name, engine, expressions in compiled:
        activation = engine.activation(variables)
        results[name] = {label: _outcome(expr, activation) for label, expr in expressions}
    disagreements = {
        label: (results["cel"][label], results["celpy"][label])
        for label in AGREEMENT_EXPRESSIONS
        if results["cel"][label] != results["celpy"][label]
    }
    assert not disagreements, f"cel vs celpy on {variables['claims']!r}: {disagreements}"
    # And both are right: what Python says of the same strings.
    claims = variables["claims"]
    a, b = claims["a"], claims["b"]
    assert results["cel"]["equal"] == ("value", a == b)
    assert results["cel"]["size"] == ("value", len(a))
    assert results["cel"]["value"] == ("value", a)
    assert results["cel"]["starts-with"] == ("value", a.startswith(b))
    assert results["cel"]["contains"] == ("value", b in a)
    assert results["cel"]["map-lookup"] == ("value", claims["m"].get(a, "<missing>"))


# ============================================== 2. the property across the whole Check path


class Recorder:
    """Every string (map keys included) in every mapping handed to an engine's activation."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.strings: list[str] = []
        self.timestamps = 0
        self.activations = 0
        self.strange: list[str] = []  # values of a kind no activation should hold

    def clear(self) -> None:
        with self._lock:
            self.strings.clear()
            self.timestamps = 0
            self.activations = 0
            self.strange.clear()

    def record(self, variables: Mapping[str, Any]) -> None:
        found: list[str] = []
        timestamps = 0
        strange: list[str] = []
        stack: list[Any] = [variables]
        while stack:
            item = stack.pop()
            if isinstance(item, str):
                found.append(item)
            elif isinstance(item, Mapping):
                for key, value in item.items():
                    stack.append(key)
                    stack.append(value)
            elif isinstance(item, list | tuple):
                stack.extend(item)
            elif isinstance(item, datetime.datetime | timestamp_pb2.Timestamp):
                timestamps += 1  # `now`, and a session's created_at
            elif item is None or isinstance(item, bool | int | float):
                pass
            else:
                strange.append(type(item).__name__)
        with self._lock:
            self.activations += 1
            self.strings.extend(found)
            self.timestamps += timestamps
            self.strange.extend(strange)

    def unsafe_strings(self) -> list[str]:
        with self._lock:
            return [s for s in self.strings if unsafe(s)]

    def saw(self, text: str, *, inside: bool = False) -> bool:
        with self._lock:
            return any((text in s) if inside else (text == s) for s in self.strings)


@pytest.fixture(scope="module")
def recorder() -> Iterator[Recorder]:
    """Wraps both engines' `activation` (the one door into an engine) for the whole module."""
    seen = Recorder()
    with pytest.MonkeyPatch.context() as patch:
        for engine_class in (NativeEngine, CelpyEngine):
            original = engine_class.activation

            def recording(self: Any, variables: Mapping[str, Any], _original: Any = original) -> Any:
                seen.record(variables)
                return _original(self, variables)

            patch.setattr(engine_class, "activation", recording)
        yield seen


# Every string a request can fill is judged by a rule here (JUDGE), and every variable is
# read whole, so each value reaches the activation. JUDGE mixes ==, startsWith, endsWith,
# contains and size, so that control characters give both outcomes. Written with `? :`
# (lazy in cel-python, where `||` and `&&` evaluate both sides) and each rule gated by a
# `when`, so that the celpy gateway stays fast enough for a few hundred examples.
JUDGE = (
    '(@ == "reader" ? true : (@.startsWith("ok:") ? true'
    ' : size(@) % 2 == 0 && !@.contains("\\u2028") && !@.endsWith("\\u0085")))'
)
TOOL_NAME_PLAIN = '!mcp.name.matches("[\\\\s\\\\x{7f}]")'


def judge_in_python(text: str) -> bool:
    """JUDGE, as Python reads it."""
    return (
        text == "reader"
        or text.startswith("ok:")
        or (len(text) % 2 == 0 and "\u2028" not in text and not text.endswith("\x85"))
    )


def _judged(accessor: str) -> str:
    return JUDGE.replace("@", accessor)


def _all_keys(variable: str, prefix: str) -> str:
    return f'{variable}.all(k, k.startsWith("{prefix}") ? {_judged("k")} : true)'


# reason: (when, allow)
_JUDGED_RULES = {
    "judged_header_value": ('"x-tag" in request.headers', _judged('request.headers["x-tag"]')),
    "judged_header_name": ('"x-names" in request.headers', _all_keys("request.headers", "x-n-")),
    "judged_query_value": ('"q" in request.query', _judged('request.query["q"]')),
    "judged_query_key": ('"names" in request.query', _all_keys("request.query", "k-")),
    "judged_path": ('request.path != "/mcp"', _judged("request.path")),
    "judged_host": ('request.host != "mcp.example.test"', _judged("request.host")),
    "judged_method": ('request.method != "POST"', _judged("request.method")),
    "judged_context_value": ('"tag" in context', _judged('context["tag"]')),
    "judged_context_key": ('"names" in context', _all_keys("context", "k-")),
    "judged_principal": ('source.principal != "spiffe://ok/client"', _judged("source.principal")),
    "judged_address": ('source.address != "10.0.0.7"', _judged("source.address")),
    "judged_tool_name": (
        'mcp.method == "tools/call" && mcp.name != "echo"',
        _judged("mcp.name") + " && " + TOOL_NAME_PLAIN,
    ),
    "insufficient_scope": ('mcp.method == "tools/call"', '("tools:" + mcp.name) in auth.scopes'),
    "judged_claim_tier": ('"tier" in claims', _judged("claims.tier")),
    "judged_claim_nested": ('"org" in claims', f"claims.org.team.all(t, {_judged('t')})"),
    "judged_claim_key": ('"names" in claims', _all_keys("claims", "k-")),
}

READS_EVERYTHING = """\
name: reads-everything
description: Reads every variable whole, and judges the strings of every place a request fills.
when: 'true'
rules:
  - name: everything-is-read
    allow: >-
      size(request) + size(mcp) + size(context) + size(source) + size(claims) + size(auth)
      + size(session) + size(handle) > 0 && now > timestamp("2020-01-01T00:00:00Z")
    deny: {status: 403, reason: not_everything_read}
""" + "".join(
    f"  - name: {reason.replace('_', '-')}\n"
    f"    when: {json.dumps(when)}\n"
    f"    allow: {json.dumps(allow)}\n"
    f"    deny: {{status: 403, reason: {reason}}}\n"
    for reason, (when, allow) in _JUDGED_RULES.items()
)


@dataclass(frozen=True)
class Req:
    """One CheckRequest as Envoy would send it; every default passes every rule."""

    sub: str = "alice"
    claims: Mapping[str, Any] = field(default_factory=dict)
    method: str = "POST"
    path: str = "/mcp"
    host: str = "mcp.example.test"
    scheme: str = "https"
    request_id: str = "req-1"
    headers: Mapping[str, str] = field(default_factory=dict)
    raw_headers: tuple[tuple[str, bytes], ...] = ()
    context: Mapping[str, str] = field(default_factory=lambda: {"route": "reader"})
    principal: str = "spiffe://ok/client"
    address: str = "10.0.0.7"
    tool: str = "echo"
    arguments: Any = field(default_factory=lambda: {"text": "hi"})
    body: str | None = None  # replaces the JSON-RPC call built from tool and arguments
    session_id: str = "s-alice"
    bound: Mapping[str, Any] | None = None  # written into the store under session_id first

    def json_body(self) -> str:
        if self.body is not None:
            return self.body
        call = {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "tools/call",
            "params": {"name": self.tool, "arguments": self.arguments},
        }
        return json.dumps(call)  # ensure_ascii: a NUL or a surrogate goes as a \\u escape


def build(req: Req, idp: TestIssuer) -> external_auth_pb2.CheckRequest:
    token = idp.token(req.sub, **{"scope": "mcp tools:echo", **req.claims})
    headers = {
        ":method": req.method,
        ":path": req.path,
        ":authority": req.host,
        "content-type": "application/json",
        "authorization": f"Bearer {token}",
        "mcp-session-id": req.session_id,
        **req.headers,
    }
    http = attrs.AttributeContext.HttpRequest(
        id=req.request_id,
        method=req.method,
        path=req.path,
        host=req.host,
        scheme=req.scheme,
        headers=headers,
        # As Envoy sends it with pack_as_bytes: true (the text field turns bytes into "!").
        raw_body=req.json_body().encode("utf-8"),
        protocol="HTTP/1.1",
    )
    for key, raw in req.raw_headers:
        http.header_map.headers.add(key=key, raw_value=raw)
    source = attrs.AttributeContext.Peer(
        address=address_pb2.Address(
            socket_address=address_pb2.SocketAddress(address=req.address, port_value=443)
        ),
        principal=req.principal,
    )
    return external_auth_pb2.CheckRequest(
        attributes=attrs.AttributeContext(
            source=source,
            request=attrs.AttributeContext.Request(http=http),
            context_extensions=dict(req.context),
        )
    )


def _query_bytes(text: str) -> str:
    # %-escapes of the UTF-8 bytes; a lone surrogate becomes the bytes ED A0 80 etc.
    return quote(text.encode("utf-8", "surrogatepass"), safe="")


def _alice_or(value: str) -> str:
    return "allowed" if value == "alice" else "subject_mismatch"


def _stays(_: str) -> str:
    return "allowed"


def _tool_outcome(name: str) -> str:
    if name == "echo":
        return "allowed"
    if not judge_in_python(name) or any(c in "\t\n\f\r \x7f" for c in name):
        return "judged_tool_name"
    return "insufficient_scope"  # the token's scopes grant tools:echo only


def _judged_as(reason: str, transform: Callable[[str], str] = lambda v: v) -> Callable[[str], str]:
    return lambda value: "allowed" if judge_in_python(transform(value)) else reason


# kinds: which unsafe characters the place can carry at all (a protobuf string is UTF-8, so
# a lone surrogate only comes as a JSON escape, a %-escape, or raw header bytes).
CLAIMS, REQUEST, STORED = decision.TOKEN_INVALID, decision.REQUEST_INVALID, decision.SESSION_LEGACY_FORMAT
BOTH, NUL_ONLY = ("nul", "surrogate"), ("nul",)


@dataclass(frozen=True)
class Place:
    name: str
    make: Callable[[str], Req]
    refusal: str  # the reason of a NUL or a lone surrogate here
    kinds: tuple[str, ...]
    # Python's judgement of a request with only this value changed (None: the engines need only agree)
    expect: Callable[[str], str] | None
    # The string that must reach the activation for a safe value (None: refused before any).
    witness: Callable[[str], str] | None
    witness_inside: bool = False  # witness is a part of a recorded string (the body)
    fragment: Callable[[str], str] = lambda text: text  # what the place accepts of a fragment
    values: st.SearchStrategy[str] = rich_text


def _json_inner(text: str) -> str:
    return json.dumps(text)[1:-1]


def _no_controls(text: str) -> str:
    """A token's sub may hold no C0 control or DEL (it goes upstream as a header): refused
    with token_invalid, tested on its own below."""
    return "".join(c for c in text if c >= " " and c != "\x7f")


_subjects = st.one_of(
    st.just("alice"),
    rich_text.map(lambda extra: "alice" + extra),  # the shape of the NUL attack, without the NUL
    rich_text.map(lambda extra: extra + "alice"),
    rich_char.map(lambda c: "alic" + c),
    rich_text.filter(bool),
)

PLACES = [
    Place(
        "claim-sub", lambda v: Req(sub=v), CLAIMS, BOTH, _alice_or, lambda v: v,
        fragment=_no_controls, values=_subjects.map(_no_controls).filter(bool),
    ),
    Place(
        "claim-custom",
        lambda v: Req(claims={"tier": v}),
        CLAIMS,
        BOTH,
        _judged_as("judged_claim_tier"),
        lambda v: v,
    ),
    Place(
        "claim-nested",
        lambda v: Req(claims={"org": {"team": ["ok:admins", v]}}),
        CLAIMS,
        BOTH,
        _judged_as("judged_claim_nested"),
        lambda v: v,
    ),
    Place(
        "claim-key",
        lambda v: Req(claims={"names": True, "k-" + v: "x"}),
        CLAIMS,
        BOTH,
        _judged_as("judged_claim_key", lambda v: "k-" + v),
        lambda v: "k-" + v,
    ),
    Place(
        "claim-nested-key",
        lambda v: Req(claims={"org": {"team": [], "k-" + v: 1}}),
        CLAIMS,
        BOTH,
        _stays,
        lambda v: "k-" + v,
    ),
    Place(
        "claim-scope", lambda v: Req(claims={"scope": "mcp tools:echo tools:" + v}), CLAIMS, BOTH, None, None
    ),
    Place(
        "header-value",
        lambda v: Req(headers={"x-tag": v}),
        REQUEST,
        NUL_ONLY,
        _judged_as("judged_header_value"),
        lambda v: v,
    ),
    Place(
        "header-name",
        lambda v: Req(headers={"x-names": "1", "x-n-" + v: "1"}),
        REQUEST,
        NUL_ONLY,
        _judged_as("judged_header_name", lambda v: ("x-n-" + v).lower()),
        lambda v: ("x-n-" + v).lower(),
    ),
    Place(
        "header-raw-bytes",
        lambda v: Req(raw_headers=(("x-tag", v.encode("utf-8", "surrogatepass")),)),
        REQUEST,
        BOTH,
        _judged_as("judged_header_value"),
        lambda v: v,
    ),
    Place(
        "query-value",
        lambda v: Req(path="/mcp?q=" + _query_bytes(v)),
        REQUEST,
        BOTH,
        _judged_as("judged_query_value"),
        lambda v: v,
    ),
    Place(
        "query-key",
        lambda v: Req(path="/mcp?names=1&" + _query_bytes("k-" + v) + "=1"),
        REQUEST,
        BOTH,
        _judged_as("judged_query_key", lambda v: "k-" + v),
        lambda v: "k-" + v,
    ),
    Place(
        "path",
        lambda v: Req(path="/mcp/" + v),
        REQUEST,
        NUL_ONLY,
        _judged_as("judged_path", lambda v: "/mcp/" + v),
        lambda v: "/mcp/" + v,
        fragment=lambda text: text.replace("?", ""),
    ),
    Place(
        "host",
        lambda v: Req(host="mcp" + v),
        REQUEST,
        NUL_ONLY,
        _judged_as("judged_host", lambda v: "mcp" + v),
        lambda v: "mcp" + v,
    ),
    Place(
        "method",
        lambda v: Req(method="POST" + v),
        REQUEST,
        NUL_ONLY,
        _judged_as("judged_method", lambda v: ("POST" + v).upper()),
        lambda v: ("POST" + v).upper(),
    ),
    Place(
        "context-value",
        lambda v: Req(context={"route": "reader", "tag": v}),
        REQUEST,
        NUL_ONLY,
        _judged_as("judged_context_value"),
        lambda v: v,
    ),
    Place(
        "context-key",
        lambda v: Req(context={"route": "reader", "names": "1", "k-" + v: "x"}),
        REQUEST,
        NUL_ONLY,
        _judged_as("judged_context_key", lambda v: "k-" + v),
        lambda v: "k-" + v,
    ),
    Place(
        "source-principal",
        lambda v: Req(principal=v),
        REQUEST,
        NUL_ONLY,
        _judged_as("judged_principal"),
        lambda v: v,
    ),
    Place(
        "source-address",
        lambda v: Req(address=v),
        REQUEST,
        NUL_ONLY,
        _judged_as("judged_address"),
        lambda v: v,
    ),
    Place("tool-name", lambda v: Req(tool=v), REQUEST, BOTH, _tool_outcome, lambda v: v),
    Place(
        "tool-argument",
        lambda v: Req(arguments={"text": v}),
        REQUEST,
        BOTH,
        _stays,
        _json_inner,
        witness_inside=True,
    ),
    Place(
        "tool-argument-key",
        lambda v: Req(arguments={"k-" + v: "hi"}),
        REQUEST,
        BOTH,
        _stays,
        lambda v: _json_inner("k-" + v),
        witness_inside=True,
    ),
    Place(
        "tool-argument-nested",
        lambda v: Req(arguments={"list": [{"deep": [v]}]}),
        REQUEST,
        BOTH,
        _stays,
        _json_inner,
        witness_inside=True,
    ),
    Place(
        # The character itself in the body text, not a JSON escape: invalid JSON anyway.
        "body-raw",
        lambda v: Req(
            body='{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo' + v + '"}}'
        ),
        REQUEST,
        NUL_ONLY,
        None,
        None,
    ),
    Place(
        "mcp-name-header",
        lambda v: Req(headers={"mcp-name": v}),
        REQUEST,
        NUL_ONLY,
        lambda v: "allowed" if v == "echo" else "mcp_header_mismatch",
        None,
        values=st.one_of(st.just("echo"), rich_text),
    ),
    Place("scheme", lambda v: Req(scheme="https" + v), REQUEST, NUL_ONLY, _stays, lambda v: "https" + v),
    Place(
        "request-id", lambda v: Req(request_id="req-" + v), REQUEST, NUL_ONLY, _stays, lambda v: "req-" + v
    ),
    Place(
        "session-id",
        lambda v: Req(session_id="sid-" + v),
        REQUEST,
        NUL_ONLY,
        lambda v: (
            "allowed" if valid_session_id("sid-" + v, SessionConfig().max_id_length) else "session_id_invalid"
        ),
        None,  # reaches the activation only when it is a valid id: visible ASCII
    ),
    Place(
        "rpc-method",
        lambda v: Req(body=json.dumps({"jsonrpc": "2.0", "id": 1, "method": v})),
        REQUEST,
        BOTH,
        lambda v: _tool_outcome("") if v == "tools/call" else "allowed",
        lambda v: v,
    ),
    Place(
        "rpc-id",
        lambda v: Req(body=json.dumps({"jsonrpc": "2.0", "id": v, "method": "tools/list"})),
        REQUEST,
        BOTH,
        _stays,
        _json_inner,
        witness_inside=True,
    ),
    Place(
        "protocol-version",
        lambda v: Req(
            body=json.dumps(
                {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": v}}
            )
        ),
        REQUEST,
        BOTH,
        _stays,
        lambda v: v,
    ),
    Place(
        "batch-tool-name",
        lambda v: Req(
            body=json.dumps(
                [
                    {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "echo"}},
                    {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": v}},
                ]
            )
        ),
        REQUEST,
        BOTH,
        _tool_outcome,
        lambda v: v,
    ),
    Place(
        "stored-bound-sub",
        lambda v: Req(bound={"sub": v}),
        STORED,
        BOTH,
        _alice_or,
        lambda v: v,
        values=_subjects,
    ),
    Place("stored-bound-value", lambda v: Req(bound={"team": v}), STORED, BOTH, _stays, lambda v: v),
    Place("stored-bound-key", lambda v: Req(bound={"k-" + v: 1}), STORED, BOTH, _stays, lambda v: "k-" + v),
    Place(
        "stored-bound-nested",
        lambda v: Req(bound={"team": {"members": ["ok", v]}}),
        STORED,
        BOTH,
        _stays,
        lambda v: v,
    ),
]
PLACES_BY_NAME = {place.name: place for place in PLACES}


class World:
    """A `cel` and a `celpy` gateway over the same policies, keys and requests."""

    def __init__(self, tmp: Path, recorder: Recorder) -> None:
        self.recorder = recorder
        self.idp = TestIssuer("ES256", serve=False, name="idp")
        jwks = self.idp.write_jwks(tmp / "jwks.json")
        policies = tmp / "policies"
        policies.mkdir()
        shutil.copy(default_policy_dir() / "10-mcp-session-binding.yaml", policies)
        (policies / "20-reads-everything.yaml").write_text(READS_EVERYTHING)
        self.gateways = {
            engine: InProcessGateway(
                {
                    "engine": engine,
                    "policies": str(policies),
                    "store": "memory://",
                    "session": {"max_per_identity": 1_000_000},
                    "auth": {"issuers": [self.idp.issuer_config(jwks_file=jwks)]},
                },
                tmp,
            )
            for engine in ENGINES
        }
        self._ids = itertools.count()
        for engine in ENGINES:
            assert self.send(engine, Req()) == (True, "allowed", 200), "the clean request must pass"

    def fresh_session(self) -> str:
        return f"stored-{next(self._ids)}"

    def send(self, engine: str, req: Req) -> tuple[bool, str, int]:
        gateway = self.gateways[engine]
        if req.bound is not None:
            now = time.time()
            bound = {"iss": self.idp.issuer, "sub": "alice", **req.bound}
            record = new_record(
                anonymous=False, bound=bound, owner=owner_key(self.idp.issuer, "alice"), now=now
            )
            gateway.gateway.store.replace(req.session_id, record, now)
        response = gateway.client.check(build(req, self.idp))
        last = gateway.last
        assert http_status(response) == (200 if last.allowed else last.status)
        return last.allowed, last.reason, http_status(response)

    def stop(self) -> None:
        for gateway in self.gateways.values():
            gateway.stop()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, recorder: Recorder) -> Iterator[World]:
    environment = World(tmp_path_factory.mktemp("cel-strings"), recorder)
    yield environment
    environment.stop()


def _prepared(world: World, place: Place, value: str) -> Req:
    req = place.make(value)
    if req.bound is not None:
        req = replace(req, session_id=world.fresh_session())  # a record of its own
    return req


@st.composite
def injections(draw: st.DrawFn) -> tuple[Place, str, str]:
    """A place, a value holding one NUL or lone surrogate there, and its safe twin."""
    place = draw(st.sampled_from(PLACES))
    bad = draw(st.one_of(nul, lone_surrogate) if "surrogate" in place.kinds else nul)
    prefix = place.fragment(draw(rich_text))
    suffix = place.fragment(draw(rich_text))
    if place.name in ("claim-sub", "stored-bound-sub"):
        prefix = "alice" + prefix  # the attack: a subject that starts as the victim's
    twin = "\u2028" if place.name == "claim-sub" else "\x01"
    return place, prefix + bad + suffix, prefix + twin + suffix


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(injection=injections(), engine=st.sampled_from(ENGINES))
def test_unsafe_strings_never_reach_an_engine(
    world: World, injection: tuple[Place, str, str], engine: str
) -> None:
    place, value, twin = injection
    recorder = world.recorder
    recorder.clear()
    outcome = world.send(engine, _prepared(world, place, value))
    unsafe_seen = recorder.unsafe_strings()
    assert outcome == (False, place.refusal, decision.STATUS_OF[place.refusal]), (
        f"{place.name} = {value!r} on {engine}: expected a clean {place.refusal} deny, got {outcome}"
    )
    assert not unsafe_seen, f"{place.name} = {value!r} reached a {engine} activation: {unsafe_seen!r}"
    assert not recorder.strange, recorder.strange

    # The twin (the NUL or surrogate replaced by \x01) does reach the activation: the place
    # is read by a policy, so the refusal above is what kept the bad value out.
    recorder.clear()
    twin_outcome = world.send(engine, _prepared(world, place, twin))
    assert twin_outcome[1] not in (decision.INTERNAL_ERROR, decision.POLICY_ERROR), (
        place.name,
        twin,
        twin_outcome,
    )
    if place.witness is not None:
        assert recorder.saw(place.witness(twin), inside=place.witness_inside), (
            f"{place.name}: the safe twin {twin!r} never reached the activation: no policy reads it"
        )
        assert recorder.timestamps > 0  # `now` (and created_at): the walk does see the timestamps
    assert not recorder.unsafe_strings()


@st.composite
def safe_values(draw: st.DrawFn) -> tuple[Place, str]:
    place = draw(st.sampled_from(PLACES))
    return place, place.fragment(draw(place.values))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=safe_values())
def test_control_characters_are_judged_alike_by_both_engines(world: World, case: tuple[Place, str]) -> None:
    place, value = case
    world.recorder.clear()
    req = _prepared(world, place, value)
    outcomes = {engine: world.send(engine, req) for engine in ENGINES}
    assert outcomes["cel"] == outcomes["celpy"], f"{place.name} = {value!r}: {outcomes}"
    allowed, reason, _ = outcomes["cel"]
    assert reason not in (decision.INTERNAL_ERROR, decision.POLICY_ERROR), (place.name, value, reason)
    if place.expect is not None:
        assert reason == place.expect(value), (
            f"{place.name} = {value!r}: {reason}, Python says {place.expect(value)}"
        )
    if place.witness is not None:
        assert world.recorder.saw(place.witness(value), inside=place.witness_inside), (place.name, value)
    assert not world.recorder.unsafe_strings()


@pytest.mark.parametrize("engine_name", ENGINES)
def test_the_policy_set_reads_every_variable_whole(engine_name: str) -> None:
    """Otherwise the activations would hold only some fields, and the property above would
    say nothing of the others."""
    binding = default_policy_dir() / "10-mcp-session-binding.yaml"
    policy_set = load_policy_set(
        [(str(binding), binding.read_text()), ("20-reads-everything.yaml", READS_EVERYTHING)], engine_name
    )
    # `response` is known only to a handle kind's `minted`, never to a request's activation.
    expected = dict.fromkeys(v for v in VARIABLES if v != "response")
    assert dict(policy_set.reads) == expected, policy_set.reads
    assert policy_set.uses_body
    assert all(policy.fused is not None for policy in policy_set.policies)


def test_nul_in_source_address_is_refused(world: World) -> None:
    """`source.address` reaches every policy that reads `source`, like `source.principal`.

    With "10.0.0.7\x00evil" the native engine sees "10.0.0.7": the rule gated on
    `source.address != "10.0.0.7"` is skipped there and the request is allowed, while
    cel-python judges the whole string and denies. It must be refused before either.
    """
    outcomes = {engine: world.send(engine, Req(address="10.0.0.7\x00evil")) for engine in ENGINES}
    expected = (False, decision.REQUEST_INVALID, 400)
    assert outcomes == dict.fromkeys(ENGINES, expected), (
        f"a NUL in the CheckRequest's source address is not refused: {outcomes}"
    )


# =================================================== 3. one regression test per attack


class Env:
    def __init__(self, tmp: Path, policies: Path, engine: str) -> None:
        self.idp = TestIssuer("ES256", serve=False, name="idp")
        self.gateway = InProcessGateway(
            {
                "engine": engine,
                "policies": str(policies),
                "store": "memory://",
                "auth": {
                    "issuers": [self.idp.issuer_config(jwks_file=self.idp.write_jwks(tmp / "jwks.json"))]
                },
            },
            tmp,
        )

    def check(self, body: str | None = None, **kwargs: Any) -> external_auth_pb2.CheckResponse:
        if body is None:
            body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
        return self.gateway.client.check(check_request(body=body, **kwargs))

    @property
    def reason(self) -> str:
        return self.gateway.last.reason

    def stored(self, session_id: str) -> Mapping[str, Any] | None:
        loaded = self.gateway.gateway.store.load(session_id, time.time())
        return None if loaded is None else loaded.data


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def default_env(tmp_path: Path, engine: str) -> Iterator[Env]:
    env = Env(tmp_path, default_policy_dir(), engine)
    yield env
    env.gateway.stop()


@pytest.fixture
def tools_env(tmp_path: Path, engine: str) -> Iterator[Env]:
    env = Env(tmp_path, TOOL_SCOPES, engine)
    yield env
    env.gateway.stop()


def tool_call(name: str) -> str:
    return json.dumps({"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": name}})


def test_nul_in_sub_is_refused_and_never_reaches_alices_session(default_env: Env, recorder: Recorder) -> None:
    env = default_env
    alice = env.idp.token("alice")
    assert http_status(env.check(token=alice, session_id="s-1")) == 200
    before = env.stored("s-1")
    assert before is not None and before["bound"]["sub"] == "alice"

    recorder.clear()
    response = env.check(token=env.idp.token("alice\x00mallory"), session_id="s-1")
    assert http_status(response) == 401
    assert env.reason == decision.TOKEN_INVALID
    assert recorder.activations == 0, "the token was refused, yet a policy was evaluated"
    assert not recorder.saw("mallory", inside=True)
    # The session is untouched (not ended, not re-bound) and alice keeps it.
    assert env.stored("s-1") == before
    assert http_status(env.check(token=alice, session_id="s-1")) == 200


@pytest.mark.parametrize(
    "subject", ["\ud800", "alice\udfff", "\ud83dalice"], ids=["alone", "trailing", "leading"]
)
def test_lone_surrogate_in_sub_is_token_invalid_not_a_grpc_error(
    default_env: Env, recorder: Recorder, subject: str
) -> None:
    recorder.clear()
    try:
        response = default_env.check(token=default_env.idp.token(subject), session_id="s-2")
    except grpc.RpcError as exc:  # pragma: no cover - the failure this test guards against
        pytest.fail(f"the gateway answered a gRPC error instead of a deny: {exc}")
    assert http_status(response) == 401
    assert default_env.reason == decision.TOKEN_INVALID
    assert recorder.activations == 0
    assert default_env.stored("s-2") is None


@pytest.mark.parametrize(
    "body, headers",
    [
        (tool_call("echo\x00xyz"), {}),  # the \u0000 JSON escape
        (tool_call("echo").replace('"echo"', '"echo\x00xyz"'), {}),  # a raw NUL in the body
        # in the Mcp-Name header, with and without a body
        (tool_call("echo"), {"mcp-name": "echo\x00xyz", "mcp-method": "tools/call"}),
        ("", {"mcp-name": "echo\x00xyz", "mcp-method": "tools/call", "mcp-protocol-version": "2026-07-28"}),
    ],
    ids=["json-escape", "raw-nul", "mcp-name-header", "mcp-name-header-no-body"],
)
def test_nul_in_tool_name_is_refused_by_tool_scopes(
    tools_env: Env, recorder: Recorder, body: str, headers: dict[str, str]
) -> None:
    env = tools_env
    token = env.idp.token("alice", scope="mcp tools:echo")
    # The allow-list as it should work: echo passes, echoxyz does not.
    assert http_status(env.check(token=token, body=tool_call("echo"))) == 200
    assert http_status(env.check(token=token, body=tool_call("echoxyz"))) == 403
    assert env.reason == "insufficient_scope"

    recorder.clear()
    response = env.check(token=token, body=body, headers=headers)
    assert (http_status(response), env.reason) == (400, decision.REQUEST_INVALID), env.gateway.last
    assert not recorder.unsafe_strings()


def test_a_body_no_policy_reads_is_neither_parsed_nor_refused(default_env: Env, recorder: Recorder) -> None:
    """By design: the default policies never read the body, so a NUL escape in it is no one's
    concern (the upstream sees the body as sent) and it never reaches an activation."""
    recorder.clear()
    response = default_env.check(token=default_env.idp.token("alice"), body=tool_call("echo\x00xyz"))
    assert (http_status(response), default_env.reason) == (200, decision.ALLOWED)
    assert recorder.activations > 0
    assert not recorder.unsafe_strings()
    assert not recorder.saw("xyz", inside=True)


@pytest.mark.parametrize("name", ["\ud800", "echo\udfff", "\udbff\udbffecho"])
def test_lone_surrogate_in_tool_name_is_request_invalid(
    tools_env: Env, recorder: Recorder, name: str
) -> None:
    recorder.clear()
    response = tools_env.check(token=tools_env.idp.token("alice", scope="tools:*"), body=tool_call(name))
    assert (http_status(response), tools_env.reason) == (400, decision.REQUEST_INVALID), (
        tools_env.gateway.last
    )
    assert not recorder.unsafe_strings()


@pytest.mark.parametrize(
    "bound",
    [
        {"sub": "alice\x00mallory"},
        {"sub": "alice\x00"},
        {"sub": "alice\ud800"},
        {"team": ["x\x00"]},
        {"k\x00": 1},
    ],
    ids=["sub-nul", "sub-trailing-nul", "sub-surrogate", "nested-nul", "key-nul"],
)
def test_stored_binding_holding_a_nul_is_refused_as_legacy(
    default_env: Env, recorder: Recorder, bound: dict[str, Any]
) -> None:
    env = default_env
    now = time.time()
    record = new_record(
        anonymous=False,
        bound={"iss": env.idp.issuer, "sub": "alice", **bound},
        owner=owner_key(env.idp.issuer, "alice"),
        now=now,
    )
    env.gateway.gateway.store.replace("s-legacy", record, now)
    recorder.clear()
    alice = env.idp.token("alice")
    response = env.check(token=alice, session_id="s-legacy")
    assert (http_status(response), env.reason) == (404, decision.SESSION_LEGACY_FORMAT)
    assert not recorder.unsafe_strings()
    # Invalidated on read, never re-bound: the id stays refused.
    stored = env.stored("s-legacy")
    assert stored is not None and stored.get("terminated") is True and stored.get("bound") == {}
    assert http_status(env.check(token=alice, session_id="s-legacy")) == 404


# ================================================================ 4. the upstream bug, pinned


def test_upstream_bug_pinned_cel_expr_python_cuts_activation_strings_at_nul() -> None:
    """Pins an upstream bug in cel-expr-python that the gateway works around.

    cel-expr-python 0.1.3 converts a Python str in an activation to a C++ string through a
    C string, so the value ends at its first NUL, and a lone surrogate (which has no UTF-8)
    arrives as a null pointer. Minimal reproducer:

        from cel_expr_python import cel
        env = cel.NewEnv(variables={"s": cel.Type.STRING})
        env.compile('s == "alice"').eval(env.Activation({"s": "alice\\x00mallory"})).plain_value()
        # -> True;  size(s) -> 5;  with {"s": "\\ud800"}: RuntimeError
        #    "basic_string: construction from null is not valid"

    A NUL in a CEL string literal is kept (`size("a\\u0000b")` is 3): only activation values
    are cut. The gateway's guard (gateway/text.py, and the refusals in the verifier, request,
    MCP view and session record) keeps every such string out of the engine. This test fails
    when upstream changes, so that someone looks: the guard may (and should) be kept.
    """
    from importlib.metadata import version

    from cel_expr_python import cel

    installed = version("cel-expr-python")
    env = cel.NewEnv(variables={"s": cel.Type.STRING, "m": cel.Type.Map(cel.Type.STRING, cel.Type.DYN)})

    def run(source: str, variables: dict[str, Any]) -> Any:
        return env.compile(source).eval(env.Activation(variables)).plain_value()

    fixed = (
        f"cel-expr-python {installed} no longer behaves as the pinned bug ({{}}). Upstream may "
        "have fixed it: update this test to assert the fixed behaviour. Keep the gateway's guard "
        "(gateway/text.py safe_text and its callers) anyway: it costs little and protects "
        "deployments on older versions."
    )
    observed = {
        "equal": run('s == "alice"', {"s": "alice\x00mallory"}),
        "size": run("size(s)", {"s": "alice\x00mallory"}),
        "value": run("s", {"s": "alice\x00mallory"}),
        "in-a-map": run('m.sub == "alice"', {"m": {"sub": "alice\x00mallory"}}),
        "literal": run('size("a\\u0000b")', {"s": ""}),
    }
    expected = {"equal": True, "size": 5, "value": "alice", "in-a-map": True, "literal": 3}
    if observed != expected:
        pytest.fail(fixed.format(f"NUL: observed {observed}, the bug gave {expected}"))
    try:
        surrogate = run("size(s)", {"s": "\ud800"})
    except RuntimeError as exc:
        if "construction from null" not in str(exc):
            pytest.fail(fixed.format(f"a lone surrogate now raises {exc!r}"))
    else:
        pytest.fail(fixed.format(f"a lone surrogate now evaluates, size(s) = {surrogate!r}"))
    # cel-python, the other engine, has no such bug: the whole string is compared.
    celpy = make_engine("celpy")
    assert (
        celpy.compile('claims.sub == "alice"', "bool").evaluate(
            celpy.activation({"claims": {"sub": "alice\x00mallory"}})
        )
        is False
    )


@pytest.mark.parametrize("subject", ["alice\r\nx-admin: 1", "alice\x01", "alice\x7f", "\talice"])
def test_a_sub_with_control_characters_is_token_invalid(default_env: Env, subject: str) -> None:
    """The sub goes upstream as the x-authz-subject header, where CR/LF would split it."""
    response = default_env.check(token=default_env.idp.token(subject))
    assert (http_status(response), default_env.reason) == (401, decision.TOKEN_INVALID)
