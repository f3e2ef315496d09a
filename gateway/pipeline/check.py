"""One check, step by step, in the order of docs/policies.md (How a check is evaluated):
identity → request (the body and the variables) → for each call, each policy: its `when`, its
session, the handles presented, its rules → decision, and only then what the request ends.

The steps meet here and nowhere else; each is a module of its own with plain data between them
(`CheckState`). The time of the check is passed in once; every failure on the way (bad token, a
body that cannot be read, store down, CEL error) ends in a deny, never an allow.
"""

from __future__ import annotations

from gateway import decision
from gateway.config import AuthConfig, HandlesConfig, SessionConfig
from gateway.decision import Decision
from gateway.identity.dpop import ReplayCache
from gateway.identity.verifier import Identity, TokenVerifier
from gateway.pipeline.allows import AllowDecisions
from gateway.pipeline.calls import calls_to_judge, enter_call, read_request
from gateway.pipeline.handles import HandleStep
from gateway.pipeline.identify import IdentityStep
from gateway.pipeline.response_path import ResponsePath
from gateway.pipeline.rules import applies_to_call, judge_rules
from gateway.pipeline.sessions import SessionStep
from gateway.pipeline.state import CheckState
from gateway.policy.evaluate import PolicyFailure, Tracer
from gateway.policy.model import Policy, PolicyHolder
from gateway.request import RequestContext
from gateway.session.handles import HandleBinder, handle_store_settings
from gateway.session.memory import MemoryStore
from gateway.session.store import SessionStore, StoreUnavailable


class Authorizer:
    def __init__(
        self, auth: AuthConfig, sessions: SessionConfig, verifier: TokenVerifier, store: SessionStore,
        policies: PolicyHolder, handle_store: SessionStore | None = None,
        handles: HandlesConfig | None = None, replay: ReplayCache | None = None,
    ) -> None:
        self.policies = policies
        self.identity_step = IdentityStep(auth, verifier, replay)
        self._sessions = SessionStep(store, sessions)
        handles = handles or HandlesConfig()
        if handle_store is None:
            # One process's memory: what `policy test` and in-process tests need. A gateway
            # process passes the store opened from its config (gateway.app).
            settings = handle_store_settings(handles, sessions.store_timeout, sessions.max_sessions)
            handle_store = MemoryStore(settings)
        self.handle_binder = HandleBinder(handle_store, handles)
        self._handles = HandleStep(self.handle_binder)
        self._allows = AllowDecisions(auth)
        # ext_proc goes through the same steps (and their caches), never through this class.
        self.response_path = ResponsePath(policies, self.identity_step, self._sessions, self.handle_binder)

    @property
    def store(self) -> SessionStore:
        return self._sessions.store

    def check(self, context: RequestContext, now: float) -> Decision:
        identity = self.identity_step.identify(context, now)
        if isinstance(identity, Decision):
            return identity
        return self.check_identity(context, identity, now)

    def check_identity(
        self, context: RequestContext, identity: Identity | None, now: float, trace: Tracer | None = None
    ) -> Decision:
        """Sessions and policies for an identity already verified (None: anonymous). `policy
        test` and `policy explain` enter here with claims instead of a token; `trace` sees every
        step for `explain`."""
        state = CheckState(self.policies.current, context, identity, now, trace)
        try:
            return self._evaluate(state)
        except PolicyFailure as failure:
            # Also a `terminate` or `minted_by` that fails after a policy's rules passed: the
            # audit denies recorded earlier in the check stay on the refusal.
            return state.denied(failure.denial)
        except StoreUnavailable as exc:
            return decision.deny(decision.STORE_UNAVAILABLE, error=f"session store: {exc}")

    def _evaluate(self, state: CheckState) -> Decision:
        refused = read_request(state)
        if refused is not None:
            return refused
        for call in calls_to_judge(state):  # a batch: every call must pass
            enter_call(state, call)
            for policy in state.policy_set.policies:
                denial = self._judge(state, policy)
                if denial is not None:
                    return state.denied(denial)
        # Only a request that passes every policy may end a session or a handle (the owner's DELETE).
        if state.ending:
            self._sessions.end(state)
        if state.handles_ending:
            self._handles.end(state)
        return self._allows.allow(state)

    def _judge(self, state: CheckState, policy: Policy) -> Decision | None:
        """One policy against the call: the deny it enforces, or None."""
        if state.unreadable is not None and policy.uses_body:
            state.audit(policy.name, state.unreadable)  # only audit policies read the unreadable body
            return None
        try:
            if policy.when is not None and not applies_to_call(state, policy):
                return None
            session = self._sessions.find(state, policy) if policy.session is not None else None
            presented = self._handles.presented(state, policy) if policy.handles else ()
        except PolicyFailure as failure:
            # An audit policy only records what it would refuse, errors and session refusals
            # included; an enforcing one refuses.
            if not policy.audit:
                return failure.denial
            state.audit_refusal(policy.name, failure.denial)
            return None
        verdict, activation, variables = judge_rules(state, policy, session, presented)
        if verdict.enforced is not None:
            return verdict.enforced
        if verdict.audited is not None:
            state.audit(policy.name, verdict.audited)
        if verdict.terminate:
            self._sessions.terminate(state, policy, session)
        if policy.handles and not policy.audit:
            self._handles.after_allow(state, policy, presented, activation, variables)
        return None
