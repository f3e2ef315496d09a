"""The decision step: the allow a check that passed every policy answers, with the identity's
upstream headers; one immutable `Decision` remembered per identity (and handle) for the steady
traffic that adds nothing of its own."""

from __future__ import annotations

from gateway import decision
from gateway.config import AuthConfig
from gateway.decision import Allows, Decision
from gateway.identity.verifier import Identity
from gateway.pipeline.state import CheckState

UPSTREAM_SUBJECT = "x-authz-subject"
UPSTREAM_ISSUER = "x-authz-issuer"
UPSTREAM_HEADERS = (UPSTREAM_SUBJECT, UPSTREAM_ISSUER)


class AllowDecisions:
    def __init__(self, auth: AuthConfig) -> None:
        self._auth = auth
        self._allows = Allows()
        self._handle_allows = Allows()

    def allow(self, state: CheckState) -> Decision:
        identity = state.identity
        if state.audits or state.session_new:
            return Decision(True, decision.ALLOWED, audit_denies=tuple(state.audits),
                            session_new=state.session_new, upstream_headers=self._upstream_headers(identity),
                            handle_kind=state.handle_kind, handle_id=state.handle_id,
                            mints_handles=state.mints)
        if state.handle_kind or state.mints:
            return self._handle_allow(state)
        key = state.owner
        allowed = self._allows.get(key)
        if allowed is None:
            allowed = Decision(True, decision.ALLOWED, upstream_headers=self._upstream_headers(identity))
            self._allows.remember(key, allowed)
        return allowed

    def _handle_allow(self, state: CheckState) -> Decision:
        """An allow that names a handle, or whose response may mint one: one immutable
        Decision per identity and handle, as for ordinary allows (bounded)."""
        key = (state.owner, state.handle_kind, state.handle_id, state.mints)
        allowed = self._handle_allows.get(key)
        if allowed is None:
            upstream_headers = self._upstream_headers(state.identity)
            allowed = Decision(True, decision.ALLOWED, upstream_headers=upstream_headers,
                               handle_kind=state.handle_kind, handle_id=state.handle_id,
                               mints_handles=state.mints)
            self._handle_allows.remember(key, allowed)
        return allowed

    def _upstream_headers(self, identity: Identity | None) -> tuple[tuple[str, str], ...]:
        if identity is None or not self._auth.upstream_headers:
            return ()
        return ((UPSTREAM_SUBJECT, identity.subject), (UPSTREAM_ISSUER, identity.issuer))
