"""The gRPC admin API (authz_gateway.admin.v1.SessionAdmin) over a session store.

Off unless `admin.listen` is set. Every call is authenticated before it reaches the
service: `start_admin_server` takes the server's TLS credentials (mTLS: the handshake
itself refuses a client without a certificate from `admin.client_ca`) and an `Authenticate`
callable run on each call, which names the caller or raises `Refused` (gRPC
UNAUTHENTICATED or PERMISSION_DENIED). Both are built in gateway/admin.py from the config:
this module knows nothing of tokens or certificates.

Log lines never carry session ids, tokens, or the subjects a request names; a revoke
names who asked for it (the caller `Authenticate` returned).
"""

from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import Callable
from concurrent import futures
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import struct_pb2

from gateway.adminpb import admin_pb2, admin_pb2_grpc
from gateway.session import operations
from gateway.session.operations import InvalidSessionId, SessionInfo
from gateway.session.store import SessionStore, StoreUnavailable

log = logging.getLogger(__name__)


class Refused(Exception):
    """A call the admin API does not serve: `code` is UNAUTHENTICATED (who is asking is not
    established) or PERMISSION_DENIED (established, but not an administrator). The message
    goes back to the caller and into the log: it must name no secret."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


# Names the caller of one call (e.g. "token of iss=… sub=…"), or raises Refused.
Authenticate = Callable[[grpc.ServicerContext], str]

# The caller of the call being served, set by the guard for the service's log lines.
_caller: contextvars.ContextVar[str] = contextvars.ContextVar("admin_caller", default="an unknown caller")


def admin_address(listen: str) -> str:
    """HOST:PORT to bind; no host means loopback."""
    return f"127.0.0.1{listen}" if listen.startswith(":") else listen


def to_message(info: SessionInfo) -> admin_pb2.Session:
    bound = struct_pb2.Struct()
    try:
        bound.update(dict(info.bound))
    except (TypeError, ValueError):
        bound = struct_pb2.Struct()  # a bound value a Struct cannot hold: leave it out
    return admin_pb2.Session(
        id=info.id,
        state=info.state,
        anonymous=info.anonymous,
        created_at=info.created_at,
        owner=info.owner,
        bound=bound,
    )


class SessionAdminService(admin_pb2_grpc.SessionAdminServicer):  # type: ignore[misc]  # untyped base
    def __init__(
        self, store: SessionStore, max_id_length: int = 256, handle_store: SessionStore | None = None
    ) -> None:
        self._sessions = store
        self._max_id_length = max_id_length
        self._handles = handle_store

    def _store_of(self, request: Any, context: grpc.ServicerContext) -> SessionStore:
        """The session store, or with `handles` set the handle store (ids `<kind>:<handle>`)."""
        if not request.handles:
            return self._sessions
        if self._handles is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this gateway serves no handle store")
        assert self._handles is not None
        return self._handles

    def _id_length(self, request: Any) -> int:
        # A handle's id is its kind (at most 64 characters) and ':' before the handle itself.
        return self._max_id_length + 65 if request.handles else self._max_id_length

    def _fail(self, context: grpc.ServicerContext, exc: Exception) -> Any:
        if isinstance(exc, InvalidSessionId):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        log.warning("admin: the session store did not answer: %s", exc)
        context.abort(grpc.StatusCode.UNAVAILABLE, "the session store is unavailable")

    def ListSessions(self, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            sessions, truncated = operations.list_sessions(
                self._store_of(request, context), time.time(), request.limit or operations.DEFAULT_LIST_LIMIT
            )
        except StoreUnavailable as exc:
            return self._fail(context, exc)
        return admin_pb2.ListSessionsResponse(sessions=[to_message(s) for s in sessions], truncated=truncated)

    def GetSession(self, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            info = operations.show_session(
                self._store_of(request, context),
                operations.validate_id(request.id, self._id_length(request)),
                time.time(),
            )
        except (InvalidSessionId, StoreUnavailable) as exc:
            return self._fail(context, exc)
        if info is None:
            context.abort(grpc.StatusCode.NOT_FOUND, "no such session")
        return to_message(info)

    def RevokeSession(self, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            previous = operations.revoke_session(
                self._store_of(request, context),
                operations.validate_id(request.id, self._id_length(request)),
                time.time(),
            )
        except (InvalidSessionId, StoreUnavailable) as exc:
            return self._fail(context, exc)
        log.info(
            "admin: revoked a session (state before: %s), asked by %s", previous or "none", _caller.get()
        )
        return admin_pb2.RevokeSessionResponse(previous_state=previous)

    def RevokeSubject(self, request: Any, context: grpc.ServicerContext) -> Any:
        if not request.issuer or not request.subject:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "issuer and subject are both required")
        try:
            store = self._store_of(request, context)
            revoked = operations.revoke_subject(store, request.issuer, request.subject, time.time())
        except StoreUnavailable as exc:
            return self._fail(context, exc)
        log.info("admin: revoked %d session(s) of one identity, asked by %s", revoked, _caller.get())
        return admin_pb2.RevokeSubjectResponse(revoked=revoked)


if TYPE_CHECKING:
    _Interceptor = grpc.ServerInterceptor[Any, Any]  # generic in grpc-stubs only
else:
    _Interceptor = grpc.ServerInterceptor


class _Guard(_Interceptor):
    """Runs `authenticate` before every method of the server, present and future: a method
    the guard cannot wrap (a streaming one) is refused rather than served unchecked."""

    def __init__(self, authenticate: Authenticate) -> None:
        self._authenticate = authenticate

    def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None:
            return None  # an unknown method: gRPC answers UNIMPLEMENTED
        behavior = handler.unary_unary
        if behavior is None:
            return grpc.unary_unary_rpc_method_handler(_unguardable)
        authenticate = self._authenticate

        def guarded(request: Any, context: grpc.ServicerContext) -> Any:
            try:
                caller = authenticate(context)
            except Refused as exc:
                log.warning("admin: refused a call to %s (%s: %s)", details.method, exc.code.name, exc)
                context.abort(exc.code, str(exc))
            token = _caller.set(caller)
            try:
                return behavior(request, context)
            finally:
                _caller.reset(token)

        return grpc.unary_unary_rpc_method_handler(
            guarded,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def _unguardable(_request: Any, context: grpc.ServicerContext) -> Any:
    context.abort(grpc.StatusCode.UNIMPLEMENTED, "not served by the admin API")


def start_admin_server(
    listen: str,
    store: SessionStore,
    max_id_length: int = 256,
    *,
    authenticate: Authenticate,
    credentials: grpc.ServerCredentials | None = None,
    handle_store: SessionStore | None = None,
) -> tuple[grpc.Server, int]:
    """Serve the admin API on `listen`; returns the server and the bound port.

    `authenticate` runs on every call (gateway/admin.py builds it from the config: there is
    no admin API without one). `credentials`: TLS (and mTLS) for the port, else plaintext.
    """
    address = admin_address(listen)
    host = address.rpartition(":")[0]
    interceptors: list[_Interceptor] = [_Guard(authenticate)]
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="admin"), interceptors=interceptors
    )
    service = SessionAdminService(store, max_id_length, handle_store)
    admin_pb2_grpc.add_SessionAdminServicer_to_server(service, server)
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError:  # grpcio's "Failed to bind"
        port = 0
    if port == 0:
        raise OSError(f"cannot listen on {address} (admin.listen)")
    server.start()
    log.info("admin API listening on %s (%s)", f"{host}:{port}", "TLS" if credentials else "plaintext")
    return server, port
