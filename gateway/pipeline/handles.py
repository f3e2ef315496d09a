"""The handle step of a check: each handle a call presents, found and bound to the caller (or
the kind's refusal); what an allowed call does to them (ends one, or may mint one in its
response); and the handles a passing request ends."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from gateway import decision
from gateway.decision import Decision, Mismatch
from gateway.identity.verifier import Identity
from gateway.pipeline.state import CheckState, Presented, minting_pair
from gateway.policy.activation import Once
from gateway.policy.evaluate import PolicyFailure
from gateway.policy.handles import ends_handle, may_mint, presented_value, refusal_reply
from gateway.policy.model import HandleKind, Policy
from gateway.session.handles import Handle, HandleBinder, HandleRefused, handle_problem


class HandleStep:
    def __init__(self, binder: HandleBinder) -> None:
        self.binder = binder

    def presented(self, state: CheckState, policy: Policy) -> Presented:
        """Each handle the call presents, found and bound to this caller; a refusal raises
        PolicyFailure with the kind's answer. A refusal never changes the stored handle."""
        presented: list[tuple[HandleKind, Handle]] = []
        binder = self.binder
        for kind in policy.handles:
            if kind.argument is not None:
                arguments = state.variables["mcp"].get("arguments", {})
                value = arguments.get(kind.argument, "")
            elif kind.header is not None:
                value = state.context.headers.get(kind.header, "")
            else:
                assert state.activation is not None
                value = presented_value(kind, state.activation(), policy.name)
            if isinstance(value, str) and value == "":
                continue
            shown = value if isinstance(value, str) else ""
            problem = handle_problem(value, binder.settings.max_id_length)
            if problem is not None:
                refused = HandleRefused(decision.HANDLE_INVALID, problem)
                raise PolicyFailure(_handle_denial(state, policy, kind, refused, shown))
            assert isinstance(value, str)
            key = f"{kind.name}:{value}"
            found: Handle | HandleRefused | None = state.handles.get(key)
            if found is None:
                found = binder.find(kind.name, value, state.owner, kind.ttl, kind.unknown_allowed, state.now)
            if state.trace is not None:
                state.trace(policy.name, "", f"handle {kind.name}", found)
            if isinstance(found, HandleRefused):
                raise PolicyFailure(_handle_denial(state, policy, kind, found, value))
            state.handles[key] = found
            if not state.handle_kind:
                state.handle_kind, state.handle_id = kind.name, value
            presented.append((kind, found))
        return tuple(presented)

    def after_allow(
        self, state: CheckState, policy: Policy, presented: Presented, activation: Once,
        variables: Mapping[str, Any],
    ) -> None:
        """What an allowed call does to handles: the owner's terminating request ends one (once
        every policy allows), and a request whose response may mint one has it read. Enforcing
        policies only: an audit policy changes nothing."""
        for kind, handle in presented:
            if handle.existed and ends_handle(kind, activation, variables, policy.name):
                state.handles_ending[handle.key] = handle
                if state.trace is not None:
                    state.trace(policy.name, "", f"handle {kind.name} terminate", True)
        for kind in policy.handles:
            if may_mint(kind, activation, variables, policy.name):
                pair = minting_pair(policy.name, kind.name)
                if pair not in state.mints.split(","):
                    state.mints = f"{state.mints},{pair}" if state.mints else pair

    def end(self, state: CheckState) -> None:
        """The handles a terminating request ends: called only once every policy allowed it."""
        for handle in state.handles_ending.values():
            self.binder.end(handle, state.now)


def _handle_denial(
    state: CheckState, policy: Policy, kind: HandleKind, refused: HandleRefused, value: str
) -> Decision:
    """The kind's refusal: a JSON-RPC error with the call's own id (null for a batch, which is
    refused whole), at the kind's status; a mismatch records whose handle it was."""
    calls = state.context.parsed_mcp
    batch = isinstance(calls, tuple) and len(calls) > 1
    call = state.call or state.context.mcp_for_telemetry()
    mismatch = None
    if refused.reason == decision.HANDLE_MISMATCH:
        mismatch = _handle_mismatch(refused.bound or {}, state.identity)
    denial = decision.deny(
        refused.reason, status=kind.refusal.status, policy=policy.name, mismatch=mismatch,
        error=refused.message,
    )
    reply = refusal_reply(kind.refusal, None if batch else call.request_id)
    return replace(denial, handle_kind=kind.name, handle_id=value, reply=reply)


def _handle_mismatch(bound: Mapping[str, Any], identity: Identity | None) -> Mismatch:
    """Which bound claim differs: the issuer if it does, else the subject (hashed in telemetry)."""
    issuer = None if identity is None else identity.issuer
    subject = None if identity is None else identity.subject
    if "iss" in bound and bound.get("iss") != issuer:
        return Mismatch("iss", bound.get("iss"), issuer)
    return Mismatch("sub", bound.get("sub"), subject)
