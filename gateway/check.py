"""One check, step by step: request context → identity → session → policy → decision.

This is where the pure steps meet the store. The time of the check is passed in once;
every failure on the way (bad token, store down, CEL error) ends in a deny, never an allow.
"""

from __future__ import annotations

import datetime
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

from google.protobuf import timestamp_pb2

from gateway import decision
from gateway.config import AuthConfig, SessionConfig
from gateway.decision import AuditDeny, Decision
from gateway.identity.verifier import ANONYMOUS_AUTH_MAP, Identity, TokenRejected, TokenVerifier, bearer_token
from gateway.mcp import NOT_MCP, McpCall
from gateway.policy.evaluate import PolicyFailure, Tracer, applies, bind_values, judge, session_key
from gateway.policy.model import Policy, PolicySet
from gateway.request import RequestContext, RequestError
from gateway.session.record import (
    ENDED_TERMINATED,
    needs_tombstone,
    new_record,
    owner_key,
    refusal,
    tombstone,
    valid_session_id,
)
from gateway.session.store import SessionStore, StoreUnavailable

log = logging.getLogger(__name__)

NO_SESSION: Mapping[str, Any] = {"id": "", "exists": False, "anonymous": False}
UPSTREAM_SUBJECT = "x-authz-subject"
UPSTREAM_ISSUER = "x-authz-issuer"
UPSTREAM_HEADERS = (UPSTREAM_SUBJECT, UPSTREAM_ISSUER)
_ALLOW_CACHE_SIZE = 10_000


class PolicyHolder:
    """The current policy set; reload swaps it in one assignment, so a check sees one whole set."""

    def __init__(self, policies: PolicySet) -> None:
        self._current = policies

    @property
    def current(self) -> PolicySet:
        return self._current

    def swap(self, policies: PolicySet) -> None:
        self._current = policies


@dataclass(slots=True)
class _Session:
    policy: Policy
    key: str
    data: Mapping[str, Any]
    variable: Mapping[str, Any]
    existed: bool


def _timestamp(seconds: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC)


def _timestamp_value(seconds: float) -> timestamp_pb2.Timestamp:
    # Inside a map, the native CEL runtime takes a Timestamp message, not a datetime.
    value = timestamp_pb2.Timestamp()
    value.FromNanoseconds(int(seconds * 1e9))
    return value


def _session_variable(
    key: str, data: Mapping[str, Any], existed: bool, fields: frozenset[str] | None
) -> dict[str, Any]:
    variable: dict[str, Any] = dict(data.get("bound", {}))
    variable["id"] = key
    variable["exists"] = existed
    variable["anonymous"] = bool(data.get("anonymous", False))
    if fields is None or "created_at" in fields:
        variable["created_at"] = _timestamp_value(float(data.get("created_at", 0.0)))
    return variable


class _Once:
    """Calls `make` the first time it is called, and returns that result ever after."""

    __slots__ = ("_make", "_value")

    def __init__(self, make: Callable[[], Any]) -> None:
        self._make: Callable[[], Any] | None = make
        self._value: Any = None

    def __call__(self) -> Any:
        if self._make is not None:
            self._value = self._make()
            self._make = None
        return self._value


class _Activations:
    """Activations holding only the variables, and fields, that the policy set reads:
    converting values into CEL is most of what an evaluation costs."""

    __slots__ = ("_engine", "_reads")

    def __init__(self, policy_set: PolicySet) -> None:
        self._engine = policy_set.engine
        self._reads = policy_set.reads

    def activation(self, variables: Mapping[str, Any]) -> Any:
        data: dict[str, Any] = {}
        for name, fields in self._reads.items():
            value = variables.get(name)
            if value is None:
                continue
            if fields is not None and type(value) is dict:
                value = {k: value[k] for k in fields if k in value}
            data[name] = value
        return self._engine.activation(data)


def _unreadable(policy_set: PolicySet, context: RequestContext, reads_mcp: bool) -> Decision | None:
    """The refusal of a body the gateway cannot judge exactly as the server would read it."""
    if context.body_partial:
        reader = next((p.name for p in policy_set.policies if p.uses_body), "")
        message = "a policy reads the body, and Envoy sent only part of it"
        return decision.deny(decision.REQUEST_BODY_PARTIAL, policy=reader, error=message)
    try:
        context.check_body_readable()
        if reads_mcp:
            context.mcp_calls  # noqa: B018 - parsed here so that a refusal comes first
    except RequestError as exc:
        return decision.deny(exc.reason, error=str(exc))
    return None


