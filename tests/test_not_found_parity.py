"""404 parity: a refused session looks exactly like a session that never existed.

With the default policy the gateway answers a caller whose identity does not match a stored
session with a 404, and an ended session with a 404. A session id that was never issued passes
the gateway (bind on first use) and the MCP server answers its own 404. Through the example
Envoy config, the three must be the same bytes (status line, headers but `date`, body), or an
attacker could tell "someone else's session" from "no such session".

Everything here is real: Envoy from examples/envoy/envoy.yaml, the gateway process with the
shipped default policy, the official `mcp` SDK's MCPServer as the upstream. The probes are
raw HTTP/1.1 over a socket, so what is compared is what a client receives, byte for byte.
"""

from __future__ import annotations

import json
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.config import (
    MAX_RESPONSE_BODY_BYTES,
    MCP_SDK_SESSION_NOT_FOUND_BODY,
    ConfigError,
    config_from_mapping,
)
from gateway.policy.loader import default_policy_dir
from tests.support.checks import check_request, denied_headers, http_status
from tests.support.inprocess import InProcessGateway
from tests.support.issuer import TestIssuer
from tests.support.mcp_upstream import McpUpstream
from tests.support.processes import EnvoyProcess, GatewayProcess, free_port, start_envoy

pytestmark = pytest.mark.timeout(60)

MCP_PATH = "/mcp"
PROTOCOL_VERSION = "2025-11-25"
INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": PROTOCOL_VERSION,
        "capabilities": {},
        "clientInfo": {"name": "parity-test", "version": "1"},
    },
}
TOOLS_CALL = {
    "jsonrpc": "2.0",
    "id": 7,
    "method": "tools/call",
    "params": {"name": "echo", "arguments": {"text": "x"}},
}


@dataclass(frozen=True)
class RawResponse:
    status_line: bytes
    header_lines: tuple[bytes, ...]  # as received: order and spelling kept
    body: bytes

    @property
    def headers(self) -> list[tuple[str, str]]:
        pairs = []
        for line in self.header_lines:
            name, _, value = line.decode("latin-1").partition(":")
            pairs.append((name.strip().lower(), value.strip()))
        return pairs

    def without_date(self) -> list[tuple[str, str]]:
        return sorted((k, v) for k, v in self.headers if k != "date")

    def masked(self) -> bytes:
        """The whole response as received, with only the date's value blanked out."""
        lines = [
            b"date: <masked>" if line.lower().startswith(b"date:") else line for line in self.header_lines
        ]
        return b"\r\n".join([self.status_line, *lines]) + b"\r\n\r\n" + self.body


def _read_response(sock: socket.socket, pending: bytes) -> tuple[RawResponse, bytes]:
    while b"\r\n\r\n" not in pending:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"the connection closed mid-response: {pending!r}")
        pending += chunk
    head, _, rest = pending.partition(b"\r\n\r\n")
    status_line, *header_lines = head.split(b"\r\n")
    lengths = [line for line in header_lines if line.lower().startswith(b"content-length:")]
    assert len(lengths) == 1, f"expected one content-length header: {head!r}"
    length = int(lengths[0].split(b":", 1)[1])
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError("the connection closed mid-body")
        rest += chunk
    return RawResponse(status_line, tuple(header_lines), rest[:length]), rest[length:]


def raw_exchange(port: int, request: bytes, times: int = 2) -> list[RawResponse]:
    """Send the same request `times` times on one keep-alive connection, as a client would."""
    responses = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        pending = b""
        for _ in range(times):
            sock.sendall(request)
            response, pending = _read_response(sock, pending)
            responses.append(response)
    return responses


