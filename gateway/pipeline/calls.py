"""The request step: the body read (where a policy reads it) before any policy runs, the
variables the policy set reads, and the calls to judge (a batch: each call on its own)."""

from __future__ import annotations

from functools import partial
from typing import Any

from gateway import decision
from gateway.decision import Decision
from gateway.identity.verifier import ANONYMOUS_AUTH_MAP, Identity
from gateway.mcp import NOT_MCP, McpCall
from gateway.pipeline.state import CheckState
from gateway.policy.activation import NO_SESSION, Activations, Once, timestamp
from gateway.policy.handles import NO_HANDLE
from gateway.request import RequestContext


def read_request(state: CheckState) -> Decision | None:
    """The body and the variables; a deny when a policy reads what cannot be read."""
    policy_set = state.policy_set
    reads_body = policy_set.uses_body or "mcp" in policy_set.reads
    return (_read_body(state) if reads_body else None) or gather_variables(state)


def calls_to_judge(state: CheckState) -> tuple[McpCall | None, ...]:
    """Each call of a batch is judged on its own. Policies that never read `mcp` judge the
    request once (None: `mcp` as gathered), and the body is never parsed."""
    if "mcp" in state.policy_set.reads and state.unreadable is None:
        calls = state.context.mcp_calls
        # The first call is in the variables already.
        return (None if state.trace is None else calls[0], *calls[1:])
    if state.trace is not None:
        return (state.context.mcp_for_telemetry(),)
    return (None,)


def enter_call(state: CheckState, call: McpCall | None) -> None:
    """`mcp` set to the call about to be judged, and a fresh activation for its policies."""
    state.call = call
    if call is not None:
        state.variables["mcp"] = call.as_cel()
        if state.trace is not None:
            state.trace("", "", "mcp", call)
    activations = state.activations = Activations(state.policy_set)
    state.activation = Once(partial(activations.activation, state.variables))


def caller_variables(context: RequestContext, identity: Identity | None) -> dict[str, Any]:
    """The variables every check has: who asks, no session or handle yet, Envoy's context."""
    return {
        "claims": identity.claims if identity else {},
        "auth": identity.auth_map if identity else ANONYMOUS_AUTH_MAP,
        "session": NO_SESSION,
        "handle": NO_HANDLE,
        "context": context.context_extensions,
    }


def gather_variables(state: CheckState) -> Decision | None:
    """The variables the policy set reads, as plain values (docs/policies.md, Variables); a deny for a
    query it cannot judge. What no expression reads is never built."""
    reads, context = state.policy_set.reads, state.context
    variables = caller_variables(context, state.identity)
    if "request" in reads:
        fields = reads["request"]
        if context.query_repeated and (fields is None or "query" in fields):
            message = "a policy reads the query, and a parameter repeats"
            return decision.deny(decision.REQUEST_INVALID, error=message)
        variables["request"] = context.request_map(fields)
    if "mcp" in reads:
        variables["mcp"] = (context.mcp if state.unreadable is None else NOT_MCP).as_cel()
    if "source" in reads:
        variables["source"] = {"address": context.source_address, "principal": context.source_principal}
    if "now" in reads:
        variables["now"] = timestamp(state.now)
    state.variables = variables
    return None


def _read_body(state: CheckState) -> Decision | None:
    """Where a policy reads the body, it is read before any policy runs: a `when` must not be
    skipped by an empty MCP view while a lenient server reads the body as a call."""
    policy_set = state.policy_set
    refused = state.context.body_refusal("mcp" in policy_set.reads)
    if refused is None:
        return None
    readers = [p for p in policy_set.policies if p.uses_body]
    denial = decision.deny(refused.reason, policy=readers[0].name if readers else "", error=str(refused))
    if any(not p.audit for p in readers) or not readers or refused.reason == decision.REQUEST_BODY_PARTIAL:
        return denial
    state.unreadable = denial  # only audit policies read it: they record the refusal
    return None
