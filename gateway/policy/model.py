"""A loaded policy set: plain data holding compiled CEL expressions."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gateway.policy.engines import VARIABLES, CompiledExpression, Engine

if TYPE_CHECKING:
    from gateway.policy.memo import FusedMemo

ALL_ALLOW = -1
ALL_ALLOW_TERMINATE = -2


@dataclass(frozen=True, slots=True)
class Location:
    file: str
    line: int
    column: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


@dataclass(frozen=True, slots=True)
class DenySpec:
    status: int
    reason: str
    claim: str | None = None
    headers: tuple[tuple[str, CompiledExpression], ...] = ()


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    when: CompiledExpression | None
    allow: CompiledExpression
    deny: DenySpec
    location: Location


@dataclass(frozen=True, slots=True)
class SessionSpec:
    key: CompiledExpression
    bind: tuple[tuple[str, CompiledExpression], ...]
    terminate: CompiledExpression | None = None
    # Set when `key` is exactly `"name" in request.headers ? request.headers["name"] : ""`:
    # the key is then read from the headers without evaluating CEL.
    header: str | None = None


@dataclass(frozen=True, slots=True)
class HandleRefusal:
    """What a client gets for a refused handle: a JSON-RPC error that carries the request's
    own id (so an MCP client raises an ordinary error for that call), with this status."""

    status: int = 404
    code: int = -32602
    message: str = "Unknown handle"


@dataclass(frozen=True, slots=True)
class HandleKind:
    """A kind of handle (MCP 2026-07-28): an id a server mints in a response and the caller
    presents in later requests, bound to the identity that got it (gateway.policy.handles)."""

    name: str
    location: Location
    # CEL string over the request: the handle this request presents; "" for none.
    presented: CompiledExpression | None = None
    # CEL string over the request and `response`: the handle the response mints; "" for none.
    minted: CompiledExpression | None = None
    # CEL bool over the request: whether its response may mint (only then is it read).
    minted_by: CompiledExpression | None = None
    bind: tuple[tuple[str, CompiledExpression], ...] = ()
    ttl: float | None = None  # None: the configured handles.ttl
    # CEL bool over the request: the owner's request that ends the handle.
    terminate: CompiledExpression | None = None
    unknown_allowed: bool = False
    refusal: HandleRefusal = HandleRefusal()
    # Set when `presented` is exactly `"x" in mcp.arguments ? mcp.arguments.x : ""` (the
    # argument's name) or `"h" in request.headers ? request.headers["h"] : ""` (the header's):
    # the handle is then read directly, without evaluating CEL. The same value either way.
    argument: str | None = None
    header: str | None = None
    # Remembered results of `terminate` and `minted_by` by the values of the fields they read
    # (CEL is pure); None when they read a value whole.
    terminate_memo: FusedMemo | None = None
    minted_by_memo: FusedMemo | None = None


@dataclass(frozen=True, slots=True)
class Policy:
    name: str
    description: str
    mode: str  # "enforce" | "audit"
    when: CompiledExpression | None
    session: SessionSpec | None
    rules: tuple[Rule, ...]
    location: Location
    # Whether any expression reads the body (request.body or mcp); a partial body then denies.
    uses_body: bool = False
    # All rules (and session.terminate) folded into one expression, evaluated in one call on
    # the hot path: the index of the first denying rule, ALL_ALLOW, or ALL_ALLOW_TERMINATE.
    # Any error in it falls back to rule-by-rule evaluation, which names the failing rule.
    fused: CompiledExpression | None = None
    # Kinds of handle this policy binds (MCP 2026-07-28), in the order declared.
    handles: tuple[HandleKind, ...] = ()

    @property
    def audit(self) -> bool:
        return self.mode == "audit"


@dataclass(frozen=True, slots=True)
class PolicySet:
    policies: tuple[Policy, ...]
    engine: Engine
    files: tuple[str, ...] = ()
    # What the expressions read, so each request's activation holds nothing more: each
    # variable read, with the fields read of it (None: the whole value).
    reads: Mapping[str, frozenset[str] | None] = field(default_factory=lambda: dict.fromkeys(VARIABLES))
    # Fused-expression results by the values of the fields read (see memo.FusedMemo).
    memo: FusedMemo | None = None
    # Whether any policy reads the body or the MCP view: a request whose body the gateway
    # cannot read exactly as a server would is then refused before any policy is judged.
    uses_body: bool = False


class PolicyHolder:
    """The current policy set; reload swaps it in one assignment, so a check sees one whole set."""

    def __init__(self, policies: PolicySet) -> None:
        self._current = policies

    @property
    def current(self) -> PolicySet:
        return self._current

    def swap(self, policies: PolicySet) -> None:
        self._current = policies
