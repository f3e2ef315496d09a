"""Handle kinds (MCP 2026-07-28): read from a policy's `handles:` section, and evaluated.

A handle is an id a server mints in a response (a draft id, a job id, a cursor) and the
caller presents in later requests. A kind says where a request presents one (`presented`),
where a response mints one (`minted`, the only expression that sees `response`), what is
stored with it (`bind`), how long it lives, which owner request ends it, and whether a
handle never minted may pass (`unknown`). Evaluation here is pure; the store and the
identity comparison are gateway.session.handles, the order of things gateway.pipeline.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from typing import Any, Protocol

from yaml.nodes import MappingNode, Node, ScalarNode

from gateway.config import parse_duration
from gateway.policy.activation import _timestamp_value
from gateway.policy.engines import CompiledExpression, Expect
from gateway.policy.evaluate import run_expression
from gateway.policy.memo import FusedMemo
from gateway.policy.model import HandleKind, HandleRefusal, Location
from gateway.policy.reads import analyze, header_lookup


class KindReader(Protocol):
    """What reading a kind needs of the policy file's reader (gateway.policy.loader)."""

    def problem(self, node: Node | None, message: str) -> None: ...
    def where(self, node: Node | None) -> Any: ...
    def mapping(
        self, node: Node, allowed: Collection[str], what: str
    ) -> dict[str, tuple[Node, Node]] | None: ...
    def scalar(self, node: Node, what: str) -> str | None: ...
    def integer(self, node: Node, what: str) -> int | None: ...
    def bind_map(
        self, node: Node, what: str, reserved: Collection[str]
    ) -> tuple[list[tuple[str, CompiledExpression]], bool] | None: ...
    def expression(
        self, node: Node, expect: Expect, what: str, *, response: bool = False
    ) -> CompiledExpression | None: ...

KIND_KEYS = {"presented", "minted", "minted_by", "bind", "ttl", "terminate", "unknown", "refusal"}
REFUSAL_KEYS = {"status", "code", "message"}
RESERVED_BOUND_NAMES = frozenset({"kind", "exists", "anonymous", "created_at"})
_KIND_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
_MAX_MESSAGE = 200

# The `handle` variable when the request presents none.
NO_HANDLE: Mapping[str, Any] = {"kind": "", "exists": False, "anonymous": False}


def read_handle_kinds(loader: KindReader, node: Node) -> tuple[HandleKind, ...] | None:
    """The kinds of a `handles:` mapping (kind name → its keys), or None after a problem."""
    if not isinstance(node, MappingNode):
        loader.problem(node, "handles must map kind names to their keys")
        return None
    kinds: list[HandleKind] = []
    seen: set[str] = set()
    ok = True
    for key_node, value_node in node.value:
        name = loader.scalar(key_node, "a handle kind")
        if name is None or not _KIND_NAME.match(name):
            loader.problem(key_node, f"handle kind {name!r} must be 1-64 letters, digits, '-', '_' or '.'")
            ok = False
            continue
        if name in seen:
            loader.problem(key_node, f"duplicate handle kind {name!r}")
            ok = False
            continue
        seen.add(name)
        kind = _read_kind(loader, name, key_node, value_node)
        if kind is None:
            ok = False
        else:
            kinds.append(kind)
    return tuple(kinds) if ok else None


