"""The identity step: the request's token (and the proof of possession it calls for) to an
`Identity`, None for an allowed anonymous request, or a deny."""

from __future__ import annotations

from gateway import decision
from gateway.config import AuthConfig
from gateway.decision import Decision
from gateway.identity.dpop import DpopRejected, NonceRequired, ProofVerifier, ReplayCache
from gateway.identity.sender import Presentation, SenderCheck
from gateway.identity.verifier import Identity, TokenRejected, TokenVerifier
from gateway.pipeline.state import Owner
from gateway.request import RequestContext
from gateway.session.replay import MemoryReplayCache
from gateway.session.store import StoreUnavailable


class IdentityStep:
    def __init__(self, auth: AuthConfig, verifier: TokenVerifier, replay: ReplayCache | None = None) -> None:
        self._verifier = verifier
        # DPoP proofs' jti are single-use; `replay` should live in the shared session store
        # (gateway.session.replay.replay_cache_for), or a proof can be replayed at another replica.
        proofs = ProofVerifier(auth.dpop, auth.leeway, replay if replay is not None else MemoryReplayCache())
        self.sender = SenderCheck(verifier, auth.dpop, proofs, auth.allow_anonymous)

    def identify(
        self, context: RequestContext, now: float, admitted: bool = False
    ) -> Identity | Decision | None:
        """The verified identity, None for an allowed anonymous request, or a deny. `admitted`:
        a request Check allowed, seen again on the response path (SenderCheck.authenticate)."""
        presented = Presentation(
            context.method, context.scheme, context.host, context.path, context.client_certificate
        )
        try:
            return self.sender.authenticate(context.headers, presented, now, admitted)
        except DpopRejected as rejected:
            nonce = (("dpop-nonce", rejected.nonce),) if isinstance(rejected, NonceRequired) else ()
            return decision.deny(
                rejected.reason, error=str(rejected), headers=nonce, dpop_failure=rejected.failure
            )
        except TokenRejected as rejected:
            return decision.deny(rejected.reason, error=str(rejected))
        except StoreUnavailable as exc:
            return decision.deny(decision.STORE_UNAVAILABLE, error=f"DPoP replay cache: {exc}")

    def holder_of(self, authorization: str) -> Owner | None:
        """Whose token an Authorization value carries, when Check verified it a moment ago (the
        response path shares its streams out by identity, not by token: a refresh is no new share)."""
        _, _, token = authorization.strip().partition(" ")
        return self._verifier.owner_of(token.strip()) if token.strip() else None
