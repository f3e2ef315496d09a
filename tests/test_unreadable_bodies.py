"""A body the gateway cannot read exactly as a server would is refused, never judged "not MCP".

Each case goes through the real gRPC Check of an in-process gateway with real keys and a
tool allow-list policy (the class of the attack: a forbidden tools/call hidden in a body
that the gateway's parser gave up on while a lenient upstream parser ran it).
"""

from __future__ import annotations

import gzip
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway import decision
from gateway.server import FailureLog
from tests.support.checks import check_request
from tests.support.inprocess import InProcessGateway
from tests.support.issuer import TestIssuer

TOOLS_POLICY = """
name: tools
when: mcp.method == "tools/call"
rules:
  - name: echo-only
    allow: mcp.name == "echo"
    deny: { status: 403, reason: forbidden_tool }
"""
AUDIT_TOOLS_POLICY = TOOLS_POLICY.replace("name: tools\n", "name: tools\nmode: audit\n")
JSON = {"content-type": "application/json"}


def _call(name: str) -> str:
    return json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": name}})


@pytest.fixture
def idp() -> Iterator[TestIssuer]:
    issuer = TestIssuer(serve=False)
    yield issuer
    issuer.stop()


def _gateway(idp: TestIssuer, tmp_path: Path, policy: str, **settings: object) -> InProcessGateway:
    directory = tmp_path / "policies"
    directory.mkdir()
    (directory / "tools.yaml").write_text(policy)
    config = {
        "auth": {"issuers": [idp.issuer_config(jwks_file=idp.write_jwks(tmp_path / "jwks.json"))]},
        "policies": str(directory),
        **settings,
    }
    return InProcessGateway(config, tmp_path)


@pytest.fixture
def gw(idp: TestIssuer, tmp_path: Path) -> Iterator[InProcessGateway]:
    gateway = _gateway(idp, tmp_path, TOOLS_POLICY)
    yield gateway
    gateway.stop()


def _ask(gw: InProcessGateway, token: str, headers: dict[str, str], raw: bytes | None = None,
         text: str | None = None) -> tuple[int, str]:
    request = check_request(token=token, headers=headers)
    http = request.attributes.request.http
    if raw is not None:
        http.raw_body = raw
    if text is not None:
        http.body = text
    response = gw.client.check(request)
    status = 200 if response.HasField("ok_response") else int(response.denied_response.status.code)
    return status, gw.last.reason


FORBIDDEN = _call("drop_tables")


def _with_arguments(arguments: str) -> bytes:
    return FORBIDDEN.replace("}}", ', "arguments": ' + arguments + "}}").encode()


