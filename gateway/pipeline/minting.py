"""Handles on the response side: each handle that the upstream's response to an allowed request
mints, bound to the identity that asked, or the refusal that withholds the response."""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from typing import Any

from gateway import decision
from gateway.decision import Decision
from gateway.identity.verifier import Identity
from gateway.pipeline.calls import caller_variables
from gateway.pipeline.state import owner_of
from gateway.policy.activation import Once, timestamp
from gateway.policy.evaluate import PolicyFailure, Tracer
from gateway.policy.handles import handle_bind_values, minted_value
from gateway.policy.model import HandleKind, Policy, PolicySet
from gateway.request import RequestContext, RequestError
from gateway.session.handles import HandleBinder, HandleRefused, handle_problem
from gateway.session.store import StoreUnavailable

# A refused response (the upstream's answer withheld from the client).
STATUS_OF_RESPONSE_REFUSAL = 502


def mint(
    binder: HandleBinder, policy_set: PolicySet, context: RequestContext, identity: Identity | None,
    response: dict[str, Any], now: float, kinds: str, trace: Tracer | None = None,
) -> Decision:
    """Bind each handle that the upstream's response to an allowed request mints, to the
    identity that asked. `kinds` is Check's mark: the "policy/kind" pairs it decided may mint,
    comma-joined. Only those kinds' `minted` run: `when` and `minted_by` were judged by Check,
    which saw what this request does not (`context`, `source`, the client certificate). A pair
    the current policies no longer hold (a reload in between) refuses the response (502).
    `response` is the `response` variable: `status`, `headers` (lower-case names), `json` (the
    parsed body; for an SSE stream, one event's data). A handle bound to someone else, or ended,
    is a re-issue (502); a minted expression that fails, or a value that cannot be a handle,
    refuses the response (502)."""
    chosen = _chosen_kinds(policy_set, kinds)
    if isinstance(chosen, Decision):
        return chosen
    try:
        calls = context.mcp_calls
    except RequestError as exc:  # Check read it; a response must not pass on a guess
        return unreadable(f"the request cannot be read again: {exc}")
    if len(calls) > 1:
        # A batch's answer is a list: which call minted what cannot be told. MCP has no
        # batches since 2025-06-18; refused rather than passed with unbound handles.
        return unreadable("a batch's response is not read for handles")
    variables: dict[str, Any] = {
        "request": context.request_map(None),
        "mcp": calls[0].as_cel(),
        **caller_variables(context, identity),
        "source": {"address": context.source_address, "principal": context.source_principal},
        "now": timestamp(now),
    }
    request_activation = policy_set.engine.activation(variables)
    response_activation = Once(lambda: policy_set.engine.activation({**variables, "response": response}))
    owner = owner_of(identity)
    minted: Decision | None = None
    try:
        for policy, kind in chosen:
            value = minted_value(kind, response_activation(), policy.name)
            if isinstance(value, str) and value == "":
                continue
            problem = handle_problem(value, binder.settings.max_id_length)
            if problem is not None:
                refused = HandleRefused(decision.HANDLE_UNREADABLE, f"{kind.name}: minted: {problem}")
                return _minted_denial(policy, kind, refused, value)
            assert isinstance(value, str)
            bind = partial(handle_bind_values, kind, request_activation, policy.name)
            bound = binder.mint(kind.name, value, owner, bind, now, kind.ttl)
            if trace is not None:
                trace(policy.name, "", f"handle {kind.name} minted", bound)
            if isinstance(bound, HandleRefused):
                return _minted_denial(policy, kind, bound, value)
            if minted is None or (bound.existed is False and not minted.handle_new):
                minted = Decision(
                    True, decision.ALLOWED, policy=policy.name, handle_kind=kind.name,
                    handle_new=not bound.existed, handle_id=value,
                )
    except PolicyFailure as failure:
        # A minted expression that fails: the response may carry a handle no one bound.
        return replace(failure.denial, status=STATUS_OF_RESPONSE_REFUSAL)
    except StoreUnavailable as exc:
        return decision.deny(decision.STORE_UNAVAILABLE, error=f"handle store: {exc}")
    return minted or Decision(True, decision.ALLOWED)


def _chosen_kinds(policy_set: PolicySet, kinds: str) -> list[tuple[Policy, HandleKind]] | Decision:
    """The (policy, kind) pairs Check's mark names, in the current policy set; a refusal when
    the mark is empty or names one the set no longer has (fail closed: the response may carry
    a handle that nothing here would bind)."""
    if not kinds:
        return unreadable("the mark on a minting call names no handle kind")
    by_name = {policy.name: policy for policy in policy_set.policies if not policy.audit}
    chosen: list[tuple[Policy, HandleKind]] = []
    for pair in kinds.split(","):
        policy_name, _, kind_name = pair.partition("/")
        policy = by_name.get(policy_name)
        kind = None if policy is None else next((k for k in policy.handles if k.name == kind_name), None)
        if policy is None or kind is None or kind.minted is None:
            return unreadable(f"Check marked a handle kind the policies no longer have: {pair}")
        chosen.append((policy, kind))
    return chosen


def unreadable(why: str) -> Decision:
    """The response withheld (502 handle_unreadable): it cannot be read for the handles it mints,
    or the request cannot be read as Check read it."""
    return decision.deny(decision.HANDLE_UNREADABLE, status=STATUS_OF_RESPONSE_REFUSAL, error=why)


def _minted_denial(policy: Policy, kind: HandleKind, refused: HandleRefused, value: Any) -> Decision:
    # The response is withheld (502), unless the reason names its own answer: one identity's
    # handles at their cap is 429 (docs/reference.md).
    limited = refused.reason == decision.HANDLE_LIMIT_EXCEEDED
    status = decision.STATUS_OF[refused.reason] if limited else STATUS_OF_RESPONSE_REFUSAL
    denial = decision.deny(refused.reason, status=status, policy=policy.name, error=refused.message)
    return replace(denial, handle_kind=kind.name, handle_id=value if isinstance(value, str) else "")