def _read_kind(loader: KindReader, name: str, key_node: Node, node: Node) -> HandleKind | None:
    what = f"handles.{name}"
    fields = loader.mapping(node, KIND_KEYS, what)
    if fields is None:
        return None
    if "presented" not in fields and "minted" not in fields:
        loader.problem(node, f"{what} needs presented, minted or both")
        return None
    ok = True

    def compiled(key: str, expect: Any, *, response: bool = False) -> CompiledExpression | None:
        nonlocal ok
        if key not in fields:
            return None
        result = loader.expression(fields[key][1], expect, f"{what}.{key}", response=response)
        ok = ok and result is not None
        return result

    # `presented` and `minted` are read as any value: a handle that arrives as a number or an
    # object is refused at run time (handle_invalid), never turned into a string.
    presented = compiled("presented", "any")
    if presented is not None and (problem := _header_only(presented.source)):
        loader.problem(fields["presented"][1], f"{what}.presented {problem}")
        ok = False
    minted = compiled("minted", "any", response=True)
    minted_by = compiled("minted_by", "bool")
    terminate = compiled("terminate", "bool")
    bind: list[tuple[str, CompiledExpression]] = []
    if "bind" in fields:
        read = loader.bind_map(fields["bind"][1], f"{what}.bind", RESERVED_BOUND_NAMES)
        if read is None:
            return None
        bind, bind_ok = read
        ok = ok and bind_ok
    ttl = None
    if "ttl" in fields:
        try:
            ttl = parse_duration(_plain(fields["ttl"][1]))
            if ttl <= 0:
                raise ValueError("must be longer than 0")
        except ValueError as exc:
            loader.problem(fields["ttl"][1], f"{what}.ttl: {exc}")
            ok = False
    unknown_allowed = False
    if "unknown" in fields:
        unknown = loader.scalar(fields["unknown"][1], f"{what}.unknown")
        if unknown not in ("deny", "allow"):
            loader.problem(fields["unknown"][1], f"{what}.unknown must be deny or allow, not {unknown!r}")
            ok = False
        unknown_allowed = unknown == "allow"
    refusal = _read_refusal(loader, fields["refusal"][1], what) if "refusal" in fields else HandleRefusal()
    if not ok or refusal is None:
        return None
    argument, header = _direct_read(presented.source if presented is not None else "")
    return HandleKind(
        name=name,
        location=Location(*loader.where(key_node)),
        presented=presented,
        minted=minted,
        minted_by=minted_by,
        bind=tuple(bind),
        ttl=ttl,
        terminate=terminate,
        unknown_allowed=unknown_allowed,
        refusal=refusal,
        argument=argument,
        header=header,
        terminate_memo=_memo_for(terminate),
        minted_by_memo=_memo_for(minted_by),
    )


def _memo_for(expression: CompiledExpression | None) -> FusedMemo | None:
    """A memo of a bool expression's results, when every input is read field by field."""
    if expression is None:
        return None
    reads = analyze(expression.source)
    if not reads.analyzed or any(fields is None for fields in reads.variables.values()):
        return None
    variables = reads.variables
    fields = tuple((name, field) for name in sorted(variables) for field in sorted(variables[name] or ()))
    return FusedMemo(fields, size=1024)


def _remembered(
    expression: CompiledExpression, memo: FusedMemo | None, activation: Any, variables: Mapping[str, Any],
    policy: str, step: str,
) -> bool:
    key = memo.key(policy, variables) if memo is not None else None
    if key is not None and memo is not None:
        known = memo.get(key)
        if known is not None:
            return known == 1
    result = bool(run_expression(expression, activation(), policy, step))
    if key is not None and memo is not None:
        memo.put(key, 1 if result else 0)
    return result


_ARGUMENT_LOOKUP = re.compile(
    r'^\s*"([A-Za-z_][A-Za-z0-9_]*)"\s+in\s+mcp\.arguments\s*\?\s*mcp\.arguments\.([A-Za-z_][A-Za-z0-9_]*)\s*:\s*""\s*$'
)
# Words CEL reserves: never read directly, whatever the form.
_CEL_RESERVED = frozenset({
    "as", "break", "const", "continue", "else", "false", "for", "function", "if", "import", "in",
    "let", "loop", "package", "namespace", "null", "return", "true", "var", "void", "while",
})


def _direct_read(source: str) -> tuple[str | None, str | None]:
    """The argument or header a `presented` of the common form reads, to skip CEL for it."""
    found = _ARGUMENT_LOOKUP.match(source)
    if found and found.group(1) == found.group(2) and found.group(1) not in _CEL_RESERVED:
        return found.group(1), None
    return None, header_lookup(source)


def _plain(node: Node) -> object:
    if isinstance(node, ScalarNode) and node.tag == "tag:yaml.org,2002:int":
        return int(node.value)
    return node.value if isinstance(node, ScalarNode) else node


def _read_refusal(loader: KindReader, node: Node, what: str) -> HandleRefusal | None:
    fields = loader.mapping(node, REFUSAL_KEYS, f"{what}.refusal")
    if fields is None:
        return None
    default = HandleRefusal()
    status = default.status
    if "status" in fields:
        parsed = loader.integer(fields["status"][1], f"{what}.refusal.status")
        if parsed is None or not 400 <= parsed <= 599:
            loader.problem(fields["status"][1], f"{what}.refusal.status must be 400-599")
            return None
        status = parsed
    code = default.code
    if "code" in fields:
        parsed = loader.integer(fields["code"][1], f"{what}.refusal.code")
        if parsed is None or not -(2**31) <= parsed < 2**31:
            loader.problem(fields["code"][1], f"{what}.refusal.code must be a 32-bit integer")
            return None
        code = parsed
    message = default.message
    if "message" in fields:
        given = loader.scalar(fields["message"][1], f"{what}.refusal.message")
        if given is None or not given or len(given) > _MAX_MESSAGE or not given.isprintable():
            loader.problem(
                fields["message"][1], f"{what}.refusal.message must be 1-{_MAX_MESSAGE} printable characters"
            )
            return None
        message = given
    return HandleRefusal(status, code, message)