class Authorizer:
    def __init__(
        self,
        auth: AuthConfig,
        sessions: SessionConfig,
        verifier: TokenVerifier,
        store: SessionStore,
        policies: PolicyHolder,
    ) -> None:
        self._auth = auth
        self._sessions = sessions
        self._verifier = verifier
        self._store = store
        self.policies = policies
        self._allows: dict[tuple[str, str] | None, Decision] = {}

    @property
    def store(self) -> SessionStore:
        return self._store

    def identify(self, context: RequestContext, now: float) -> Identity | Decision | None:
        """The verified identity, None for an allowed anonymous request, or a deny."""
        token = bearer_token(context.headers)
        if token is None:
            if "authorization" in context.headers:
                # Credentials that are not a usable Bearer token are refused, never taken for
                # an anonymous request (the upstream would still receive them).
                message = "the Authorization header is not a Bearer token"
                return decision.deny(decision.TOKEN_INVALID, error=message)
            if self._auth.allow_anonymous:
                return None
            return decision.deny(decision.TOKEN_MISSING, error="no bearer token")
        try:
            return self._verifier.verify(token, now)
        except TokenRejected as rejected:
            return decision.deny(rejected.reason, error=str(rejected))

    def check(self, context: RequestContext, now: float) -> Decision:
        identity = self.identify(context, now)
        if isinstance(identity, Decision):
            return identity
        return self.check_identity(context, identity, now)

    def check_identity(
        self, context: RequestContext, identity: Identity | None, now: float, trace: Tracer | None = None
    ) -> Decision:
        """Sessions and policies for an identity already verified (None: anonymous).

        `policy test` and `policy explain` enter here with claims instead of a token;
        `trace` sees every step for `explain`.
        """
        try:
            return self._authorize(context, identity, now, trace)
        except PolicyFailure as failure:
            return failure.denial
        except StoreUnavailable as exc:
            return decision.deny(decision.STORE_UNAVAILABLE, error=f"session store: {exc}")

    def _authorize(
        self, context: RequestContext, identity: Identity | None, now: float, trace: Tracer | None = None
    ) -> Decision:
        policy_set = self.policies.current
        engine = _Activations(policy_set)
        reads = policy_set.reads
        unreadable: Decision | None = None
        if policy_set.uses_body or "mcp" in reads:
            # Before any policy: one that cannot read the body must not be skipped by a `when`
            # that saw an empty MCP view, while a lenient server reads the body as a call.
            unreadable = _unreadable(policy_set, context, "mcp" in reads)
            if unreadable is not None and any(p.uses_body and not p.audit for p in policy_set.policies):
                return unreadable
        variables: dict[str, Any] = {
            "claims": identity.claims if identity else {},
            "auth": identity.auth_map if identity else ANONYMOUS_AUTH_MAP,
            "session": NO_SESSION,
            "context": context.context_extensions,
        }
        if "request" in reads:
            fields = reads["request"]
            if context.query_repeated and (fields is None or "query" in fields):
                message = "a query parameter is repeated, and a policy reads the query"
                return decision.deny(decision.REQUEST_INVALID, error=message)
            variables["request"] = context.request_map(fields)
        # Only audit policies read a body that cannot be read: they record the refusal below.
        readable_calls = unreadable is None and "mcp" in reads
        if readable_calls:
            variables["mcp"] = context.mcp.as_cel()
        elif "mcp" in reads:
            variables["mcp"] = NOT_MCP.as_cel()
        if "source" in reads:
            variables["source"] = {"address": context.source_address, "principal": context.source_principal}
        if "now" in reads:
            variables["now"] = _timestamp(now)
        sessions: dict[str, _Session | None] = {}
        audits: list[AuditDeny] = []
        ending: dict[str, _Session] = {}
        session_new = False
        # A batch passes only if every call in it passes, each judged on its own. Policies
        # that never read `mcp` judge the request once, and the body is never parsed.
        if readable_calls:
            calls: tuple[McpCall | None, ...] = context.mcp_calls
        elif trace is not None:
            calls = (context.mcp_for_telemetry(),)
        else:
            calls = (None,)
        for call in calls:
            if call is not None and call is not context.mcp:
                variables["mcp"] = call.as_cel()
            if trace is not None:
                trace("", "", "mcp", call)
            # Building an activation is most of what CEL costs here: build it only when an
            # expression needs the variables without a session, and then once.
            shared = _Once(partial(engine.activation, variables))
            for policy in policy_set.policies:
                if unreadable is not None and policy.uses_body:
                    audits.append(AuditDeny(policy.name, "", unreadable.reason, unreadable.status))
                    continue
                session: _Session | None = None
                try:
                    if policy.when is not None and not applies(policy, shared(), trace):
                        continue
                    if policy.session is not None:
                        if policy.name not in sessions:
                            found = self._session(policy, policy_set, context, variables, identity, now)
                            if trace is not None:
                                trace(policy.name, "", "session", found)
                            if isinstance(found, Decision):
                                raise PolicyFailure(found)
                            sessions[policy.name] = found
                            session_new = session_new or (found is not None and not found.existed)
                        session = sessions[policy.name]
                except PolicyFailure as failure:
                    # An audit policy only records what it would refuse, errors and session
                    # refusals included; an enforcing one refuses.
                    if not policy.audit:
                        return replace(failure.denial, audit_denies=tuple(audits))
                    denied = failure.denial
                    audits.append(AuditDeny(policy.name, denied.rule, denied.reason, denied.status))
                    sessions.setdefault(policy.name, None)
                    continue
                if session is not None:
                    rule_variables = {**variables, "session": session.variable}
                    make_activation: Callable[[], Any] = _Once(partial(engine.activation, rule_variables))
                else:
                    rule_variables, make_activation = variables, shared
                verdict = judge(policy, make_activation, rule_variables, trace, policy_set.memo)
                if verdict.enforced is not None:
                    return replace(verdict.enforced, audit_denies=tuple(audits))
                if verdict.audited is not None:
                    denied = verdict.audited
                    audits.append(AuditDeny(policy.name, denied.rule, denied.reason, denied.status))
                if verdict.terminate and session is not None and session.existed:
                    ending[session.key] = session
                    if trace is not None:
                        trace(policy.name, "", "session.terminate", True)
        # Only a request that passes every policy may end a session (the owner's DELETE).
        for session in ending.values():
            self._store.replace(session.key, tombstone(session.data, ENDED_TERMINATED, now), now)
        if audits or session_new:
            return Decision(
                allowed=True,
                reason=decision.ALLOWED,
                audit_denies=tuple(audits),
                session_new=session_new,
                upstream_headers=self._upstream_headers(identity),
            )
        return self._plain_allow(identity)

    def _plain_allow(self, identity: Identity | None) -> Decision:
        """The allow of an identity's ordinary request: one immutable Decision per identity."""
        key = (identity.issuer, identity.subject) if identity is not None else None
        allowed = self._allows.get(key)
        if allowed is None:
            allowed = Decision(True, decision.ALLOWED, upstream_headers=self._upstream_headers(identity))
            if len(self._allows) >= _ALLOW_CACHE_SIZE:
                self._allows.clear()
            self._allows[key] = allowed
        return allowed

    def _upstream_headers(self, identity: Identity | None) -> tuple[tuple[str, str], ...]:
        if identity is None or not self._auth.upstream_headers:
            return ()
        return ((UPSTREAM_SUBJECT, identity.subject), (UPSTREAM_ISSUER, identity.issuer))

    def _session(
        self,
        policy: Policy,
        policy_set: PolicySet,
        context: RequestContext,
        variables: Mapping[str, Any],
        identity: Identity | None,
        now: float,
    ) -> _Session | Decision | None:
        """The request's session for a policy with `session` (bound now if new), None when the
        request names none, or a refusal. Uses the policy set the check started with."""
        assert policy.session is not None
        engine = _Activations(policy_set)
        fields = policy_set.reads.get("session")
        header = policy.session.header
        key = context.headers.get(header, "") if header else session_key(policy, engine.activation(variables))
        if not key:
            return None
        if not valid_session_id(key, self._sessions.max_id_length):
            return decision.deny(
                decision.SESSION_ID_INVALID, policy=policy.name, error="malformed session id"
            )
        loaded = self._store.load(key, now)
        if loaded is not None:
            return self._existing(policy, key, loaded.data, loaded.last_seen, now, fields)
        anonymous = identity is None
        bound = {} if identity is None else bind_values(policy, engine.activation(variables))
        try:
            json.dumps(bound)
        except (TypeError, ValueError):
            return decision.deny(
                decision.POLICY_ERROR, policy=policy.name, error="session.bind values must be JSON values"
            )
        owner = "" if identity is None else owner_key(identity.issuer, identity.subject)
        record = new_record(anonymous=anonymous, bound=bound, owner=owner, now=now)
        created = self._store.create(key, record, now, self._sessions.max_per_identity)
        if created.over_limit:
            return decision.deny(
                decision.SESSION_LIMIT_EXCEEDED, policy=policy.name, error="too many live sessions"
            )
        if created.created:
            return _Session(
                policy,
                key,
                record,
                _session_variable(key, record, False, fields),
                existed=False,
            )
        # Another bind won the race: this request is judged against the winner's binding.
        assert created.existing is not None
        return self._existing(policy, key, created.existing.data, created.existing.last_seen, now, fields)

    def _existing(
        self,
        policy: Policy,
        key: str,
        data: Mapping[str, Any],
        last_seen: float | None,
        now: float,
        fields: frozenset[str] | None,
    ) -> _Session | Decision:
        reason = refusal(data, last_seen, now, self._sessions.ttl, self._sessions.idle_timeout)
        if reason is None:
            return _Session(policy, key, data, _session_variable(key, data, True, fields), existed=True)
        ended = needs_tombstone(reason, data)
        if ended is not None:
            # Invalidate on read: the old record goes, and the id is never re-bound.
            self._store.replace(key, tombstone(data, ended, now), now)
        return decision.deny(reason, policy=policy.name, error=f"stored session refused: {reason}")
