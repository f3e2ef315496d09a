"""A loaded policy set: plain data holding compiled CEL expressions."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.policy.engines import CompiledExpression, Engine


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

    @property
    def audit(self) -> bool:
        return self.mode == "audit"


@dataclass(frozen=True, slots=True)
class PolicySet:
    policies: tuple[Policy, ...]
    engine: Engine
    files: tuple[str, ...] = ()
