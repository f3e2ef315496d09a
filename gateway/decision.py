"""The decision: allow, or deny with a status, a reason code and response headers.

Reason codes and their statuses are a contract (DESIGN.md §4); dashboards key on them.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

ALLOWED = "allowed"

TOKEN_MISSING = "token_missing"
TOKEN_INVALID = "token_invalid"
TOKEN_EXPIRED = "token_expired"
ISSUER_UNTRUSTED = "issuer_untrusted"
AUDIENCE_MISMATCH = "audience_mismatch"
SESSION_ID_INVALID = "session_id_invalid"
SESSION_TERMINATED = "session_terminated"
SESSION_EXPIRED = "session_expired"
SESSION_LEGACY_FORMAT = "session_legacy_format"
SESSION_ANONYMOUS_UPGRADE = "session_anonymous_upgrade"
ISSUER_MISMATCH = "issuer_mismatch"
SUBJECT_MISMATCH = "subject_mismatch"
SESSION_LIMIT_EXCEEDED = "session_limit_exceeded"
POLICY_ERROR = "policy_error"
STORE_UNAVAILABLE = "store_unavailable"
INTERNAL_ERROR = "internal_error"
# Added by this implementation (docs/reference.md): DESIGN.md §4 does not list them.
REQUEST_INVALID = "request_invalid"
REQUEST_UNPARSEABLE = "request_unparseable"
REQUEST_BODY_PARTIAL = "request_body_partial"
MCP_HEADER_MISMATCH = "mcp_header_mismatch"
# Handles (MCP 2026-07-28, docs/policies.md#handles). The three request-side refusals answer
# with the kind's refusal (a JSON-RPC error carrying the request's id), at the kind's status.
HANDLE_MISMATCH = "handle_mismatch"
HANDLE_UNKNOWN = "handle_unknown"
HANDLE_INVALID = "handle_invalid"
HANDLE_UNREADABLE = "handle_unreadable"
HANDLE_REISSUED = "handle_reissued"
HANDLE_LIMIT_EXCEEDED = "handle_limit_exceeded"
# session.bind_on: response (docs/sessions.md): an id no response of the server issued, and a
# response that hands out an id already bound to another identity (or ended).
SESSION_UNKNOWN = "session_unknown"
SESSION_REISSUED = "session_reissued"
# Proof of possession (DESIGN.md §1c): DPoP (RFC 9449) and certificate-bound tokens (RFC 8705).
DPOP_REQUIRED = "dpop_required"
DPOP_PROOF_INVALID = "dpop_proof_invalid"
DPOP_PROOF_REPLAYED = "dpop_proof_replayed"
DPOP_KEY_MISMATCH = "dpop_key_mismatch"
DPOP_NONCE_REQUIRED = "dpop_nonce_required"
CERTIFICATE_MISMATCH = "certificate_mismatch"

STATUS_OF: dict[str, int] = {
    TOKEN_MISSING: 401,
    TOKEN_INVALID: 401,
    TOKEN_EXPIRED: 401,
    ISSUER_UNTRUSTED: 401,
    AUDIENCE_MISMATCH: 401,
    SESSION_ID_INVALID: 400,
    SESSION_TERMINATED: 404,
    SESSION_EXPIRED: 404,
    SESSION_LEGACY_FORMAT: 404,
    SESSION_ANONYMOUS_UPGRADE: 404,
    ISSUER_MISMATCH: 404,
    SUBJECT_MISMATCH: 404,
    SESSION_LIMIT_EXCEEDED: 429,
    POLICY_ERROR: 403,
    STORE_UNAVAILABLE: 503,
    INTERNAL_ERROR: 500,
    REQUEST_INVALID: 400,
    REQUEST_UNPARSEABLE: 400,
    REQUEST_BODY_PARTIAL: 413,
    MCP_HEADER_MISMATCH: 400,
    HANDLE_MISMATCH: 404,
    HANDLE_UNKNOWN: 404,
    HANDLE_INVALID: 404,
    HANDLE_UNREADABLE: 502,
    HANDLE_REISSUED: 502,
    HANDLE_LIMIT_EXCEEDED: 429,
    SESSION_UNKNOWN: 404,
    SESSION_REISSUED: 502,
    DPOP_REQUIRED: 401,
    DPOP_PROOF_INVALID: 401,
    DPOP_PROOF_REPLAYED: 401,
    DPOP_KEY_MISMATCH: 401,
    DPOP_NONCE_REQUIRED: 401,
    CERTIFICATE_MISMATCH: 401,
}



@dataclass(frozen=True, slots=True)
class Mismatch:
    """A bound session key that differs from what the request presents."""

    claim: str
    bound: Any
    presented: Any


@dataclass(frozen=True, slots=True)
class AuditDeny:
    policy: str
    rule: str
    reason: str
    status: int


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    reason: str
    status: int = 200
    policy: str = ""
    rule: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    mismatch: Mismatch | None = None
    audit_denies: tuple[AuditDeny, ...] = ()
    session_new: bool = False
    # For telemetry only: never sent to the client.
    error: str | None = None
    upstream_headers: tuple[tuple[str, str], ...] = field(default=())
    # Which DPoP check failed (typ, alg, jwk, signature, htm, htu, iat, jti, ath, jkt, nonce); telemetry only.
    dpop_failure: str = ""
    # The handle kind this decision is about (authz.handle.kind), and whether it bound a new one.
    handle_kind: str = ""
    handle_new: bool = False
    # The handle's value, for a keyed hash in telemetry only (authz.handle.id); never sent.
    handle_id: str = ""
    # An allow whose response may mint a handle: the "policy/kind" pairs Check decided may mint,
    # comma-joined ("" for none); only such responses are read, and only for those kinds.
    mints_handles: str = ""
    # A deny's exact answer (content type, body) instead of the reason's generic one: a handle
    # refusal is a JSON-RPC error carrying the request's own id.
    reply: tuple[str, str] | None = None


def deny(
    reason: str,
    *,
    status: int | None = None,
    policy: str = "",
    rule: str = "",
    headers: tuple[tuple[str, str], ...] = (),
    mismatch: Mismatch | None = None,
    error: str | None = None,
    dpop_failure: str = "",
) -> Decision:
    return Decision(
        allowed=False,
        reason=reason,
        status=status if status is not None else STATUS_OF.get(reason, 403),
        policy=policy,
        rule=rule,
        headers=headers,
        mismatch=mismatch,
        error=error,
        dpop_failure=dpop_failure,
    )


class Allows(dict[Hashable, Decision]):
    """The allows of ordinary requests (no audit deny, no new session), by what tells them apart
    (the identity; with handles, the handle too): one immutable Decision each, so the hot path
    allocates none. A dict, so that a hit is one C-level `get`. Bounded."""

    def __init__(self, size: int = 10_000) -> None:
        super().__init__()
        self._size = size

    def remember(self, key: Hashable, allowed: Decision) -> Decision:
        if len(self) >= self._size:
            self.clear()
        self[key] = allowed
        return allowed