def kind_expressions(kinds: Iterable[HandleKind]) -> Iterator[CompiledExpression]:
    """Every expression of the kinds. `minted` is among them: what it reads of the request
    (the body, `mcp`) must be read, and refused when unreadable, before the request passes."""
    for kind in kinds:
        if kind.minted is not None:
            yield kind.minted
        if kind.presented is not None:
            yield kind.presented
        if kind.minted_by is not None:
            yield kind.minted_by
        yield from (expression for _, expression in kind.bind)
        if kind.terminate is not None:
            yield kind.terminate


def _header_only(source: str) -> str | None:
    """Why a `presented` that reads an Mcp-Param-* header but not the body cannot be trusted."""
    reads = analyze(source)
    mirrors = [h for h in reads.header_names if h.lower().startswith("mcp-param-")]
    if not mirrors or "mcp" in reads.variables:
        return None
    return (
        f"reads the {mirrors[0]} header but not mcp.arguments: the header only mirrors an argument "
        "and the server acts on the body, so a client that leaves the header out would present its "
        "handle unchecked; read the argument (the header may be compared with it)"
    )


def presented_value(kind: HandleKind, activation: Any, policy: str) -> Any:
    """What the request presents as a handle of this kind: "" for none; anything else as it is
    (a value that is not a string is refused by the caller, never converted)."""
    if kind.presented is None:
        return ""
    return run_expression(kind.presented, activation, policy, f"handles.{kind.name}.presented")


def minted_value(kind: HandleKind, activation: Any, policy: str) -> Any:
    """What a response mints as a handle of this kind: "" for none; the activation holds
    `response`. A runtime error raises PolicyFailure: the response is refused."""
    if kind.minted is None:
        return ""
    return run_expression(kind.minted, activation, policy, f"handles.{kind.name}.minted")


def may_mint(
    kind: HandleKind, activation: Callable[[], Any], variables: Mapping[str, Any], policy: str
) -> bool:
    """Whether this request's response may mint a handle of this kind (only then is it read).
    `activation()` is called only when the expression must run (its result is remembered)."""
    if kind.minted is None:
        return False
    if kind.minted_by is None:
        return True
    step = f"handles.{kind.name}.minted_by"
    return _remembered(kind.minted_by, kind.minted_by_memo, activation, variables, policy, step)


def ends_handle(
    kind: HandleKind, activation: Callable[[], Any], variables: Mapping[str, Any], policy: str
) -> bool:
    if kind.terminate is None:
        return False
    step = f"handles.{kind.name}.terminate"
    return _remembered(kind.terminate, kind.terminate_memo, activation, variables, policy, step)


def handle_bind_values(kind: HandleKind, activation: Any, policy: str) -> dict[str, Any]:
    return {
        name: run_expression(expression, activation, policy, f"handles.{kind.name}.bind.{name}")
        for name, expression in kind.bind
    }


def handle_variable(kind: str, data: Mapping[str, Any], existed: bool) -> dict[str, Any]:
    """The `handle` variable: the bound values, and kind, exists, anonymous, created_at."""
    variable: dict[str, Any] = dict(data.get("bound", {}))
    variable["kind"] = kind
    variable["exists"] = existed
    variable["anonymous"] = bool(data.get("anonymous", False))
    variable["created_at"] = _timestamp_value(float(data.get("created_at", 0.0)))
    return variable


def refusal_reply(refusal: HandleRefusal, request_id: str | int | float | None) -> tuple[str, str]:
    """The exact answer to a refused handle: a JSON-RPC error carrying the request's own id
    (null for a batch or a request without one), so an MCP client raises an ordinary error."""
    error = {"code": refusal.code, "message": refusal.message}
    body = json.dumps({"jsonrpc": "2.0", "id": request_id, "error": error}, separators=(",", ":"))
    return "application/json", body
