"""What the response path (gateway/extproc.py, gateway/extproc_handles.py) asks of the steps,
through the same steps and caches as Check, and nothing of Check itself: who a request's token
belongs to, the session ids an upstream issues or forgets, the handles its response mints."""

from __future__ import annotations

from typing import Any

from gateway.decision import Decision
from gateway.identity.verifier import Identity
from gateway.pipeline.identify import IdentityStep
from gateway.pipeline.minting import mint
from gateway.pipeline.sessions import SessionStep
from gateway.pipeline.state import Owner
from gateway.policy.evaluate import Tracer
from gateway.policy.model import PolicyHolder
from gateway.request import RequestContext
from gateway.session.handles import HandleBinder


class ResponsePath:
    def __init__(
        self, policies: PolicyHolder, identity: IdentityStep, sessions: SessionStep,
        handle_binder: HandleBinder,
    ) -> None:
        self.policies = policies
        self._identity = identity
        self._sessions = sessions
        self.handle_binder = handle_binder

    def identify(
        self, context: RequestContext, now: float, admitted: bool = False
    ) -> Identity | Decision | None:
        """As Check identifies (IdentityStep.identify); `admitted`: Check allowed the request."""
        return self._identity.identify(context, now, admitted)

    def holder_of(self, authorization: str) -> Owner | None:
        return self._identity.holder_of(authorization)

    @property
    def binds_on_response(self) -> bool:
        return self._sessions.binds_on_response

    def session_headers(self) -> frozenset[str]:
        """The headers that carry a session id (the policies' `session.header`)."""
        return self._sessions.headers(self.policies.current)

    def bind_issued(
        self, context: RequestContext, identity: Identity | None, issued: dict[str, str], now: float
    ) -> Decision:
        """Each session id the upstream's response issued (header → id), bound to the identity
        that asked before the response reaches the client (SessionStep.bind_issued)."""
        return self._sessions.bind_issued(self.policies.current, context, identity, issued, now)

    def forget_sessions(self, context: RequestContext, identity: Identity | None, now: float) -> int:
        """The sessions the upstream answered it does not know, ended; how many (SessionStep.forget)."""
        return self._sessions.forget(self.policies.current, context, identity, now)

    def mint(
        self, context: RequestContext, identity: Identity | None, response: dict[str, Any], now: float,
        kinds: str, trace: Tracer | None = None,
    ) -> Decision:
        """Each handle the response mints, of the kinds Check marked ("policy/kind" pairs,
        comma-joined), bound to the identity that asked (minting.mint)."""
        return mint(self.handle_binder, self.policies.current, context, identity, response, now, kinds, trace)
