"""`authz-gateway sessions`: list, show and revoke stored sessions.

Works on the configured store directly (--config / --store: SQLite or Redis, shared with
the running gateways), or through a running gateway's admin API (--admin HOST:PORT),
which is the only way to reach a memory:// store. Prints session ids (that is its job),
never tokens: a legacy record's fields are not shown.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path
from typing import Any, Protocol

from gateway.config import Config, ConfigError, load_config
from gateway.session import StoreURLError, open_store, operations
from gateway.session.operations import InvalidSessionId, SessionInfo
from gateway.session.store import SessionStore, StoreSettings, StoreUnavailable


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


class AdminBackend:
    """The same operations through a gateway's gRPC admin API."""

    def __init__(self, address: str) -> None:
        import grpc

        from gateway.adminpb import admin_pb2, admin_pb2_grpc
        from gateway.session.admin_api import admin_address

        self._grpc = grpc
        self._pb = admin_pb2
        self._channel = grpc.insecure_channel(admin_address(address))
        self._stub = admin_pb2_grpc.SessionAdminStub(self._channel)

    def _call(self, method: str, request: Any) -> Any:
        try:
            return getattr(self._stub, method)(request, timeout=10)
        except self._grpc.RpcError as exc:
            code = exc.code()
            if code == self._grpc.StatusCode.INVALID_ARGUMENT:
                raise InvalidSessionId(exc.details()) from None
            if code == self._grpc.StatusCode.NOT_FOUND:
                raise LookupError(exc.details()) from None
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
        reply = self._call("ListSessions", self._pb.ListSessionsRequest(limit=limit))
        return [self._info(s) for s in reply.sessions], bool(reply.truncated)

    def show(self, session_id: str) -> SessionInfo | None:
        try:
            return self._info(self._call("GetSession", self._pb.GetSessionRequest(id=session_id)))
        except LookupError:
            return None

    def revoke(self, session_id: str) -> str:
        return str(self._call("RevokeSession", self._pb.RevokeSessionRequest(id=session_id)).previous_state)

    def revoke_subject(self, issuer: str, subject: str) -> int:
        reply = self._call("RevokeSubject", self._pb.RevokeSubjectRequest(issuer=issuer, subject=subject))
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
    common.add_argument("--json", action="store_true", help="one JSON object per session")
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
        return AdminBackend(args.admin)
    config = load_config(args.config) if args.config else Config()
    url = args.store or config.store
    if url.startswith("memory:"):
        raise StoreURLError(
            "memory:// lives inside one gateway process: give --store (sqlite:///…, redis://…) or "
            "--admin HOST:PORT (the gateway's admin.listen)"
        )
    s = config.session
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
    except StoreUnavailable as exc:
        print(f"authz-gateway: the session store is unavailable: {exc}", file=sys.stderr)
        return 3
    finally:
        backend.close()
