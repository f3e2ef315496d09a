"""`authz-gateway sessions`: list, show and revoke stored sessions.

Works on the configured store directly (--config / --store: SQLite or Redis, shared with
the running gateways), or through a running gateway's admin API (--admin HOST:PORT),
which is the only way to reach a memory:// store. Prints session ids (that is its job),
never tokens: a legacy record's fields are not shown.

The admin API authenticates every call (gateway/admin.py): a bearer token read from
--admin-token-file or $AUTHZ_ADMIN_TOKEN (never a flag value, which `ps` would show), and/or
a client certificate (--admin-cert, --admin-key) over TLS (--admin-ca: the CA of the gateway's
admin.tls_cert). A token is only sent in clear to a loopback address.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Protocol

from gateway.config import Config, ConfigError, is_loopback_listen, load_config
from gateway.session import StoreURLError, open_store, operations
from gateway.session.handles import open_handle_store
from gateway.session.operations import InvalidSessionId, SessionInfo
from gateway.session.store import SessionStore, StoreSettings, StoreUnavailable

# A handle's id is its kind (at most 64 characters) and ':' before the handle itself.
HANDLE_KIND_ROOM = 65


class Backend(Protocol):
    def list(self, limit: int) -> tuple[list[SessionInfo], bool]: ...
    def show(self, session_id: str) -> SessionInfo | None: ...
    def revoke(self, session_id: str) -> str: ...
    def revoke_subject(self, issuer: str, subject: str) -> int: ...
    def close(self) -> None: ...


class StoreBackend:
    def __init__(self, store: SessionStore, max_id_length: int) -> None:
        self._store = store
        self._max_id_length = max_id_length

    def list(self, limit: int) -> tuple[list[SessionInfo], bool]:
        return operations.list_sessions(self._store, time.time(), limit)

    def show(self, session_id: str) -> SessionInfo | None:
        return operations.show_session(
            self._store, operations.validate_id(session_id, self._max_id_length), time.time()
        )

    def revoke(self, session_id: str) -> str:
        return operations.revoke_session(
            self._store, operations.validate_id(session_id, self._max_id_length), time.time()
        )

    def revoke_subject(self, issuer: str, subject: str) -> int:
        return operations.revoke_subject(self._store, issuer, subject, time.time())

    def close(self) -> None:
        self._store.close()


TOKEN_ENV = "AUTHZ_ADMIN_TOKEN"


class AdminRefused(Exception):
    """The admin API did not accept the credentials (or none were given)."""


class AdminCredentials:
    """What the CLI presents to the admin API: a bearer token and/or TLS files (PEM bytes)."""

    def __init__(
        self,
        token: str | None = None,
        ca: bytes | None = None,
        cert: bytes | None = None,
        key: bytes | None = None,
    ) -> None:
        self.token = token
        self.ca = ca
        self.cert = cert
        self.key = key

    @property
    def tls(self) -> bool:
        return any(x is not None for x in (self.ca, self.cert, self.key))


def _read_file(path: Path, flag: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{flag}: cannot read {path}: {exc.strerror}") from None


def admin_credentials(args: argparse.Namespace) -> AdminCredentials:
    """From --admin-token-file (else $AUTHZ_ADMIN_TOKEN), --admin-ca, --admin-cert, --admin-key."""
    token = None
    if args.admin_token_file is not None:
        token = _read_file(args.admin_token_file, "--admin-token-file").decode("utf-8", "replace").strip()
        if not token:
            raise ValueError(f"--admin-token-file: {args.admin_token_file} is empty")
    elif os.environ.get(TOKEN_ENV, "").strip():
        token = os.environ[TOKEN_ENV].strip()
    if token is not None and any(not c.isprintable() or c.isspace() for c in token):
        raise ValueError("the admin token holds spaces or control characters: one token, on one line")
    if (args.admin_cert is None) != (args.admin_key is None):
        raise ValueError("--admin-cert and --admin-key go together (the client certificate and its key)")
    return AdminCredentials(
        token=token,
        ca=_read_file(args.admin_ca, "--admin-ca") if args.admin_ca else None,
        cert=_read_file(args.admin_cert, "--admin-cert") if args.admin_cert else None,
        key=_read_file(args.admin_key, "--admin-key") if args.admin_key else None,
    )


class AdminBackend:
    """The same operations through a gateway's gRPC admin API."""

    def __init__(
        self, address: str, credentials: AdminCredentials | None = None, handles: bool = False
    ) -> None:
        import grpc

        from gateway.adminpb import admin_pb2, admin_pb2_grpc
        from gateway.session.admin_api import admin_address

        credentials = credentials or AdminCredentials()
        target = admin_address(address)
        if credentials.token is not None and not credentials.tls and not is_loopback_listen(target):
            raise ValueError(
                f"a token is only sent in clear to a loopback address, not {address}: give --admin-ca "
                "(the CA of the gateway's admin.tls_cert) to use TLS"
            )
        self._grpc = grpc
        self._pb = admin_pb2
        self._handles = handles
        self._tls = credentials.tls
        self._metadata = (("authorization", f"Bearer {credentials.token}"),) if credentials.token else None
        if credentials.tls:
            channel_credentials = grpc.ssl_channel_credentials(
                root_certificates=credentials.ca,
                private_key=credentials.key,
                certificate_chain=credentials.cert,
            )
            self._channel = grpc.secure_channel(target, channel_credentials)
        else:
            self._channel = grpc.insecure_channel(target)
        self._stub = admin_pb2_grpc.SessionAdminStub(self._channel)

    def _call(self, method: str, request: Any) -> Any:
        try:
            return getattr(self._stub, method)(request, timeout=10, metadata=self._metadata)
        except self._grpc.RpcError as exc:
            code = exc.code()
            if code == self._grpc.StatusCode.INVALID_ARGUMENT:
                raise InvalidSessionId(exc.details()) from None
            if code == self._grpc.StatusCode.NOT_FOUND:
                raise LookupError(exc.details()) from None
            if code in (self._grpc.StatusCode.UNAUTHENTICATED, self._grpc.StatusCode.PERMISSION_DENIED):
                raise AdminRefused(f"{code.name}: {exc.details()}") from None
            if code == self._grpc.StatusCode.UNAVAILABLE and self._tls:
                raise StoreUnavailable(
                    f"admin API: {code.name}: {exc.details()} (no answer, or the TLS handshake failed: "
                    "check --admin-ca, --admin-cert and --admin-key)"
                ) from None
            raise StoreUnavailable(f"admin API: {code.name}: {exc.details()}") from None

    @staticmethod
    def _info(message: Any) -> SessionInfo:
        from google.protobuf.json_format import MessageToDict

        return SessionInfo(
            id=message.id,
            state=message.state,
            anonymous=message.anonymous,
            created_at=message.created_at,
            owner=message.owner,
            bound=MessageToDict(message.bound),
        )

    def list(self, limit: int) -> tuple[list[SessionInfo], bool]:
        reply = self._call("ListSessions", self._pb.ListSessionsRequest(limit=limit, handles=self._handles))
        return [self._info(s) for s in reply.sessions], bool(reply.truncated)

    def show(self, session_id: str) -> SessionInfo | None:
        try:
            request = self._pb.GetSessionRequest(id=session_id, handles=self._handles)
            return self._info(self._call("GetSession", request))
        except LookupError:
            return None

    def revoke(self, session_id: str) -> str:
        request = self._pb.RevokeSessionRequest(id=session_id, handles=self._handles)
        return str(self._call("RevokeSession", request).previous_state)

    def revoke_subject(self, issuer: str, subject: str) -> int:
        request = self._pb.RevokeSubjectRequest(issuer=issuer, subject=subject, handles=self._handles)
        reply = self._call("RevokeSubject", request)
        return int(reply.revoked)

    def close(self) -> None:
        self._channel.close()


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("sessions", help="list, show and revoke stored sessions")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, help="YAML config file (its store: and session: settings)")
    common.add_argument("--store", help="session store URL (overrides the config's store:)")
    common.add_argument("--admin", metavar="HOST:PORT", help="use a running gateway's admin API instead")
    common.add_argument(
        "--admin-token-file",
        type=Path,
        metavar="FILE",
        help=f"a bearer token for the admin API, read from FILE (else ${TOKEN_ENV})",
    )
    common.add_argument("--admin-ca", type=Path, metavar="FILE", help="TLS: the CA of the admin API's cert")
    common.add_argument("--admin-cert", type=Path, metavar="FILE", help="mTLS: the client certificate (PEM)")
    common.add_argument("--admin-key", type=Path, metavar="FILE", help="mTLS: the client certificate's key")
    common.add_argument("--json", action="store_true", help="one JSON object per session")
    common.add_argument(
        "--handles", action="store_true",
        help="handles (MCP 2026-07-28) instead of sessions; ids are KIND:HANDLE",
    )
    listing = actions.add_parser("list", parents=[common], help="stored sessions, tombstones included")
    listing.add_argument("--limit", type=int, default=operations.DEFAULT_LIST_LIMIT)
    show = actions.add_parser("show", parents=[common], help="one session")
    show.add_argument("id")
    revoke = actions.add_parser("revoke", parents=[common], help="end one session (404 session_terminated)")
    revoke.add_argument("id")
    subject = actions.add_parser(
        "revoke-subject", parents=[common], help="end every live session of one identity (iss + sub)"
    )
    subject.add_argument("--iss", required=True, help="the token issuer")
    subject.add_argument("--sub", required=True, help="the token subject")
    parser.set_defaults(run=run)


