"""The gRPC admin API (authz_gateway.admin.v1.SessionAdmin) over a session store.

Off unless `admin.listen` is set. It has no authentication of its own: an address
without a host (":9292") listens on loopback, and any other host is logged as a warning.
Log lines never carry session ids or subjects.
"""

from __future__ import annotations

import logging
import time
from concurrent import futures
from typing import Any

import grpc
from google.protobuf import struct_pb2

from gateway.adminpb import admin_pb2, admin_pb2_grpc
from gateway.config import Config
from gateway.session import operations
from gateway.session.operations import InvalidSessionId, SessionInfo
from gateway.session.store import SessionStore, StoreUnavailable

log = logging.getLogger(__name__)

_LOOPBACK = ("127.0.0.1", "::1", "[::1]", "localhost")


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
    def __init__(self, store: SessionStore, max_id_length: int = 256) -> None:
        self._store = store
        self._max_id_length = max_id_length

    def _fail(self, context: grpc.ServicerContext, exc: Exception) -> Any:
        if isinstance(exc, InvalidSessionId):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        log.warning("admin: the session store did not answer: %s", exc)
        context.abort(grpc.StatusCode.UNAVAILABLE, "the session store is unavailable")

    def ListSessions(self, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            sessions, truncated = operations.list_sessions(
                self._store, time.time(), request.limit or operations.DEFAULT_LIST_LIMIT
            )
        except StoreUnavailable as exc:
            return self._fail(context, exc)
        return admin_pb2.ListSessionsResponse(sessions=[to_message(s) for s in sessions], truncated=truncated)

    def GetSession(self, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            info = operations.show_session(
                self._store, operations.validate_id(request.id, self._max_id_length), time.time()
            )
        except (InvalidSessionId, StoreUnavailable) as exc:
            return self._fail(context, exc)
        if info is None:
            context.abort(grpc.StatusCode.NOT_FOUND, "no such session")
        return to_message(info)

    def RevokeSession(self, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            previous = operations.revoke_session(
                self._store, operations.validate_id(request.id, self._max_id_length), time.time()
            )
        except (InvalidSessionId, StoreUnavailable) as exc:
            return self._fail(context, exc)
        log.info("admin: revoked a session (state before: %s)", previous or "none")
        return admin_pb2.RevokeSessionResponse(previous_state=previous)

    def RevokeSubject(self, request: Any, context: grpc.ServicerContext) -> Any:
        if not request.issuer or not request.subject:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "issuer and subject are both required")
        try:
            revoked = operations.revoke_subject(self._store, request.issuer, request.subject, time.time())
        except StoreUnavailable as exc:
            return self._fail(context, exc)
        log.info("admin: revoked %d session(s) of one identity", revoked)
        return admin_pb2.RevokeSubjectResponse(revoked=revoked)


def start_admin_server(listen: str, store: SessionStore, max_id_length: int = 256) -> tuple[grpc.Server, int]:
    """Serve the admin API on `listen`; returns the server and the bound port."""
    address = admin_address(listen)
    host = address.rpartition(":")[0]
    if host not in _LOOPBACK:
        log.warning("admin API on %s: it has no authentication, keep it off untrusted networks", address)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="admin"))
    admin_pb2_grpc.add_SessionAdminServicer_to_server(SessionAdminService(store, max_id_length), server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address} (admin.listen)")
    server.start()
    log.info("admin API listening on %s", f"{host}:{port}")
    return server, port


def start_session_admin(config: Config, store: SessionStore) -> grpc.Server | None:
    """The admin API of a serving gateway, when `admin.listen` is set; else None."""
    if not config.admin.listen:
        return None
    return start_admin_server(config.admin.listen, store, config.session.max_id_length)[0]
