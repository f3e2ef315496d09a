"""One check, step by step: request → identity → session → policy → decision.

The steps meet here and nowhere else; each is a module of its own with plain data between
them. The time of the check is passed in once; every failure on the way (bad token, a body
that cannot be read, store down, CEL error) ends in a deny, never an allow.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

from gateway import decision
from gateway.config import AuthConfig, HandlesConfig, SessionConfig
from gateway.decision import Allows, AuditDeny, Decision, Mismatch
from gateway.identity.dpop import DpopRejected, NonceRequired, ProofVerifier, ReplayCache
from gateway.identity.sender import Presentation, SenderCheck
from gateway.identity.verifier import ANONYMOUS_AUTH_MAP, Identity, TokenRejected, TokenVerifier
from gateway.mcp import NOT_MCP, McpCall
from gateway.policy.activation import NO_SESSION, Activations, Once, session_variable, timestamp
from gateway.policy.evaluate import PolicyFailure, Tracer, applies, bind_values, judge, session_key
from gateway.policy.handles import (
    NO_HANDLE,
    ends_handle,
    handle_bind_values,
    handle_variable,
    may_mint,
    minted_value,
    presented_value,
    refusal_reply,
)
from gateway.policy.model import HandleKind, Policy, PolicyHolder, PolicySet
from gateway.request import RequestContext, RequestError
from gateway.session.binding import Binder, Refusal, Session
from gateway.session.handles import Handle, HandleBinder, HandleRefused, handle_problem, handle_store_settings
from gateway.session.memory import MemoryStore
from gateway.session.replay import MemoryReplayCache
from gateway.session.store import SessionStore, StoreUnavailable

UPSTREAM_SUBJECT = "x-authz-subject"
UPSTREAM_ISSUER = "x-authz-issuer"
UPSTREAM_HEADERS = (UPSTREAM_SUBJECT, UPSTREAM_ISSUER)

__all__ = ["UPSTREAM_HEADERS", "Authorizer", "PolicyHolder"]

_ONCE: tuple[McpCall | None, ...] = (None,)  # the request judged once, `mcp` as gathered
# The response path has the request's headers, never its body: `mcp` is NOT_MCP there.
_HEADERS_ONLY = decision.deny(decision.REQUEST_UNPARSEABLE, error="the response path sees headers only")


@dataclass(slots=True)
class _Check:
    """What one check gathers as it goes: sessions by policy, audit denies, sessions to end."""

    policy_set: PolicySet
    context: RequestContext
    identity: Identity | None
    now: float
    trace: Tracer | None
    variables: dict[str, Any] = field(default_factory=dict)
    unreadable: Decision | None = None  # the body's refusal, when only audit policies read it
    sessions: dict[str, tuple[Session, dict[str, Any]] | None] = field(default_factory=dict)
    audits: list[AuditDeny] = field(default_factory=list)
    ending: dict[str, Session] = field(default_factory=dict)
    session_new: bool = False  # this check bound a new session
    call: McpCall | None = None  # the call being judged; None: the request's first
    handles: dict[str, Handle] = field(default_factory=dict)  # presented, by store key, looked up once
    handles_ending: dict[str, Handle] = field(default_factory=dict)
    handle_kind: str = ""  # the first handle presented, for telemetry
    handle_id: str = ""
    mints: bool = False  # some applying kind may mint a handle in the response

    def audit(self, policy: str, denied: Decision) -> None:
        self.audits.append(AuditDeny(policy, denied.rule, denied.reason, denied.status))

    def denied(self, denial: Decision) -> Decision:
        return replace(denial, audit_denies=tuple(self.audits))


class Authorizer:
    def __init__(
        self, auth: AuthConfig, sessions: SessionConfig, verifier: TokenVerifier, store: SessionStore,
        policies: PolicyHolder, handle_store: SessionStore | None = None,
        handles: HandlesConfig | None = None, replay: ReplayCache | None = None,
    ) -> None:
        self._auth = auth
        self._verifier = verifier
        # DPoP proofs' jti are single-use; `replay` should live in the shared session store
        # (gateway.session.replay.replay_cache_for), or a proof can be replayed at another replica.
        proofs = ProofVerifier(auth.dpop, auth.leeway, replay if replay is not None else MemoryReplayCache())
        self._sender = SenderCheck(verifier, auth.dpop, proofs, auth.allow_anonymous)
        self._binder = Binder(store, sessions)
        self.policies = policies
        self._allows = Allows()
        self._handle_allows = Allows()
        handles = handles or HandlesConfig()
        if handle_store is None:
            # One process's memory: what `policy test` and in-process tests need. A gateway
            # process passes the store opened from its config (gateway.app).
            settings = handle_store_settings(handles, sessions.store_timeout, sessions.max_sessions)
            handle_store = MemoryStore(settings)
        self.handle_binder = HandleBinder(handle_store, handles)
        self._session_headers: tuple[PolicySet | None, frozenset[str]] = (None, frozenset())

    @property
    def store(self) -> SessionStore:
        return self._binder.store

    def check(self, context: RequestContext, now: float) -> Decision:
        identity = self.identify(context, now)
        if isinstance(identity, Decision):
            return identity
        return self.check_identity(context, identity, now)

    def identify(
        self, context: RequestContext, now: float, admitted: bool = False
    ) -> Identity | Decision | None:
        """The verified identity, None for an allowed anonymous request, or a deny. `admitted`:
        a request Check allowed, seen again on the response path (SenderCheck.authenticate)."""
        presented = Presentation(
            context.method, context.scheme, context.host, context.path, context.client_certificate
        )
        try:
            return self._sender.authenticate(context.headers, presented, now, admitted)
        except DpopRejected as rejected:
            nonce = (("dpop-nonce", rejected.nonce),) if isinstance(rejected, NonceRequired) else ()
            return decision.deny(
                rejected.reason, error=str(rejected), headers=nonce, dpop_failure=rejected.failure
            )
        except TokenRejected as rejected:
            return decision.deny(rejected.reason, error=str(rejected))
        except StoreUnavailable as exc:
            return decision.deny(decision.STORE_UNAVAILABLE, error=f"DPoP replay cache: {exc}")

    def holder_of(self, authorization: str) -> tuple[str, str] | None:
        """Whose token an Authorization value carries, when Check verified it a moment ago (the
        response path shares its streams out by identity, not by token: a refresh is no new share)."""
        _, _, token = authorization.strip().partition(" ")
        return self._verifier.owner_of(token.strip()) if token.strip() else None

    def check_identity(
        self, context: RequestContext, identity: Identity | None, now: float, trace: Tracer | None = None
    ) -> Decision:
        """Sessions and policies for an identity already verified (None: anonymous). `policy
        test` and `policy explain` enter here with claims instead of a token; `trace` sees every
        step for `explain`."""
        check = _Check(self.policies.current, context, identity, now, trace)
        try:
            return self._authorize(check)
        except PolicyFailure as failure:
            return failure.denial
        except StoreUnavailable as exc:
            return decision.deny(decision.STORE_UNAVAILABLE, error=f"session store: {exc}")

    def _authorize(self, check: _Check) -> Decision:
        reads_body = check.policy_set.uses_body or "mcp" in check.policy_set.reads
        refused = (_read_body(check) if reads_body else None) or _gather_variables(check)
        if refused is not None:
            return refused
        calls = _calls_to_judge(check) if reads_body or check.trace is not None else _ONCE
        for call in calls:
            check.call = call
            if call is not None:
                check.variables["mcp"] = call.as_cel()
                if check.trace is not None:
                    check.trace("", "", "mcp", call)
            denial = self._judge_call(check)
            if denial is not None:
                return check.denied(denial)
        # Only a request that passes every policy may end a session (the owner's DELETE).
        for session in check.ending.values():
            self._binder.end(session, check.now)
        for handle in check.handles_ending.values():
            self.handle_binder.end(handle, check.now)
        return self._allow(check)

    def _judge_call(self, check: _Check) -> Decision | None:
        """The first enforced deny of one call (a batch has several), or None."""
        activations = Activations(check.policy_set)
        shared = Once(partial(activations.activation, check.variables))
        for policy in check.policy_set.policies:
            if check.unreadable is not None and policy.uses_body:
                check.audit(policy.name, check.unreadable)
                continue
            try:
                if policy.when is not None and not applies(policy, shared(), check.trace):
                    continue
                found = self._session(check, policy, activations) if policy.session is not None else None
                presented = self._presented_handles(check, policy, shared) if policy.handles else ()
            except PolicyFailure as failure:
                # An audit policy only records what it would refuse, errors and session refusals
                # included; an enforcing one refuses.
                if not policy.audit:
                    return failure.denial
                check.audit(policy.name, failure.denial)
                check.sessions.setdefault(policy.name, None)
                continue
            variables, activation = check.variables, shared
            sees_handle = bool(presented) and "handle" in check.policy_set.reads
            if found is not None or sees_handle:
                variables = dict(check.variables)
                if found is not None:
                    variables["session"] = found[1]
                if sees_handle:
                    kind, first = presented[0]
                    variables["handle"] = handle_variable(kind.name, first.data, first.existed)
                activation = Once(partial(activations.activation, variables))
            verdict = judge(policy, activation, variables, check.trace, check.policy_set.memo)
            if verdict.enforced is not None:
                return verdict.enforced
            if verdict.audited is not None:
                check.audit(policy.name, verdict.audited)
            if verdict.terminate and found is not None and found[0].existed:
                check.ending[found[0].key] = found[0]
                if check.trace is not None:
                    check.trace(policy.name, "", "session.terminate", True)
            if policy.handles and not policy.audit:
                self._after_handles(check, policy, presented, activation, variables)
        return None

    def _presented_handles(
        self, check: _Check, policy: Policy, activation: Once
    ) -> tuple[tuple[HandleKind, Handle], ...]:
        """Each handle the call presents, found and bound to this caller; a refusal raises
        PolicyFailure with the kind's answer. A refusal never changes the stored handle."""
        presented: list[tuple[HandleKind, Handle]] = []
        binder = self.handle_binder
        owner = None if check.identity is None else (check.identity.issuer, check.identity.subject)
        for kind in policy.handles:
            if kind.argument is not None:
                arguments = check.variables["mcp"].get("arguments", {})
                value = arguments.get(kind.argument, "")
            elif kind.header is not None:
                value = check.context.headers.get(kind.header, "")
            else:
                value = presented_value(kind, activation(), policy.name)
            if isinstance(value, str) and value == "":
                continue
            shown = value if isinstance(value, str) else ""
            problem = handle_problem(value, binder.settings.max_id_length)
            if problem is not None:
                refused = HandleRefused(decision.HANDLE_INVALID, problem)
                raise PolicyFailure(_handle_denial(check, policy, kind, refused, shown))
            assert isinstance(value, str)
            key = f"{kind.name}:{value}"
            found: Handle | HandleRefused | None = check.handles.get(key)
            if found is None:
                found = binder.find(kind.name, value, owner, kind.ttl, kind.unknown_allowed, check.now)
            if check.trace is not None:
                check.trace(policy.name, "", f"handle {kind.name}", found)
            if isinstance(found, HandleRefused):
                raise PolicyFailure(_handle_denial(check, policy, kind, found, value))
            check.handles[key] = found
            if not check.handle_kind:
                check.handle_kind, check.handle_id = kind.name, value
            presented.append((kind, found))
        return tuple(presented)

    def _after_handles(
        self, check: _Check, policy: Policy, presented: tuple[tuple[HandleKind, Handle], ...],
        activation: Once, variables: Mapping[str, Any],
    ) -> None:
        """What an allowed call does to handles: the owner's terminating request ends one (once
        every policy allows), and a request whose response may mint one has it read."""
        for kind, handle in presented:
            if handle.existed and ends_handle(kind, activation, variables, policy.name):
                check.handles_ending[handle.key] = handle
                if check.trace is not None:
                    check.trace(policy.name, "", f"handle {kind.name} terminate", True)
        if not check.mints:
            check.mints = any(may_mint(kind, activation, variables, policy.name) for kind in policy.handles)

    def mint(
        self, context: RequestContext, identity: Identity | None, response: dict[str, Any], now: float,
        trace: Tracer | None = None,
    ) -> Decision:
        """The response side: bind each handle that the upstream's response to an allowed
        request mints, to the identity that asked. `response` is the `response` variable:
        `status`, `headers` (lower-case names), `json` (the parsed body; for an SSE stream, one
        event's data). A handle bound to someone else, or ended, is a re-issue (502); a minted
        expression that fails, or a value that cannot be a handle, refuses the response (502)."""
        policy_set = self.policies.current
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
            "claims": identity.claims if identity else {},
            "auth": identity.auth_map if identity else ANONYMOUS_AUTH_MAP,
            "session": NO_SESSION,
            "handle": NO_HANDLE,
            "context": context.context_extensions,
            "source": {"address": context.source_address, "principal": context.source_principal},
            "now": timestamp(now),
        }
        request_activation = policy_set.engine.activation(variables)
        response_activation = Once(lambda: policy_set.engine.activation({**variables, "response": response}))
        owner = None if identity is None else (identity.issuer, identity.subject)
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
                    problem = handle_problem(value, self.handle_binder.settings.max_id_length)
                    if problem is not None:
                        refused = HandleRefused(decision.HANDLE_UNREADABLE, f"{kind.name}: minted: {problem}")
                        return _minted_denial(policy, kind, refused, value)
                    assert isinstance(value, str)
                    bind = partial(handle_bind_values, kind, request_activation, policy.name)
                    bound = self.handle_binder.mint(kind.name, value, owner, bind, now)
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

    def _session(
        self, check: _Check, policy: Policy, activations: Activations
    ) -> tuple[Session, dict[str, Any]] | None:
        """The policy's session and its `session` variable, found or bound once per check."""
        if policy.name in check.sessions:
            return check.sessions[policy.name]
        assert policy.session is not None
        header, variables = policy.session.header, check.variables
        key = check.context.headers.get(header, "") if header else session_key(
            policy, activations.activation(variables)
        )
        found: Session | Refusal | None = None
        if key:
            owner = None if check.identity is None else (check.identity.issuer, check.identity.subject)
            found = self._binder.find_or_bind(
                key, owner, lambda: bind_values(policy, activations.activation(variables)), check.now
            )
        if isinstance(found, Refusal):
            denial = decision.deny(found.reason, policy=policy.name, error=found.message)
            if check.trace is not None:
                check.trace(policy.name, "", "session", denial)
            raise PolicyFailure(denial)
        if check.trace is not None:
            check.trace(policy.name, "", "session", found)
        fields = check.policy_set.reads.get("session")
        result = None if found is None else (found, session_variable(key, found.data, found.existed, fields))
        check.sessions[policy.name] = result
        check.session_new = check.session_new or (found is not None and not found.existed)
        return result

    # ---- the response path (session.bind_on: response; gateway/extproc.py) ----

    @property
    def binds_on_response(self) -> bool:
        return self._binder.binds_on_response

    def session_headers(self) -> frozenset[str]:
        """The headers that carry a session id (the policies' `session.header`)."""
        policy_set = self.policies.current
        known = self._session_headers
        if known[0] is not policy_set:  # computed once per loaded policy set
            policies = policy_set.policies
            headers = frozenset(p.session.header for p in policies if p.session and p.session.header)
            known = self._session_headers = (policy_set, headers)
        return known[1]

    def bind_issued(
        self, context: RequestContext, identity: Identity | None, issued: dict[str, str], now: float
    ) -> Decision:
        """The upstream's response to an allowed request issued `issued` (session header → id):
        bind each new id to the request's identity, with the policy's `bind` values, before the
        response reaches the client. The request's own id, repeated, is its session. A deny
        (`session_reissued`, …) means the response must not be delivered. `when` and `bind` see
        the request's headers only (no body: `mcp` is empty)."""
        policy_set = self.policies.current
        check = _Check(policy_set, context, identity, now, None)
        check.unreadable = _HEADERS_ONLY
        activation: Any = None
        try:
            for policy in policy_set.policies:
                header = policy.session.header if policy.session else None
                key = issued.get(header) if header else None
                if key is None or key == context.headers.get(header or ""):
                    continue
                if activation is None:
                    refused = _gather_variables(check)
                    if refused is not None:
                        return refused
                    activation = Activations(policy_set).activation(check.variables)
                try:
                    if policy.when is not None and not applies(policy, activation):
                        continue
                    owner = None if identity is None else (identity.issuer, identity.subject)
                    found = self._binder.bind_issued(
                        key, owner, partial(bind_values, policy, activation), now
                    )
                    if isinstance(found, Refusal):
                        denial = decision.deny(found.reason, policy=policy.name, error=found.message)
                        raise PolicyFailure(denial)
                except PolicyFailure as failure:
                    if not policy.audit:
                        return check.denied(failure.denial)
                    check.audit(policy.name, failure.denial)
                    continue
                check.session_new = check.session_new or not found.existed
        except StoreUnavailable as exc:
            return decision.deny(decision.STORE_UNAVAILABLE, error=f"session store: {exc}")
        audits = tuple(check.audits)
        return Decision(True, decision.ALLOWED, audit_denies=audits, session_new=check.session_new)

    def forget_sessions(self, context: RequestContext, identity: Identity | None, now: float) -> int:
        """The upstream answered that it does not know the session the request carried: each
        such live session of this identity ends (a `terminated` tombstone). How many ended.
        Raises StoreUnavailable."""
        owner = None if identity is None else (identity.issuer, identity.subject)
        ended = 0
        for header in self.session_headers():
            key = context.headers.get(header)
            if key and self._binder.forgotten(key, owner, now):
                ended += 1
        return ended

    def _allow(self, check: _Check) -> Decision:
        identity = check.identity
        if check.audits or check.session_new:
            return Decision(True, decision.ALLOWED, audit_denies=tuple(check.audits),
                            session_new=check.session_new, upstream_headers=self._upstream_headers(identity),
                            handle_kind=check.handle_kind, handle_id=check.handle_id,
                            mints_handles=check.mints)
        if check.handle_kind or check.mints:
            return self._handle_allow(check)
        key = None if identity is None else (identity.issuer, identity.subject)
        allowed = self._allows.get(key)
        if allowed is None:
            allowed = Decision(True, decision.ALLOWED, upstream_headers=self._upstream_headers(identity))
            self._allows.remember(key, allowed)
        return allowed

    def _handle_allow(self, check: _Check) -> Decision:
        """An allow that names a handle, or whose response may mint one: one immutable
        Decision per identity and handle, as for ordinary allows (bounded)."""
        identity = check.identity
        key = (
            None if identity is None else (identity.issuer, identity.subject),
            check.handle_kind, check.handle_id, check.mints,
        )
        allowed = self._handle_allows.get(key)
        if allowed is None:
            allowed = Decision(True, decision.ALLOWED, upstream_headers=self._upstream_headers(identity),
                               handle_kind=check.handle_kind, handle_id=check.handle_id,
                               mints_handles=check.mints)
            self._handle_allows.remember(key, allowed)
        return allowed

    def _upstream_headers(self, identity: Identity | None) -> tuple[tuple[str, str], ...]:
        if identity is None or not self._auth.upstream_headers:
            return ()
        return ((UPSTREAM_SUBJECT, identity.subject), (UPSTREAM_ISSUER, identity.issuer))


