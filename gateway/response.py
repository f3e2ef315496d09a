"""A decision as Envoy's CheckResponse.

Bodies are small and never carry tokens, claims or binding details. Every 404 for a
built-in reason is the same bytes, `responses.session_not_found` (by default what the MCP
SDK's server answers for an unknown session id): a session that belongs to someone else
looks exactly like one that does not exist, even when the MCP server answered that one.
"""

from __future__ import annotations

import json
import threading

from gateway import decision
from gateway.config import AuthConfig, ResponsesConfig
from gateway.decision import Decision
from gateway.envoy_api.envoy.config.core.v3 import base_pb2
from gateway.envoy_api.envoy.service.auth.v3 import external_auth_pb2
from gateway.envoy_api.envoy.type.v3 import http_status_pb2
from gateway.envoy_api.google.rpc import code_pb2, status_pb2
from gateway.policy.handles import refusal_reply
from gateway.policy.model import HandleRefusal

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
# A second value of a header the deny already sets (the DPoP challenge beside the Bearer one):
# a separate header line, not a replacement.
_APPEND = base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD
# RFC 9449 §7.1 error codes of the DPoP challenge, by reason; other 401s say invalid_token.
_DPOP_ERROR = {
    decision.DPOP_PROOF_INVALID: "invalid_dpop_proof",
    decision.DPOP_PROOF_REPLAYED: "invalid_dpop_proof",
    decision.DPOP_KEY_MISMATCH: "invalid_dpop_proof",
    decision.DPOP_NONCE_REQUIRED: "use_dpop_nonce",
    decision.TOKEN_MISSING: "",
    decision.DPOP_REQUIRED: "",
}
_JSON = "application/json"
_NO_STORE = ("cache-control", "no-store")

# What the client reads; the precise reason goes to telemetry only.
_PUBLIC_ERROR = {
    400: "invalid_request",
    401: "invalid_token",
    403: "forbidden",
    404: "not_found",
    413: "request_too_large",
    429: "too_many_sessions",
    500: "internal_error",
    502: "bad_gateway",
    503: "unavailable",
}
_ALLOWED_CACHE_SIZE = 10_000
# Check's dynamic metadata for an allow whose response may mint a handle (read by ext_proc).
MINT_METADATA_KEY = "authz.handles.mint"
_BUILT_IN_REASONS = frozenset(decision.STATUS_OF) | {decision.ALLOWED}
# A handle refusal carries its kind's answer (Decision.reply, with the request's id); without
# one (a rule reusing the reason) it is the default refusal of a request without an id.
_HANDLE_REFUSALS = frozenset({decision.HANDLE_MISMATCH, decision.HANDLE_UNKNOWN, decision.HANDLE_INVALID})
_DEFAULT_HANDLE_REFUSAL = refusal_reply(HandleRefusal(), None)


def _header(name: str, value: str, action: int = _OVERWRITE) -> base_pb2.HeaderValueOption:
    header = base_pb2.HeaderValue(key=name, value=value)
    return base_pb2.HeaderValueOption(header=header, append_action=action)