def _backend(args: argparse.Namespace) -> Backend:
    if args.admin:
        return AdminBackend(args.admin, admin_credentials(args), args.handles)
    for flag in ("admin_token_file", "admin_ca", "admin_cert", "admin_key"):
        if getattr(args, flag) is not None:
            raise ValueError(f"--{flag.replace('_', '-')} needs --admin HOST:PORT")
    config = load_config(args.config) if args.config else Config()
    url = args.store or config.store
    if url.startswith("memory:"):
        raise StoreURLError(
            "memory:// lives inside one gateway process: give --store (sqlite:///…, redis://…) or "
            "--admin HOST:PORT (the gateway's admin.listen)"
        )
    s = config.session
    if args.handles:
        store = open_handle_store(url, config.handles, s.store_timeout, s.max_sessions)
        return StoreBackend(store, config.handles.max_id_length + HANDLE_KIND_ROOM)
    settings = StoreSettings(s.ttl, s.idle_timeout, s.max_sessions, s.key_prefix, s.store_timeout)
    return StoreBackend(open_store(url, settings), s.max_id_length)


def _when(seconds: float) -> str:
    if not seconds:
        return "-"
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _as_json(info: SessionInfo) -> str:
    return json.dumps(
        {
            "id": info.id,
            "state": info.state,
            "anonymous": info.anonymous,
            "created_at": info.created_at or None,
            "owner": info.owner,
            "bound": dict(info.bound),
        },
        separators=(",", ":"),
        default=str,
    )