UNREADABLE: dict[str, tuple[dict[str, str], bytes]] = {
    "gzip": ({**JSON, "content-encoding": "gzip"}, gzip.compress(FORBIDDEN.encode())),
    "gzip-declared-plain-body": ({**JSON, "content-encoding": "gzip"}, FORBIDDEN.encode()),
    "deflate": ({**JSON, "content-encoding": "deflate"}, FORBIDDEN.encode()),
    "identity-then-gzip": ({**JSON, "content-encoding": "identity, gzip"}, FORBIDDEN.encode()),
    "bom": (JSON, b"\xef\xbb\xbf" + FORBIDDEN.encode()),
    "invalid-utf8-in-name": (JSON, FORBIDDEN.replace("drop_tables", "drop\xfftables").encode("latin-1")),
    "utf-16le": ({"content-type": "application/json; charset=utf-16le"}, FORBIDDEN.encode()),
    "utf-16-quoted": ({"content-type": 'application/json; charset="UTF-16"'}, FORBIDDEN.encode()),
    "latin-1": ({"content-type": "application/json;charset=iso-8859-1"}, FORBIDDEN.encode()),
    "two-charsets": ({"content-type": "application/json;charset=utf-8;charset=utf-16le"}, FORBIDDEN.encode()),
    "5000-digit-number": (JSON, _with_arguments('{"n": ' + "9" * 5000 + "}")),
    "infinite-number": (JSON, _with_arguments('{"n": 1e999}')),
    "nan-literal": (JSON, _with_arguments('{"n": NaN}')),
    "nested-1500": (JSON, _with_arguments('{"a": ' + "[" * 1500 + "]" * 1500 + "}")),
    "nested-20000": (JSON, _with_arguments('{"a": ' + "[" * 20000 + "]" * 20000 + "}")),
    "duplicate-name-forbidden-last": (
        JSON, b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","name":"drop_tables"}}'
    ),
    "duplicate-name-forbidden-first": (
        JSON, b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"drop_tables","name":"echo"}}'
    ),
    "duplicate-method": (
        JSON,
        b'{"jsonrpc":"2.0","id":1,"method":"ping","params":{"name":"drop_tables"},"method":"tools/call"}',
    ),
    "duplicate-argument-key": (
        JSON, _with_arguments('{"a": 1, "a": 2}')
    ),
    "not-jsonrpc-2": (JSON, FORBIDDEN.replace('"2.0"', '"1.0"').encode()),
    "method-not-a-string": (
        JSON, b'{"jsonrpc":"2.0","id":1,"method":["tools/call"],"params":{"name":"x"}}'
    ),
    "name-not-a-string": (JSON, b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":["x"]}}'),
    "positional-params": (JSON, b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":["drop_tables"]}'),
    "trailing-garbage": (JSON, FORBIDDEN.encode() + b" x"),
    "two-objects": (JSON, FORBIDDEN.encode() + _call("echo").encode()),
    "empty-batch": (JSON, b"[]"),
    "text-plain": ({"content-type": "text/plain"}, FORBIDDEN.encode()),
    "no-content-type": ({}, FORBIDDEN.encode()),
    "form-with-json": ({"content-type": "application/x-www-form-urlencoded"}, b" \t" + FORBIDDEN.encode()),
    "nbsp-before-json-in-text": ({"content-type": "text/plain"}, "\u00a0".encode() + FORBIDDEN.encode()),
    "two-content-types": ({"content-type": "application/json, text/plain"}, FORBIDDEN.encode()),
}


@pytest.mark.parametrize("case", sorted(UNREADABLE))
def test_an_unreadable_body_is_refused(gw: InProcessGateway, idp: TestIssuer, case: str) -> None:
    headers, raw = UNREADABLE[case]
    token = idp.token("alice")
    assert _ask(gw, token, headers, raw=raw) == (400, decision.REQUEST_UNPARSEABLE), case


def test_readable_calls_are_judged_as_before(gw: InProcessGateway, idp: TestIssuer) -> None:
    token = idp.token("alice")
    assert _ask(gw, token, JSON, raw=_call("echo").encode()) == (200, decision.ALLOWED)
    assert _ask(gw, token, JSON, raw=FORBIDDEN.encode()) == (403, "forbidden_tool")
    for content_type in ("application/json; charset=utf-8", 'application/json;charset="UTF-8"',
                         "Application/JSON", "application/json-rpc+json"):
        headers = {"content-type": content_type}
        assert _ask(gw, token, headers, raw=FORBIDDEN.encode()) == (403, "forbidden_tool"), content_type
    # An escape that spells the name is the name.
    spelled = FORBIDDEN.replace("drop_tables", "\\u0064rop_tables").encode()
    assert _ask(gw, token, JSON, raw=spelled) == (403, "forbidden_tool")
    # A body that cannot be a call under a non-JSON content type is not MCP: nothing to judge.
    form = {"content-type": "application/x-www-form-urlencoded"}
    assert _ask(gw, token, form, raw=b"tool=drop_tables") == (200, decision.ALLOWED)


def test_nul_and_lone_surrogates_in_the_body_are_request_invalid(
    gw: InProcessGateway, idp: TestIssuer
) -> None:
    token = idp.token("alice")
    for body in (
        FORBIDDEN.replace("drop_tables", "echo\\u0000xyz"),
        FORBIDDEN.replace("drop_tables", "echo\\ud800"),
        FORBIDDEN.replace("}}", ', "arguments": {"k\\u0000": 1}}}'),
        FORBIDDEN.replace("drop_tables", "echo") + "\x00",
    ):
        assert _ask(gw, token, JSON, raw=body.encode()) == (400, decision.REQUEST_INVALID), body
    # UTF-16 of ASCII text is valid UTF-8 full of NULs.
    assert _ask(gw, token, JSON, raw=FORBIDDEN.encode("utf-16-le")) == (400, decision.REQUEST_INVALID)


def test_a_body_sent_as_text_is_judged_only_when_it_cannot_hide_bytes(
    gw: InProcessGateway, idp: TestIssuer
) -> None:
    token = idp.token("alice")
    # Without pack_as_bytes Envoy sends text, with "!" for every byte that is not UTF-8.
    assert _ask(gw, token, JSON, text=_call("echo")) == (200, decision.ALLOWED)
    exclaimed = _call("echo").replace("}}", ', "arguments": {"text": "hi!"}}}')
    assert _ask(gw, token, JSON, text=exclaimed) == (400, decision.REQUEST_UNPARSEABLE)
    # As bytes, the same "!" is exactly what the server reads.
    assert _ask(gw, token, JSON, raw=exclaimed.encode()) == (200, decision.ALLOWED)


def test_a_declared_body_that_envoy_did_not_send_is_refused(gw: InProcessGateway, idp: TestIssuer) -> None:
    token = idp.token("alice")
    assert _ask(gw, token, {**JSON, "content-length": "93"}) == (400, decision.REQUEST_UNPARSEABLE)
    assert _ask(gw, token, {**JSON, "transfer-encoding": "chunked"}) == (400, decision.REQUEST_UNPARSEABLE)
    assert _ask(gw, token, {**JSON, "content-length": "0"}) == (200, decision.ALLOWED)


def test_without_a_policy_that_reads_the_body_nothing_is_parsed(idp: TestIssuer, tmp_path: Path) -> None:
    headers_only = (
        "name: by-path\nrules:\n  - name: any\n    allow: request.path != '/forbidden'\n"
        "    deny: { status: 403, reason: forbidden_path }\n"
    )
    gateway = _gateway(idp, tmp_path, headers_only)
    try:
        headers, raw = UNREADABLE["gzip-declared-plain-body"]
        assert _ask(gateway, idp.token("alice"), headers, raw=raw) == (200, decision.ALLOWED)
    finally:
        gateway.stop()


def test_an_audit_policy_records_the_refusal_instead_of_enforcing_it(
    idp: TestIssuer, tmp_path: Path
) -> None:
    gateway = _gateway(idp, tmp_path, AUDIT_TOOLS_POLICY, allow_no_enforcing_policy=True)
    try:
        headers, raw = UNREADABLE["bom"]
        assert _ask(gateway, idp.token("alice"), headers, raw=raw) == (200, decision.ALLOWED)
        audit = [(a.policy, a.reason, a.status) for a in gateway.last.audit_denies]
        assert audit == [("tools", decision.REQUEST_UNPARSEABLE, 400)]
    finally:
        gateway.stop()


def test_bad_input_logs_no_traceback(
    gw: InProcessGateway, idp: TestIssuer, caplog: pytest.LogCaptureFixture
) -> None:
    token = idp.token("alice")
    caplog.set_level(logging.DEBUG)
    for _ in range(200):
        body = FORBIDDEN.replace("drop_tables", "\\ud800").encode()
        assert _ask(gw, token, JSON, raw=body) == (400, decision.REQUEST_INVALID)
    assert "Traceback" not in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_internal_errors_log_one_line_per_cause_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    failures = FailureLog(every=60.0)

    def fail(kind: type[Exception]) -> Exception:
        try:
            raise kind("request data that must not be logged")
        except Exception as exc:
            return exc

    caplog.set_level(logging.ERROR, logger="gateway.server")
    logged = [failures.report(fail(KeyError), now=t) for t in range(0, 50)]
    assert logged.count(True) == 1
    assert failures.report(fail(ValueError), now=10.0)  # another cause has its own line
    assert failures.report(fail(KeyError), now=61.0)  # the interval has passed
    lines = caplog.text.splitlines()
    assert len(lines) == 3
    assert "49 more since the last report" in lines[-1]
    assert "request data" not in caplog.text and "Traceback" not in caplog.text
