"""Evaluating a compiled policy against one activation: pure functions, no I/O, no clock.

The first rule whose `when` holds and whose `allow` is false decides the deny. A CEL
runtime error denies with `policy_error`; its message goes to telemetry, not to the client.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from gateway import decision
from gateway.decision import Decision, Mismatch
from gateway.policy.engines import CompiledExpression, EvaluationError
from gateway.policy.memo import FusedMemo
from gateway.policy.model import ALL_ALLOW, ALL_ALLOW_TERMINATE, Policy, Rule

# (policy, rule, step, result): lets `policy explain` show every step taken.
Tracer = Callable[[str, str, str, Any], None]


class PolicyFailure(Exception):
    """An expression failed at run time; carries the deny to return."""

    def __init__(self, denial: Decision) -> None:
        super().__init__(denial.error)
        self.denial = denial


_QUOTED = re.compile(r'"([^"]*)"')


_BAD_PATTERN = "invalid regular expression"


def _error_message(exc: EvaluationError, expr: CompiledExpression) -> str:
    """The CEL error, without quoted values that came from the request: a key named in the
    expression (`claims.tier`) stays, a looked-up value (`claims[request.headers.x]`) goes."""
    message = _QUOTED.sub(lambda m: m.group(0) if m.group(1) in expr.source else '"[redacted]"', str(exc))
    return _without_pattern(message)


def _without_pattern(message: str) -> str:
    """RE2's error for a bad `matches()` pattern quotes the pattern unquoted (`missing ):
    SECRET(`), and a pattern may come from the request: only RE2's own kind of error is kept."""
    at = message.find(_BAD_PATTERN)
    if at < 0:
        return message
    head = message[: at + len(_BAD_PATTERN)]
    kind, separator, _ = message[at + len(_BAD_PATTERN) :].removeprefix(": ").partition(": ")
    # The kind (`missing )`) is RE2's fixed text, followed by ": " and the pattern's fragment.
    return f"{head}: {kind} (pattern not shown)" if separator else f"{head} (pattern not shown)"


def _evaluate(expr: CompiledExpression, activation: Any, policy: str, rule: str, step: str) -> Any:
    try:
        return expr.evaluate(activation)
    except EvaluationError as exc:
        message = f"{step}: {_error_message(exc, expr)}"
        denial = decision.deny(decision.POLICY_ERROR, policy=policy, rule=rule, error=message)
        raise PolicyFailure(denial) from None


def run_expression(expr: CompiledExpression, activation: Any, policy: str, step: str) -> Any:
    """One expression's value; a runtime error raises PolicyFailure (policy_error, fail closed)."""
    return _evaluate(expr, activation, policy, "", step)


def applies(policy: Policy, activation: Any, trace: Tracer | None = None) -> bool:
    if policy.when is None:
        return True
    result = bool(_evaluate(policy.when, activation, policy.name, "", "when"))
    if trace:
        trace(policy.name, "", "when", result)
    return result


def session_key(policy: Policy, activation: Any) -> str:
    assert policy.session is not None
    return str(_evaluate(policy.session.key, activation, policy.name, "", "session.key"))


def bind_values(policy: Policy, activation: Any) -> dict[str, Any]:
    assert policy.session is not None
    return {
        name: _evaluate(expr, activation, policy.name, "", f"session.bind.{name}")
        for name, expr in policy.session.bind
    }


def terminates(policy: Policy, activation: Any) -> bool:
    if policy.session is None or policy.session.terminate is None:
        return False
    return bool(_evaluate(policy.session.terminate, activation, policy.name, "", "session.terminate"))


def _safe_header_value(value: str) -> str:
    # A header value built from request data must not smuggle a second header.
    return "".join(ch for ch in value if ch >= " " and ch != "\x7f")


def _deny_for(policy: Policy, rule: Rule, activation: Any, variables: Mapping[str, Any]) -> Decision:
    spec = rule.deny
    headers = []
    for name, expr in spec.headers:
        try:
            headers.append((name, _safe_header_value(str(expr.evaluate(activation)))))
        except EvaluationError:
            continue  # the deny stands; a header that cannot be built is left out
    mismatch = None
    if spec.claim:
        session = variables.get("session", {})
        claims = variables.get("claims", {})
        mismatch = Mismatch(spec.claim, session.get(spec.claim), claims.get(spec.claim))
    return decision.deny(
        spec.reason,
        status=spec.status,
        policy=policy.name,
        rule=rule.name,
        headers=tuple(headers),
        mismatch=mismatch,
    )


def first_denial(
    policy: Policy, activation: Any, variables: Mapping[str, Any], trace: Tracer | None = None
) -> Decision | None:
    """The deny of the first rule that refuses, or None when every rule allows."""
    for rule in policy.rules:
        if rule.when is not None:
            applicable = _evaluate(rule.when, activation, policy.name, rule.name, "when")
            if trace:
                trace(policy.name, rule.name, "when", applicable)
            if not applicable:
                continue
        allowed = _evaluate(rule.allow, activation, policy.name, rule.name, "allow")
        if trace:
            trace(policy.name, rule.name, "allow", allowed)
        if not allowed:
            return _deny_for(policy, rule, activation, variables)
    return None


@dataclass(frozen=True, slots=True)
class Verdict:
    """The rules' outcome for one policy: a deny to enforce, or a deny to record only (audit),
    and whether the request ends the session (only meaningful when nothing denied)."""

    enforced: Decision | None = None
    audited: Decision | None = None
    terminate: bool = False


PASSED = Verdict()
PASSED_TERMINATE = Verdict(terminate=True)


def _fused_outcome(
    policy: Policy, activation: Callable[[], Any], variables: Mapping[str, Any], memo: FusedMemo | None
) -> int | None:
    """The fused expression's result: a rule index or ALL_ALLOW(_TERMINATE); None on error."""
    assert policy.fused is not None
    key = memo.key(policy.name, variables) if memo is not None else None
    if key is not None:
        remembered = memo.get(key) if memo is not None else None
        if remembered is not None:
            return remembered
    try:
        outcome = int(policy.fused.evaluate(activation()))
    except EvaluationError:
        return None  # errors are not remembered: the replay names the failing rule
    if key is not None and memo is not None:
        memo.put(key, outcome)
    return outcome


def _fused_verdict(
    policy: Policy, activation: Callable[[], Any], variables: Mapping[str, Any], memo: FusedMemo | None
) -> Verdict | None:
    """One evaluation (or none) for all rules; None when it failed: replay rule by rule."""
    outcome = _fused_outcome(policy, activation, variables, memo)
    if outcome is None:
        return None
    if outcome == ALL_ALLOW:
        return PASSED
    if outcome == ALL_ALLOW_TERMINATE:
        return PASSED_TERMINATE
    denial = _deny_for(policy, policy.rules[outcome], activation(), variables)
    return Verdict(audited=denial) if policy.audit else Verdict(enforced=denial)


def judge(
    policy: Policy,
    activation: Callable[[], Any],
    variables: Mapping[str, Any],
    trace: Tracer | None = None,
    memo: FusedMemo | None = None,
) -> Verdict:
    """The rules' verdict. `activation()` is called only when an expression must run; it
    should build the activation once and return the same one when called again."""
    if policy.fused is not None and trace is None:
        fast = _fused_verdict(policy, activation, variables, memo)
        if fast is not None:
            return fast
    activation_now = activation()
    try:
        denial = first_denial(policy, activation_now, variables, trace)
        if denial is None:
            return PASSED_TERMINATE if terminates(policy, activation_now) else PASSED
    except PolicyFailure as failure:
        denial = failure.denial
        if trace:
            trace(policy.name, denial.rule, "error", denial.error)
    return Verdict(audited=denial) if policy.audit else Verdict(enforced=denial)