def _who(info: SessionInfo) -> tuple[str, str]:
    if info.anonymous:
        return "(anonymous)", ""
    return str(info.bound.get("iss", "-")), str(info.bound.get("sub", "-"))


def _print_table(sessions: list[SessionInfo]) -> None:
    rows = [("ID", "STATE", "CREATED", "ISSUER", "SUBJECT")]
    rows += [(s.id, s.state, _when(s.created_at), *_who(s)) for s in sessions]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:4])) + "  " + row[4])


def _print_one(info: SessionInfo, as_json: bool) -> None:
    if as_json:
        print(_as_json(info))
        return
    iss, sub = _who(info)
    print(f"id:         {info.id}")
    print(f"state:      {info.state}")
    print(f"created:    {_when(info.created_at)}")
    print(f"anonymous:  {str(info.anonymous).lower()}")
    print(f"owner:      {info.owner or '-'}")
    print(f"issuer:     {iss}")
    print(f"subject:    {sub or '-'}")
    others = {k: v for k, v in info.bound.items() if k not in ("iss", "sub")}
    for key, value in sorted(others.items()):
        print(f"bound.{key}: {json.dumps(value, default=str)}")


def execute(args: argparse.Namespace, backend: Backend) -> int:
    if args.action == "list":
        sessions, truncated = backend.list(max(1, args.limit))
        if args.json:
            for info in sessions:
                print(_as_json(info))
        else:
            _print_table(sessions)
        if truncated:
            print(f"(more than {len(sessions)} sessions; raise --limit to see more)", file=sys.stderr)
        return 0
    if args.action == "show":
        found = backend.show(args.id)
        if found is None:
            print("authz-gateway: no such session", file=sys.stderr)
            return 1
        _print_one(found, args.json)
        return 0
    if args.action == "revoke":
        previous = backend.revoke(args.id)
        if previous:
            print(f"revoked (was {previous}); requests with this id now get 404 session_terminated")
        else:
            print("no such session; the id is now blocked for the session TTL")
        return 0
    count = backend.revoke_subject(args.iss, args.sub)
    print(f"revoked {count} session{'s' if count != 1 else ''}")
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        backend = _backend(args)
    except (ConfigError, StoreURLError, StoreUnavailable, ValueError) as exc:
        print(f"authz-gateway: {exc}", file=sys.stderr)
        return 2
    try:
        return execute(args, backend)
    except InvalidSessionId as exc:
        print(f"authz-gateway: {exc}", file=sys.stderr)
        return 2
    except AdminRefused as exc:
        print(f"authz-gateway: the admin API refused the credentials ({exc})", file=sys.stderr)
        return 2
    except StoreUnavailable as exc:
        print(f"authz-gateway: the session store is unavailable: {exc}", file=sys.stderr)
        return 3
    finally:
        backend.close()
