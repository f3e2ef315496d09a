"""The policy step's CEL: a policy's `when` against the call, and its rules against the call's
variables with its own session and the handle presented, if any."""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

from gateway.pipeline.state import CheckState, FoundSession, Presented
from gateway.policy.activation import Once
from gateway.policy.evaluate import Verdict, applies, judge
from gateway.policy.handles import handle_variable
from gateway.policy.model import Policy

# The verdict, and the activation and variables the rules saw (for what an allowed call does to
# its handles). A plain tuple: this is on every check's path.
Judged = tuple[Verdict, Once, Mapping[str, Any]]


def applies_to_call(state: CheckState, policy: Policy) -> bool:
    """Whether the policy's `when` holds for this call. Raises PolicyFailure."""
    assert state.activation is not None
    return applies(policy, state.activation(), state.trace)


def judge_rules(
    state: CheckState, policy: Policy, session: FoundSession | None, presented: Presented
) -> Judged:
    """The policy's rules: a deny to enforce, one to record (audit), whether the request ends
    the session. Raises PolicyFailure."""
    variables: Mapping[str, Any] = state.variables
    activation = state.activation
    assert activation is not None and state.activations is not None
    sees_handle = bool(presented) and "handle" in state.policy_set.reads
    if session is not None or sees_handle:
        own = dict(state.variables)
        if session is not None:
            own["session"] = session[1]
        if sees_handle:
            kind, first = presented[0]
            own["handle"] = handle_variable(kind.name, first.data, first.existed)
        variables, activation = own, Once(partial(state.activations.activation, own))
    verdict = judge(policy, activation, variables, state.trace, state.policy_set.memo)
    return verdict, activation, variables
