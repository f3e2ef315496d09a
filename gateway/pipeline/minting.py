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
from gateway.policy.evaluate import PolicyFailure, Tracer, applies
from gateway.policy.handles import handle_bind_values, may_mint, minted_value
from gateway.policy.model import HandleKind, Policy, PolicySet
from gateway.request import RequestContext, RequestError
from gateway.session.handles import HandleBinder, HandleRefused, handle_problem
from gateway.session.store import StoreUnavailable

# A refused response (the upstream's answer withheld from the client).
STATUS_OF_RESPONSE_REFUSAL = 502


def mint(
    binder: HandleBinder, policy_set: PolicySet, context: RequestContext, identity: Identity | None,
    response: dict[str, Any], now: float, trace: Tracer | None = None,
) -> Decision:
    """Bind each handle that the upstream's response to an allowed request mints, to the
    identity that asked. `response` is the `response` variable: `status`, `headers` (lower-case
    names), `json` (the parsed body; for an SSE stream, one event's data). A handle bound to
    someone else, or ended, is a re-issue (502); a minted expression that fails, or a value that
    cannot be a handle, refuses the response (502)."""
    try:
        calls = context.mcp_calls
    except RequestError as exc:  # Check read it; a response must not pass on a guess
        return _unreadable_request(f"the request cannot be read again: {exc}")
    minting = any(kind.minted is not None for policy in policy_set.policies for kind in policy.handles)
    if len(calls) > 1 and minting:
        # A batch's answer is a list: which call minted what cannot be told. MCP has no
        # batches since 2025-06-18; refused rather than passed with unbound handles.
        return _unreadable_request("a batch's response is not read for handles")
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
        for policy in policy_set.policies:
            if not policy.handles or policy.audit:
                continue
            if policy.when is not None and not applies(policy, request_activation, trace):
                continue
            for kind in policy.handles:
                if not may_mint(kind, lambda: request_activation, variables, policy.name):
                    continue
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


def _unreadable_request(why: str) -> Decision:
    return decision.deny(decision.HANDLE_UNREADABLE, status=STATUS_OF_RESPONSE_REFUSAL, error=why)


def _minted_denial(policy: Policy, kind: HandleKind, refused: HandleRefused, value: Any) -> Decision:
    # The response is withheld (502), unless the reason names its own answer: one identity's
    # handles at their cap is 429 (docs/reference.md).
    limited = refused.reason == decision.HANDLE_LIMIT_EXCEEDED
    status = decision.STATUS_OF[refused.reason] if limited else STATUS_OF_RESPONSE_REFUSAL
    denial = decision.deny(refused.reason, status=status, policy=policy.name, error=refused.message)
    return replace(denial, handle_kind=kind.name, handle_id=value if isinstance(value, str) else "")
