"""The policies through the running gateway: real gRPC Check, real signed tokens, real JWKS file.

The default policy's promises (refresh keeps the session, another iss or sub gets 404, no
anonymous upgrade, a mismatch leaves the session alone, every 404 the same bytes) and the
MCP view (batches, cut-short bodies, non-JSON bodies, Mcp-* headers) as Envoy would see them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.config import MCP_SDK_SESSION_NOT_FOUND_BODY
from gateway.envoy_api.envoy.service.auth.v3 import external_auth_pb2
from gateway.policy.loader import default_policy_dir
from tests.support.checks import check_request, denied_headers, http_status
from tests.support.inprocess import InProcessGateway
from tests.support.issuer import TestIssuer

REPO = Path(__file__).resolve().parent.parent
TOOL_SCOPES = REPO / "examples" / "policies" / "tool-scopes"

pytestmark = pytest.mark.timeout(60)


class Env:
    def __init__(self, tmp_path: Path, policies: Path) -> None:
        self.idp = TestIssuer(serve=False, name="idp")
        self.other_idp = TestIssuer(serve=False, name="other-idp")
        self.gateway = InProcessGateway(
            {
                "policies": str(policies),
                "store": "memory://",
                "auth": {
                    "allow_anonymous": True,
                    "issuers": [
                        self.idp.issuer_config(jwks_file=self.idp.write_jwks(tmp_path / "idp.json")),
                        self.other_idp.issuer_config(
                            jwks_file=self.other_idp.write_jwks(tmp_path / "other.json")
                        ),
                    ],
                },
            },
            tmp_path,
        )

    def check(self, **kwargs: Any) -> external_auth_pb2.CheckResponse:
        kwargs.setdefault("body", json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}))
        return self.gateway.client.check(check_request(**kwargs))

    @property
    def reason(self) -> str:
        return self.gateway.last.reason

    def stop(self) -> None:
        self.gateway.stop()


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    environment = Env(tmp_path, default_policy_dir())
    yield environment
    environment.stop()


@pytest.fixture
def tools_env(tmp_path: Path) -> Iterator[Env]:
    environment = Env(tmp_path, TOOL_SCOPES)
    yield environment
    environment.stop()


def test_refreshed_token_keeps_the_session(env: Env) -> None:
    first = env.idp.token("alice", jti="first")
    assert http_status(env.check(token=first, session_id="s-refresh")) == 200
    assert env.gateway.last.session_new is True
    refreshed = env.idp.token("alice", jti="second", ttl=1200)
    assert refreshed != first
    assert http_status(env.check(token=refreshed, session_id="s-refresh")) == 200
    assert (env.reason, env.gateway.last.session_new) == ("allowed", False)


def test_other_subject_gets_404_and_the_owner_keeps_the_session(env: Env) -> None:
    alice, mallory = env.idp.token("alice"), env.idp.token("mallory")
    assert http_status(env.check(token=alice, session_id="s-sub")) == 200
    denied = env.check(token=mallory, session_id="s-sub")
    assert http_status(denied) == 404
    assert (env.reason, env.gateway.last.rule) == ("subject_mismatch", "same-subject")
    # A mismatch neither changes nor ends the stored session.
    assert http_status(env.check(token=alice, session_id="s-sub")) == 200
    assert http_status(env.check(token=mallory, session_id="s-sub")) == 404


def test_same_subject_from_another_issuer_gets_404(env: Env) -> None:
    assert http_status(env.check(token=env.idp.token("alice"), session_id="s-iss")) == 200
    assert http_status(env.check(token=env.other_idp.token("alice"), session_id="s-iss")) == 404
    assert env.reason == "issuer_mismatch"
    assert http_status(env.check(token=env.idp.token("alice"), session_id="s-iss")) == 200


def test_anonymous_session_cannot_be_upgraded(env: Env) -> None:
    assert http_status(env.check(session_id="s-anon")) == 200
    assert http_status(env.check(token=env.idp.token("alice"), session_id="s-anon")) == 404
    assert env.reason == "session_anonymous_upgrade"
    assert http_status(env.check(session_id="s-anon")) == 200


def test_request_without_a_session_passes(env: Env) -> None:
    initialize = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}})
    assert http_status(env.check(token=env.idp.token("alice"), body=initialize)) == 200
    assert (env.reason, env.gateway.last.session_new) == ("allowed", False)


def test_every_404_is_the_same_bytes(env: Env) -> None:
    """Mismatch (sub, iss, anonymous) and a terminated session: the same status, headers and body."""
    alice = env.idp.token("alice")
    env.check(token=alice, session_id="s-a")
    env.check(session_id="s-b")
    responses = {
        "subject_mismatch": env.check(token=env.idp.token("mallory"), session_id="s-a"),
        "issuer_mismatch": env.check(token=env.other_idp.token("alice"), session_id="s-a"),
        "session_anonymous_upgrade": env.check(token=alice, session_id="s-b"),
    }
    assert http_status(env.check(token=alice, session_id="s-a", method="DELETE", body="")) == 200
    responses["session_terminated"] = env.check(token=alice, session_id="s-a")
    assert env.reason == "session_terminated"
    serialized = {reason: r.SerializeToString() for reason, r in responses.items()}
    assert len(set(serialized.values())) == 1, serialized
    terminated = responses["session_terminated"]
    assert http_status(terminated) == 404
    assert terminated.denied_response.body == MCP_SDK_SESSION_NOT_FOUND_BODY
    assert denied_headers(terminated) == {
        "content-length": str(len(MCP_SDK_SESSION_NOT_FOUND_BODY)),
        "content-type": "application/json",
        "cache-control": "no-store",
    }


def test_delete_by_someone_else_does_not_end_the_session(env: Env) -> None:
    alice = env.idp.token("alice")
    env.check(token=alice, session_id="s-del")
    assert http_status(env.check(token=env.idp.token("mallory"), session_id="s-del", method="DELETE")) == 404
    assert http_status(env.check(token=alice, session_id="s-del")) == 200


# ---- the MCP view, with the tool allow-list example as the policies directory ----


def _call(name: str, id_: int = 1) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": id_, "method": "tools/call", "params": {"name": name}}


def test_batch_with_one_denied_call_is_denied(tools_env: Env) -> None:
    token = tools_env.idp.token("alice", scope="tools:echo")
    allowed_batch = json.dumps([_call("echo", 1), {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}])
    assert http_status(tools_env.check(token=token, body=allowed_batch)) == 200
    denied = tools_env.check(token=token, body=json.dumps([_call("echo", 1), _call("drop_tables", 2)]))
    assert http_status(denied) == 403
    assert tools_env.reason == "insufficient_scope"
    assert denied_headers(denied)["www-authenticate"] == (
        'Bearer error="insufficient_scope", scope="tools:drop_tables"'
    )
    assert denied.denied_response.body == '{"error":"insufficient_scope"}'


def test_partial_body_denies_when_the_policy_reads_the_body(tools_env: Env) -> None:
    token = tools_env.idp.token("alice", scope="tools:echo")
    cut = json.dumps([_call("echo", 1), _call("drop_tables", 2)])[:60]
    response = tools_env.check(token=token, body=cut, headers={"x-envoy-auth-partial-body": "true"})
    assert http_status(response) == 413
    assert (tools_env.reason, tools_env.gateway.last.policy) == ("request_body_partial", "tool-scopes")
    # The same cut-short body without the header cannot be judged: it is refused, never taken
    # for a request that is not MCP (a lenient server might still run part of it).
    assert http_status(tools_env.check(token=token, body=cut)) == 400
    assert tools_env.reason == "request_unparseable"


def test_partial_body_passes_when_no_policy_reads_the_body(env: Env) -> None:
    token = env.idp.token("alice")
    response = env.check(
        token=token, body='{"jsonrpc":"2.0","id":1,"me', headers={"x-envoy-auth-partial-body": "true"}
    )
    assert http_status(response) == 200


def test_a_body_that_is_not_a_call_leaves_mcp_empty(tools_env: Env) -> None:
    token = tools_env.idp.token("alice", scope="")
    form = {"content-type": "application/x-www-form-urlencoded"}
    assert http_status(tools_env.check(token=token, body="a=1&b={", headers=form)) == 200
    assert tools_env.reason == "allowed"


def test_a_json_body_the_gateway_cannot_read_is_refused(tools_env: Env) -> None:
    token = tools_env.idp.token("alice", scope="")
    for body, headers in (
        ("not json {", {}),
        (json.dumps({"method": "tools/call"}), {}),  # not JSON-RPC 2.0
        (json.dumps(_call("drop_tables")), {"content-type": "text/plain"}),
        (json.dumps(_call("drop_tables")), {"content-type": "application/json; charset=utf-16le"}),
        (json.dumps(_call("drop_tables")), {"content-encoding": "gzip"}),
        ("\ufeff" + json.dumps(_call("drop_tables")), {}),
    ):
        assert http_status(tools_env.check(token=token, body=body, headers=headers)) == 400, (body, headers)
        assert tools_env.reason == "request_unparseable"


def test_mcp_headers_must_agree_with_the_body(tools_env: Env) -> None:
    token = tools_env.idp.token("alice", scope="tools:echo")
    body = json.dumps(_call("drop_tables"))
    response = tools_env.check(
        token=token, body=body, headers={"mcp-method": "tools/call", "mcp-name": "echo"}
    )
    assert http_status(response) == 400
    assert tools_env.reason == "mcp_header_mismatch"
    agreeing = tools_env.check(
        token=token, body=json.dumps(_call("echo")), headers={"mcp-method": "tools/call", "mcp-name": "echo"}
    )
    assert http_status(agreeing) == 200


def test_mcp_headers_alone_are_the_mcp_view(tools_env: Env) -> None:
    token = tools_env.idp.token("alice", scope="tools:echo")
    headers = {"mcp-method": "tools/call", "mcp-name": "drop_tables", "mcp-protocol-version": "2026-07-28"}
    assert http_status(tools_env.check(token=token, body="", headers=headers)) == 403
    headers["mcp-name"] = "echo"
    assert http_status(tools_env.check(token=token, body="", headers=headers)) == 200