# A refused response (the upstream's answer withheld from the client).
STATUS_OF_RESPONSE_REFUSAL = 502


def _handle_denial(
    check: _Check, policy: Policy, kind: HandleKind, refused: HandleRefused, value: str
) -> Decision:
    """The kind's refusal: a JSON-RPC error with the call's own id (null for a batch, which is
    refused whole), at the kind's status; a mismatch records whose handle it was."""
    calls = check.context.parsed_mcp
    batch = isinstance(calls, tuple) and len(calls) > 1
    call = check.call or check.context.mcp_for_telemetry()
    mismatch = None
    if refused.reason == decision.HANDLE_MISMATCH:
        mismatch = _handle_mismatch(refused.bound or {}, check.identity)
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


def _unreadable_request(why: str) -> Decision:
    return decision.deny(decision.HANDLE_UNREADABLE, status=STATUS_OF_RESPONSE_REFUSAL, error=why)


def _minted_denial(policy: Policy, kind: HandleKind, refused: HandleRefused, value: Any) -> Decision:
    # The response is withheld (502), unless the reason names its own answer: one identity's
    # handles at their cap is 429 (docs/reference.md).
    limited = refused.reason == decision.HANDLE_LIMIT_EXCEEDED
    status = decision.STATUS_OF[refused.reason] if limited else STATUS_OF_RESPONSE_REFUSAL
    denial = decision.deny(refused.reason, status=status, policy=policy.name, error=refused.message)
    return replace(denial, handle_kind=kind.name, handle_id=value if isinstance(value, str) else "")