def mcp_request(port: int, method: str, token: str, session_id: str, body: Any = None) -> bytes:
    lines = [
        f"{method} {MCP_PATH} HTTP/1.1",
        f"host: 127.0.0.1:{port}",
        f"authorization: Bearer {token}",
        f"mcp-session-id: {session_id}",
        f"mcp-protocol-version: {PROTOCOL_VERSION}",
        "accept: application/json, text/event-stream",
    ]
    payload = b""
    if body is not None:
        payload = json.dumps(body).encode()
        lines += ["content-type: application/json", f"content-length: {len(payload)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + payload


def probe(port: int, method: str, token: str, session_id: str) -> list[RawResponse]:
    body = TOOLS_CALL if method == "POST" else None
    return raw_exchange(port, mcp_request(port, method, token, session_id, body))


@dataclass
class Stack:
    idp: TestIssuer
    gateway: GatewayProcess
    upstream: McpUpstream
    envoy: EnvoyProcess
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{MCP_PATH}"

    def headers(self, token: str, session_id: str | None = None) -> dict[str, str]:
        headers = {
            "authorization": f"Bearer {token}",
            "accept": "application/json, text/event-stream",
            "content-type": "application/json",
            "mcp-protocol-version": PROTOCOL_VERSION,
        }
        if session_id:
            headers["mcp-session-id"] = session_id
        return headers

    def open_session(self, token: str) -> str:
        """initialize + notifications/initialized, by hand: the gateway binds the id to the token."""
        opened = httpx.post(self.url, headers=self.headers(token), content=json.dumps(INITIALIZE), timeout=10)
        assert opened.status_code == 200, opened.text
        session_id = opened.headers["mcp-session-id"]
        note = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        ready = httpx.post(
            self.url, headers=self.headers(token, session_id), content=json.dumps(note), timeout=10
        )
        assert ready.status_code == 202, ready.text
        return session_id

    def call(self, token: str, session_id: str) -> httpx.Response:
        return httpx.post(
            self.url, headers=self.headers(token, session_id), content=json.dumps(TOOLS_CALL), timeout=10
        )


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("not-found-parity")
    idp = TestIssuer()
    started: list[Any] = []
    try:
        # The default policy and no `responses` section: parity must hold out of the box.
        config = {
            "policies": str(default_policy_dir()),
            "store": "memory://",
            "auth": {"issuers": [idp.issuer_config()]},
        }
        gateway = GatewayProcess(config, work)
        started.append(gateway)
        upstream = McpUpstream(free_port())
        started.append(upstream)
        envoy, port = start_envoy(work, [gateway.port], upstream.port)
        started.append(envoy)
        yield Stack(idp, gateway, upstream, envoy, port)
    finally:
        for part in reversed(started):
            part.stop()
        idp.stop()


def test_refused_ended_and_unknown_sessions_are_the_same_bytes(stack: Stack) -> None:
    alice, mallory = stack.idp.token("alice"), stack.idp.token("mallory")
    session_id = stack.open_session(alice)
    methods = ("POST", "GET", "DELETE")

    # (i) another identity with alice's session id: refused by the gateway (subject_mismatch).
    hijacked = {m: probe(stack.port, m, mallory, session_id) for m in methods}
    owner_after = stack.call(alice, session_id)
    assert owner_after.status_code == 200 and '"x"' in owner_after.text  # her session is untouched

    # (ii) the owner ends the session; every later use is refused by the gateway (session_terminated).
    ended = httpx.delete(stack.url, headers=stack.headers(alice, session_id), timeout=10)
    assert ended.status_code == 200
    terminated = {m: probe(stack.port, m, alice, session_id) for m in methods}

    # (iii) ids nobody was ever issued: the gateway binds them and lets them through; the MCP
    # server answers its own 404.
    unknown_ids = {m: uuid.uuid4().hex for m in methods}
    unknown = {m: probe(stack.port, m, alice, unknown_ids[m]) for m in methods}

    # Where each answer came from: (iii) from the MCP server, (i) and (ii) from the gateway.
    seen = stack.upstream.seen
    for m in methods:
        reached = [r for r in seen if r.session_id == unknown_ids[m]]
        assert [(r.method, r.status) for r in reached] == [(m, 404), (m, 404)]
    assert not [r for r in seen if mallory in r.headers.get("authorization", "")]
    after_delete = [r for r in seen if r.session_id == session_id]
    assert after_delete[-1].method == "DELETE"  # nothing of (ii) reached the server

    reference = unknown["POST"][0]
    assert reference.status_line == b"HTTP/1.1 404 Not Found"
    assert reference.body == MCP_SDK_SESSION_NOT_FOUND_BODY.encode()
    assert [k for k, _ in reference.headers].count("date") == 1
    assert dict(reference.headers) | {"date": ""} == {
        "content-length": str(len(MCP_SDK_SESSION_NOT_FOUND_BODY)),
        "content-type": "application/json",
        "cache-control": "no-store",
        "date": "",
        "server": "envoy",
    }
    answers = {
        f"{case} {m} #{i + 1}": response
        for case, responses in (("hijacked", hijacked), ("terminated", terminated), ("unknown", unknown))
        for m in methods
        for i, response in enumerate(responses[m])
    }
    for name, response in answers.items():
        # As asked: status, header names and values (order aside, date aside), body.
        assert response.status_line == reference.status_line, name
        assert response.without_date() == reference.without_date(), name
        assert response.body == reference.body, name
        # Stricter: the same bytes on the wire, header order and spelling included.
        assert response.masked() == reference.masked(), name


def test_the_default_is_what_the_mcp_sdk_server_itself_answers(stack: Stack) -> None:
    """Straight to the MCP server, no Envoy: its 404 for an unknown id is the gateway's default."""
    direct = f"http://127.0.0.1:{stack.upstream.port}{MCP_PATH}"
    headers = stack.headers(stack.idp.token("alice"), uuid.uuid4().hex)
    answered = httpx.post(direct, headers=headers, content=json.dumps(TOOLS_CALL), timeout=10)
    assert answered.status_code == 404
    assert answered.content == MCP_SDK_SESSION_NOT_FOUND_BODY.encode()
    default = config_from_mapping({}).responses.session_not_found
    assert answered.headers["content-type"] == default.content_type
    # What Envoy normalizes away is really there without it.
    assert "cache-control" not in answered.headers and answered.headers["server"] == "uvicorn"


def test_the_setting_is_every_session_404_and_only_those(tmp_path: Path) -> None:
    """`responses.session_not_found` is sent for each built-in session refusal, through gRPC Check."""
    # JWKS from files: the keys are there before the first check (no fetch to wait for).
    idp, other_idp = TestIssuer(serve=False, name="idp"), TestIssuer(serve=False, name="other-idp")
    body = "session not found\n"  # what an MCP server written with another SDK might answer
    gateway = InProcessGateway(
        {
            "policies": str(default_policy_dir()),
            "auth": {
                "issuers": [
                    idp.issuer_config(jwks_file=idp.write_jwks(tmp_path / "idp.json")),
                    other_idp.issuer_config(jwks_file=other_idp.write_jwks(tmp_path / "other.json")),
                ],
                "allow_anonymous": True,
            },
            "responses": {"session_not_found": {"content_type": "text/plain; charset=utf-8", "body": body}},
        }
    )
    try:
        alice = idp.token("alice")
        check = gateway.client.check
        assert http_status(check(check_request(token=alice, session_id="s-1"))) == 200
        assert http_status(check(check_request(session_id="s-anon"))) == 200
        refusals = {
            "subject_mismatch": check(check_request(token=idp.token("bob"), session_id="s-1")),
            "issuer_mismatch": check(check_request(token=other_idp.token("alice"), session_id="s-1")),
            "session_anonymous_upgrade": check(check_request(token=alice, session_id="s-anon")),
        }
        reasons = [d.reason for d in gateway.decisions[-3:]]
        assert http_status(check(check_request(method="DELETE", token=alice, session_id="s-1"))) == 200
        refusals["session_terminated"] = check(check_request(token=alice, session_id="s-1"))
        reasons.append(gateway.last.reason)
        assert reasons == list(refusals)
        for reason, response in refusals.items():
            assert http_status(response) == 404, reason
            assert response.denied_response.body == body, reason
            assert denied_headers(response) == {
                "content-length": str(len(body)),
                "content-type": "text/plain; charset=utf-8",
                "cache-control": "no-store",
            }, reason
        # Other denials keep their small JSON error.
        unauthorized = check(check_request(token="not-a-jwt", session_id="s-3"))
        assert http_status(unauthorized) == 401
        assert unauthorized.denied_response.body == '{"error":"invalid_token"}'
        assert denied_headers(unauthorized)["content-type"] == "application/json"
    finally:
        gateway.stop()


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"session_not_found": {"content_type": "json"}}, "content_type: not a media type"),
        ({"session_not_found": {"content_type": "text/plain\r\nx-a: 1"}}, "content_type: not a media type"),
        ({"session_not_found": {"content_type": " text/plain"}}, "content_type: not a media type"),
        ({"session_not_found": {"body": "{not json"}}, "body: is not valid JSON"),
        (
            {"session_not_found": {"content_type": "application/problem+json", "body": "nope"}},
            "body: is not valid JSON",
        ),
        ({"session_not_found": {"body": " " * (MAX_RESPONSE_BODY_BYTES + 1)}}, "body: must be at most"),
        ({"session_not_found": {"body": {"error": "x"}}}, "body: must be a string"),
        ({"session_not_found": {"body": None}}, "body: must be a string"),
        ({"session_not_found": {"status": 410}}, "unknown key 'status'"),
        ({"not_found": {}}, "responses: unknown key 'not_found'"),
    ],
)
def test_bad_settings_are_refused_with_file_and_key(section: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as refused:
        config_from_mapping({"responses": section}, "gw.yaml")
    assert str(refused.value).startswith("gw.yaml: responses")
    assert message in str(refused.value)


def test_settings_that_load() -> None:
    default = config_from_mapping({}).responses.session_not_found
    assert (default.content_type, default.body) == ("application/json", MCP_SDK_SESSION_NOT_FOUND_BODY)
    json.loads(default.body)  # a JSON-RPC error object
    custom = config_from_mapping(
        {"responses": {"session_not_found": {"content_type": "text/plain", "body": ""}}}
    ).responses.session_not_found
    assert (custom.content_type, custom.body) == ("text/plain", "")
    ts_sdk = '{"jsonrpc":"2.0","error":{"code":-32001,"message":"Session not found"},"id":null}'
    only_body = config_from_mapping({"responses": {"session_not_found": {"body": ts_sdk}}})
    assert only_body.responses.session_not_found.content_type == "application/json"
    assert only_body.responses.session_not_found.body == ts_sdk