def _quoted(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


class ResponseBuilder:
    def __init__(
        self,
        auth: AuthConfig,
        strip_headers: tuple[str, ...] = (),
        responses: ResponsesConfig | None = None,
    ) -> None:
        self._auth = auth
        self._not_found = (responses or ResponsesConfig()).session_not_found
        self._strip_headers = list(strip_headers)
        self._denied: dict[tuple[str, int], external_auth_pb2.CheckResponse] = {}
        # Responses are immutable once built: one per identity serves all its allows.
        self._allowed: dict[tuple[tuple[str, str], ...], external_auth_pb2.CheckResponse] = {}
        self._minting: dict[tuple[tuple[tuple[str, str], ...], str], external_auth_pb2.CheckResponse] = {}
        self._lock = threading.Lock()
        self._plain_ok = external_auth_pb2.CheckResponse(
            status=status_pb2.Status(code=code_pb2.OK),
            ok_response=external_auth_pb2.OkHttpResponse(headers_to_remove=self._strip_headers),
        )

    def challenge(self, reason: str) -> str:
        parts = [f'realm="{_quoted(self._auth.realm)}"']
        if reason != decision.TOKEN_MISSING:
            parts.append('error="invalid_token"')
        if self._auth.resource_metadata:
            parts.append(f'resource_metadata="{_quoted(self._auth.resource_metadata)}"')
        return "Bearer " + ", ".join(parts)

    def dpop_challenge(self, reason: str) -> str:
        """RFC 9449 §7.1: the DPoP scheme, its error, and the proof algorithms accepted."""
        parts = [f'realm="{_quoted(self._auth.realm)}"']
        error = _DPOP_ERROR.get(reason, "invalid_token")
        if error:
            parts.append(f'error="{error}"')
        parts.append(f'algs="{" ".join(self._auth.dpop.algorithms)}"')
        if self._auth.dpop.required and self._auth.resource_metadata:
            parts.append(f'resource_metadata="{_quoted(self._auth.resource_metadata)}"')
        return "DPoP " + ", ".join(parts)

    def challenges(self, reason: str) -> list[str]:
        """Every 401's WWW-Authenticate values, one per accepted scheme (RFC 9110 §11.6.1)."""
        dpop = self.dpop_challenge(reason)
        return [dpop] if self._auth.dpop.required else [self.challenge(reason), dpop]

    def _session_refusal(self, reason: str, status: int) -> bool:
        return status == 404 and reason in _BUILT_IN_REASONS and reason not in _HANDLE_REFUSALS

    def content_type(self, reason: str, status: int) -> str:
        return self._not_found.content_type if self._session_refusal(reason, status) else _JSON

    def body(self, reason: str, status: int) -> str:
        if reason in _HANDLE_REFUSALS:
            return _DEFAULT_HANDLE_REFUSAL[1]
        if self._session_refusal(reason, status):
            return self._not_found.body
        if status == 401 and reason == decision.TOKEN_MISSING:
            error = "unauthorized"
        elif status == 401 and _DPOP_ERROR.get(reason):
            error = _DPOP_ERROR[reason]
        elif reason not in _BUILT_IN_REASONS:
            error = reason  # a policy's own reason, e.g. insufficient_scope, is meant for the client
        else:
            error = _PUBLIC_ERROR.get(status, "forbidden")
        return json.dumps({"error": error}, separators=(",", ":"))

    def build(self, outcome: Decision) -> external_auth_pb2.CheckResponse:
        if outcome.allowed and outcome.mints_handles:
            return self._minting_response(outcome.upstream_headers, outcome.mints_handles)
        if outcome.allowed:
            if not outcome.upstream_headers:
                return self._plain_ok
            allowed = self._allowed.get(outcome.upstream_headers)
            if allowed is None:
                allowed = self._allowed_response(outcome.upstream_headers)
                with self._lock:
                    if len(self._allowed) >= _ALLOWED_CACHE_SIZE:
                        self._allowed.pop(next(iter(self._allowed)), None)
                    self._allowed[outcome.upstream_headers] = allowed
            return allowed
        if outcome.reply is not None:
            # A handle refusal: its own bytes (the request's JSON-RPC id), never cached.
            return self._denied_response(outcome.reason, outcome.status, outcome.headers, outcome.reply)
        if outcome.headers:
            return self._denied_response(outcome.reason, outcome.status, outcome.headers)
        key = (outcome.reason, outcome.status)
        cached = self._denied.get(key)
        if cached is None:
            cached = self._denied_response(outcome.reason, outcome.status, ())
            with self._lock:
                if len(self._denied) < 1024:
                    self._denied[key] = cached
        return cached

    def _minting_response(
        self, upstream_headers: tuple[tuple[str, str], ...], kinds: str
    ) -> external_auth_pb2.CheckResponse:
        """An allow whose response may mint a handle: Envoy's dynamic metadata tells the
        response path (ext_proc) to read it, and for which "policy/kind" pairs
        (gateway/extproc_handles.py)."""
        key = (upstream_headers, kinds)
        cached = self._minting.get(key)
        if cached is None:
            cached = external_auth_pb2.CheckResponse()
            cached.CopyFrom(self._allowed_response(upstream_headers))
            cached.dynamic_metadata.update({MINT_METADATA_KEY: kinds})
            with self._lock:
                if len(self._minting) >= _ALLOWED_CACHE_SIZE:
                    self._minting.pop(next(iter(self._minting)), None)
                self._minting[key] = cached
        return cached

    def _allowed_response(
        self, upstream_headers: tuple[tuple[str, str], ...]
    ) -> external_auth_pb2.CheckResponse:
        # Overwriting replaces any client-sent copy; Envoy applies removals after additions,
        # so the names set here must not also be removed.
        names = {name for name, _ in upstream_headers}
        return external_auth_pb2.CheckResponse(
            status=status_pb2.Status(code=code_pb2.OK),
            ok_response=external_auth_pb2.OkHttpResponse(
                headers=[_header(k, v) for k, v in upstream_headers],
                headers_to_remove=[h for h in self._strip_headers if h not in names],
            ),
        )

    def denial(self, outcome: Decision) -> tuple[str, list[tuple[str, str]]]:
        """The body and headers of a deny, as the client receives them (Check's denied_response,
        and the ext_proc ImmediateResponse of the response path)."""
        return self._denial(outcome.reason, outcome.status, outcome.headers, outcome.reply)

    def _denial(
        self,
        reason: str,
        status: int,
        extra_headers: tuple[tuple[str, str], ...],
        reply: tuple[str, str] | None = None,
    ) -> tuple[str, list[tuple[str, str]]]:
        if reply is None:
            reply = (self.content_type(reason, status), self.body(reason, status))
        content_type, body = reply
        # Envoy fills in content-length itself (in place), then appends date and server. Listing
        # content-length first gives a denial the header order of an upstream response after
        # the example Envoy config's normalization (content-length, content-type, cache-control,
        # date, server), so a session refusal matches the MCP server's own 404 in order too.
        headers = [
            ("content-length", str(len(body.encode("utf-8")))),
            ("content-type", content_type),
            _NO_STORE,
        ]
        if status == 401:
            headers.extend(("www-authenticate", value) for value in self.challenges(reason))
        extra = [(k.lower(), v) for k, v in extra_headers]
        if extra:  # a rule's own header replaces the gateway's values of that name
            replaced = {k for k, _ in extra}
            headers = [(k, v) for k, v in headers if k not in replaced] + extra
        return body, headers

    def _denied_response(
        self,
        reason: str,
        status: int,
        extra_headers: tuple[tuple[str, str], ...],
        reply: tuple[str, str] | None = None,
    ) -> external_auth_pb2.CheckResponse:
        body, headers = self._denial(reason, status, extra_headers, reply)
        grpc_code = code_pb2.UNAUTHENTICATED if status == 401 else code_pb2.PERMISSION_DENIED
        options, seen = [], set()
        for name, value in headers:
            options.append(_header(name, value, _APPEND if name in seen else _OVERWRITE))
            seen.add(name)
        return external_auth_pb2.CheckResponse(
            status=status_pb2.Status(code=grpc_code),
            denied_response=external_auth_pb2.DeniedHttpResponse(
                status=http_status_pb2.HttpStatus(code=status),
                headers=options,
                body=body,
            ),
        )