def _read_body(check: _Check) -> Decision | None:
    """Where a policy reads the body, it is read before any policy runs: a `when` must not be
    skipped by an empty MCP view while a lenient server reads the body as a call."""
    policy_set = check.policy_set
    refused = check.context.body_refusal("mcp" in policy_set.reads)
    if refused is None:
        return None
    readers = [p for p in policy_set.policies if p.uses_body]
    denial = decision.deny(refused.reason, policy=readers[0].name if readers else "", error=str(refused))
    if any(not p.audit for p in readers) or not readers or refused.reason == decision.REQUEST_BODY_PARTIAL:
        return denial
    check.unreadable = denial  # only audit policies read it: they record the refusal
    return None


def _gather_variables(check: _Check) -> Decision | None:
    """The variables the policy set reads, as plain values (docs/policies.md, Variables); a deny for a
    query it cannot judge. What no expression reads is never built."""
    reads, context, identity = check.policy_set.reads, check.context, check.identity
    variables: dict[str, Any] = {
        "claims": identity.claims if identity else {},
        "auth": identity.auth_map if identity else ANONYMOUS_AUTH_MAP,
        "session": NO_SESSION,
        "handle": NO_HANDLE,
        "context": context.context_extensions,
    }
    if "request" in reads:
        fields = reads["request"]
        if context.query_repeated and (fields is None or "query" in fields):
            message = "a policy reads the query, and a parameter repeats"
            return decision.deny(decision.REQUEST_INVALID, error=message)
        variables["request"] = context.request_map(fields)
    if "mcp" in reads:
        variables["mcp"] = (context.mcp if check.unreadable is None else NOT_MCP).as_cel()
    if "source" in reads:
        variables["source"] = {"address": context.source_address, "principal": context.source_principal}
    if "now" in reads:
        variables["now"] = timestamp(check.now)
    check.variables = variables
    return None


def _calls_to_judge(check: _Check) -> tuple[McpCall | None, ...]:
    """Each call of a batch is judged on its own. Policies that never read `mcp` judge the
    request once (None: `mcp` as gathered), and the body is never parsed."""
    if "mcp" in check.policy_set.reads and check.unreadable is None:
        calls = check.context.mcp_calls
        # The first call is in the variables already.
        return (None if check.trace is None else calls[0], *calls[1:])
    if check.trace is not None:
        return (check.context.mcp_for_telemetry(),)
    return (None,)
