"""What one check gathers as it goes, handed from step to step: the variables, the sessions and
handles found, the audit denies, and what ends once every policy has allowed."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from gateway.decision import AuditDeny, Decision
from gateway.identity.verifier import Identity
from gateway.mcp import McpCall
from gateway.policy.activation import Activations, Once
from gateway.policy.evaluate import Tracer
from gateway.policy.model import HandleKind, PolicySet
from gateway.request import RequestContext
from gateway.session.binding import Session
from gateway.session.handles import Handle

Owner = tuple[str, str]  # (issuer, subject): whom a session or a handle is bound to
FoundSession = tuple[Session, dict[str, Any]]  # a policy's session and its `session` variable
Presented = tuple[tuple[HandleKind, Handle], ...]  # each handle a call presents, with its kind


def owner_of(identity: Identity | None) -> Owner | None:
    return None if identity is None else (identity.issuer, identity.subject)


def minting_pair(policy: str, kind: str) -> str:
    """One entry of Check's mark on a call whose answer may mint (policy and kind names hold
    neither "/" nor ",", gateway/policy/loader.py)."""
    return f"{policy}/{kind}"


@dataclass(slots=True)
class CheckState:
    """One check in progress: what it has gathered, by the step that gathered it."""

    policy_set: PolicySet
    context: RequestContext
    identity: Identity | None
    now: float
    trace: Tracer | None
    variables: dict[str, Any] = field(default_factory=dict)
    unreadable: Decision | None = None  # the body's refusal, when only audit policies read it
    call: McpCall | None = None  # the call being judged; None: the request's first
    # The call's activation, made once and shared by the policies that add no variable of their own.
    activations: Activations | None = None
    activation: Once | None = None
    sessions: dict[str, FoundSession | None] = field(default_factory=dict)
    session_new: bool = False  # this check bound a new session
    ending: dict[str, Session] = field(default_factory=dict)
    handles: dict[str, Handle] = field(default_factory=dict)  # presented, by store key, looked up once
    handles_ending: dict[str, Handle] = field(default_factory=dict)
    handle_kind: str = ""  # the first handle presented, for telemetry
    handle_id: str = ""
    # The "policy/kind" pairs that may mint a handle in the response, comma-joined ("" for none):
    # the response path evaluates only these kinds' `minted`, never `when` or `minted_by` again.
    mints: str = ""
    audits: list[AuditDeny] = field(default_factory=list)

    @property
    def owner(self) -> Owner | None:
        return owner_of(self.identity)

    def audit(self, policy: str, denied: Decision) -> None:
        self.audits.append(AuditDeny(policy, denied.rule, denied.reason, denied.status))

    def audit_refusal(self, policy: str, refused: Decision) -> None:
        """An audit policy that would refuse before its rules (a CEL error in its `when`, a
        refused session or handle): recorded, and its session not looked up again this check."""
        self.audit(policy, refused)
        self.sessions.setdefault(policy, None)

    def denied(self, denial: Decision) -> Decision:
        return replace(denial, audit_denies=tuple(self.audits))
