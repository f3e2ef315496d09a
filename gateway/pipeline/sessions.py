"""The session step: a policy's session found, or bound to its first user, once per check; the
sessions a passing request ends; and on the response path (`session.bind_on: response`), the ids
an upstream issues bound before the client sees them, and the ids it forgot ended."""

from __future__ import annotations

from functools import partial
from typing import Any

from gateway import decision
from gateway.config import SessionConfig
from gateway.decision import Decision
from gateway.identity.verifier import Identity
from gateway.pipeline.calls import gather_variables
from gateway.pipeline.state import CheckState, FoundSession, owner_of
from gateway.policy.activation import Activations, session_variable
from gateway.policy.evaluate import PolicyFailure, applies, bind_values, session_key
from gateway.policy.model import Policy, PolicySet
from gateway.request import RequestContext
from gateway.session.binding import Binder, Refusal, Session
from gateway.session.store import SessionStore, StoreUnavailable

# The response path has the request's headers, never its body: `mcp` is NOT_MCP there.
_HEADERS_ONLY = decision.deny(decision.REQUEST_UNPARSEABLE, error="the response path sees headers only")


class SessionStep:
    def __init__(self, store: SessionStore, config: SessionConfig) -> None:
        self.binder = Binder(store, config)
        self._headers: tuple[PolicySet | None, frozenset[str]] = (None, frozenset())

    @property
    def store(self) -> SessionStore:
        return self.binder.store

    @property
    def binds_on_response(self) -> bool:
        return self.binder.binds_on_response

    def find(self, state: CheckState, policy: Policy) -> FoundSession | None:
        """The policy's session and its `session` variable, found or bound once per check; None
        for a request without an id. A refusal raises PolicyFailure."""
        assert policy.session is not None
        if policy.name in state.sessions:
            return state.sessions[policy.name]
        activations, variables = state.activations, state.variables
        assert activations is not None
        header = policy.session.header
        key = state.context.headers.get(header, "") if header else session_key(
            policy, activations.activation(variables)
        )
        found: Session | Refusal | None = None
        if key:
            found = self.binder.find_or_bind(
                key, state.owner, lambda: bind_values(policy, activations.activation(variables)), state.now
            )
        if isinstance(found, Refusal):
            denial = decision.deny(found.reason, policy=policy.name, error=found.message)
            if state.trace is not None:
                state.trace(policy.name, "", "session", denial)
            raise PolicyFailure(denial)
        if state.trace is not None:
            state.trace(policy.name, "", "session", found)
        fields = state.policy_set.reads.get("session")
        result = None if found is None else (found, session_variable(key, found.data, found.existed, fields))
        state.sessions[policy.name] = result
        state.session_new = state.session_new or (found is not None and not found.existed)
        return result

    @staticmethod
    def terminate(state: CheckState, policy: Policy, session: FoundSession | None) -> None:
        """The policy's rules end the session it found (`session.terminate`): once every policy
        allows, and only a stored one."""
        if session is not None and session[0].existed:
            state.ending[session[0].key] = session[0]
            if state.trace is not None:
                state.trace(policy.name, "", "session.terminate", True)

    def end(self, state: CheckState) -> None:
        """The sessions a terminating request ends: called only once every policy allowed it."""
        for session in state.ending.values():
            self.binder.end(session, state.now)

    def headers(self, policy_set: PolicySet) -> frozenset[str]:
        """The headers that carry a session id (the policies' `session.header`)."""
        known = self._headers
        if known[0] is not policy_set:  # computed once per loaded policy set
            policies = policy_set.policies
            headers = frozenset(p.session.header for p in policies if p.session and p.session.header)
            known = self._headers = (policy_set, headers)
        return known[1]

    def bind_issued(
        self, policy_set: PolicySet, context: RequestContext, identity: Identity | None,
        issued: dict[str, str], now: float,
    ) -> Decision:
        """The upstream's response to an allowed request issued `issued` (session header → id):
        bind each new id to the request's identity, with the policy's `bind` values, before the
        response reaches the client. The request's own id, repeated, is its session. A deny
        (`session_reissued`, …) means the response must not be delivered. `when` and `bind` see
        the request's headers only (no body: `mcp` is empty)."""
        state = CheckState(policy_set, context, identity, now, None, unreadable=_HEADERS_ONLY)
        activation: Any = None
        try:
            for policy in policy_set.policies:
                header = policy.session.header if policy.session else None
                key = issued.get(header) if header else None
                if key is None or key == context.headers.get(header or ""):
                    continue
                if activation is None:
                    refused = gather_variables(state)
                    if refused is not None:
                        return refused
                    activation = Activations(policy_set).activation(state.variables)
                try:
                    if policy.when is not None and not applies(policy, activation):
                        continue
                    found = self.binder.bind_issued(
                        key, state.owner, partial(bind_values, policy, activation), now
                    )
                    if isinstance(found, Refusal):
                        denial = decision.deny(found.reason, policy=policy.name, error=found.message)
                        raise PolicyFailure(denial)
                except PolicyFailure as failure:
                    if not policy.audit:
                        return state.denied(failure.denial)
                    state.audit(policy.name, failure.denial)
                    continue
                state.session_new = state.session_new or not found.existed
        except StoreUnavailable as exc:
            return decision.deny(decision.STORE_UNAVAILABLE, error=f"session store: {exc}")
        audits = tuple(state.audits)
        return Decision(True, decision.ALLOWED, audit_denies=audits, session_new=state.session_new)

    def forget(
        self, policy_set: PolicySet, context: RequestContext, identity: Identity | None, now: float
    ) -> int:
        """The upstream answered that it does not know the session the request carried: each
        such live session of this identity ends (a `terminated` tombstone). How many ended.
        Raises StoreUnavailable."""
        owner = owner_of(identity)
        ended = 0
        for header in self.headers(policy_set):
            key = context.headers.get(header)
            if key and self.binder.forgotten(key, owner, now):
                ended += 1
        return ended
