"""Bad input through real gRPC Check: every case is a deny with the right reason, never a crash.

The gateway runs in this process (real gRPC server on a loopback port) so each check's
exact reason code is read from a decision listener; the status and body are read from
the CheckResponse, as Envoy would. After each bad input, a good request still passes.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import decision
from gateway.envoy_api.envoy.config.core.v3 import base_pb2
from gateway.envoy_api.envoy.service.auth.v3 import attribute_context_pb2 as attrs
from gateway.envoy_api.envoy.service.auth.v3 import external_auth_pb2
from gateway.example_keys import SigningKeyPair, claims_for
from tests.support.checks import check_request, denied_headers, http_status
from tests.support.inprocess import InProcessGateway
from tests.support.issuer import AUDIENCE, TestIssuer

CHECK_METHOD = "/envoy.service.auth.v3.Authorization/Check"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _field(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field, encoded by hand (tag, varint length, bytes)."""
    length, varint = len(payload), b""
    while True:
        byte = length & 0x7F
        length >>= 7
        if length:
            varint += bytes([byte | 0x80])
        else:
            varint += bytes([byte])
            break
    return bytes([number << 3 | 2]) + varint + payload


@pytest.fixture(scope="module")
def idp() -> Iterator[TestIssuer]:
    issuer = TestIssuer("RS256")
    yield issuer
    issuer.stop()


@pytest.fixture(scope="module")
def gw(idp: TestIssuer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessGateway]:
    base: Path = tmp_path_factory.mktemp("bad-input")
    gateway = InProcessGateway(
        {"auth": {"issuers": [idp.issuer_config(algorithms=["RS256", "ES256", "EdDSA"])]}}, base
    )
    _TRUSTED.update(issuer=idp.issuer, kid=idp.key.kid)
    yield gateway
    gateway.stop()


@pytest.fixture(scope="module")
def raw_check(gw: InProcessGateway) -> Any:
    """Check with bytes as they go on the wire: no client-side serializer to refuse bad ones."""
    return gw.client.channel.unary_unary(
        CHECK_METHOD,
        request_serializer=None,
        response_deserializer=external_auth_pb2.CheckResponse.FromString,
    )


def assert_denied(gw: InProcessGateway, response: external_auth_pb2.CheckResponse, reason: str) -> None:
    assert not response.HasField("ok_response"), "a bad input was allowed"
    assert gw.last.allowed is False
    assert gw.last.reason == reason, gw.last
    status = decision.STATUS_OF[reason]
    assert http_status(response) == status
    body = json.loads(response.denied_response.body)
    assert set(body) == {"error"}
    headers = denied_headers(response)
    assert headers["content-type"] == "application/json"
    if status == 401:
        options = response.denied_response.headers
        bearer, dpop = [h.header.value for h in options if h.header.key == "www-authenticate"]
        assert bearer.startswith("Bearer ") and dpop.startswith("DPoP ")
        if reason != decision.TOKEN_MISSING:
            assert 'error="invalid_token"' in bearer
    if status == 400:
        assert body == {"error": "invalid_request"}


def assert_still_serving(gw: InProcessGateway, idp: TestIssuer) -> None:
    response = gw.client.check(check_request(token=idp.token("alice")))
    assert response.HasField("ok_response")
    assert gw.last.reason == decision.ALLOWED


# ---------------------------------------------------------------- the shape of the CheckRequest


def test_check_request_without_attributes(gw: InProcessGateway, idp: TestIssuer) -> None:
    assert_denied(gw, gw.client.check(external_auth_pb2.CheckRequest()), decision.REQUEST_INVALID)
    assert_still_serving(gw, idp)


def test_check_request_without_http_attributes(gw: InProcessGateway, idp: TestIssuer) -> None:
    no_http = external_auth_pb2.CheckRequest(
        attributes=attrs.AttributeContext(
            request=attrs.AttributeContext.Request(),
            context_extensions={"route": "mcp"},
        )
    )
    assert_denied(gw, gw.client.check(no_http), decision.REQUEST_INVALID)
    no_request = external_auth_pb2.CheckRequest(
        attributes=attrs.AttributeContext(context_extensions={"a": "b"})
    )
    assert_denied(gw, gw.client.check(no_request), decision.REQUEST_INVALID)
    assert_still_serving(gw, idp)


def test_bytes_that_are_not_a_check_request(gw: InProcessGateway, idp: TestIssuer, raw_check: Any) -> None:
    for garbage in (b"\xff\xff\xff\xff", b"\x0a\x80", b"not protobuf at all", bytes(range(256))):
        assert_denied(gw, raw_check(garbage, timeout=5), decision.REQUEST_INVALID)
    assert_denied(gw, raw_check(b"", timeout=5), decision.REQUEST_INVALID)  # an empty CheckRequest
    assert_still_serving(gw, idp)


# ---------------------------------------------------------------- sizes


def test_headers_over_the_size_limit(gw: InProcessGateway, idp: TestIssuer) -> None:
    limit = gw.gateway.config.max_request_bytes
    big = check_request(token=idp.token(), headers={"x-padding": "a" * (limit + 1)})
    assert_denied(gw, gw.client.check(big), decision.REQUEST_INVALID)
    many = {f"x-h{i}": "b" * 1000 for i in range(limit // 1000 + 2)}
    assert_denied(
        gw, gw.client.check(check_request(token=idp.token(), headers=many)), decision.REQUEST_INVALID
    )
    assert_still_serving(gw, idp)


def test_token_over_16_kib(gw: InProcessGateway, idp: TestIssuer) -> None:
    # A genuinely signed token, padded past the limit: refused before any parsing.
    padded = idp.token("alice", padding="x" * 16 * 1024)
    assert len(padded) > 16 * 1024
    assert_denied(gw, gw.client.check(check_request(token=padded)), decision.TOKEN_INVALID)
    assert_denied(gw, gw.client.check(check_request(token="a" * 20000)), decision.TOKEN_INVALID)
    assert_still_serving(gw, idp)


# ---------------------------------------------------------------- malformed tokens


def _seg(value: Any) -> str:
    return _b64(json.dumps(value).encode())


_NOT_UTF8 = _b64(b"\xff\xfe\xfd")


@pytest.mark.parametrize(
    "token",
    [
        "abc",
        "abc.def",
        "a.b.c.d",
        "....",
        "eyJhbGciOiJSUzI1NiJ9..",
        "!!!.###.$$$",
        "%%%%.e30.c2ln",
        "eyJhbGciOiJSUzI1NiJ9.@@@@.c2ln",
        f"{_seg([1, 2])}.{_seg({'sub': 'a'})}.c2ln",  # header JSON is a list
        f"{_seg({'alg': 'RS256'})}.{_seg([1, 2])}.c2ln",  # payload JSON is a list
        f"{_seg({'alg': 'RS256'})}.{_seg('a string')}.c2ln",
        f"{_seg({'alg': 'RS256'})}.{_seg(42)}.c2ln",
        f"{_seg({'alg': 'RS256'})}.{_b64(b'{not json')}.c2ln",
        _NOT_UTF8 + "." + _seg({"sub": "a"}) + ".c2ln",  # header bytes not UTF-8
        _seg({"alg": "RS256"}) + "." + _NOT_UTF8 + ".c2ln",
    ],
    ids=lambda t: t[:24],
)
def test_malformed_tokens(gw: InProcessGateway, idp: TestIssuer, token: str) -> None:
    assert_denied(gw, gw.client.check(check_request(token=token)), decision.TOKEN_INVALID)
    assert_still_serving(gw, idp)


def test_malformed_token_with_a_trusted_issuer_and_a_list_payload(
    gw: InProcessGateway, idp: TestIssuer
) -> None:
    # A properly signed JWS whose payload is a JSON list, not an object.
    payload = json.dumps([{"iss": idp.issuer, "sub": "alice"}]).encode()
    signed = jwt.PyJWS().encode(payload, idp.key.private_key, "RS256", {"kid": idp.key.kid})
    assert_denied(gw, gw.client.check(check_request(token=signed)), decision.TOKEN_INVALID)
    assert_still_serving(gw, idp)


@pytest.mark.parametrize("sub", [42, 4.5, True, None, ["alice"], {"id": "alice"}, ""])
def test_sub_not_a_string(gw: InProcessGateway, idp: TestIssuer, sub: Any) -> None:
    claims = claims_for(issuer=idp.issuer, audience=AUDIENCE, subject="x")
    claims["sub"] = sub
    payload = json.dumps(claims).encode()
    token = jwt.PyJWS().encode(payload, idp.key.private_key, "RS256", {"kid": idp.key.kid})
    assert_denied(gw, gw.client.check(check_request(token=token)), decision.TOKEN_INVALID)
    assert_still_serving(gw, idp)


def test_token_reasons_through_the_server(gw: InProcessGateway, idp: TestIssuer) -> None:
    stranger = TestIssuer("ES256", serve=False, name="stranger")
    cases = [
        (None, decision.TOKEN_MISSING),
        (idp.token(ttl=-300), decision.TOKEN_EXPIRED),
        (stranger.token(), decision.ISSUER_UNTRUSTED),
        (idp.token(audience="https://elsewhere.test"), decision.AUDIENCE_MISMATCH),
        (
            SigningKeyPair.generate("RS256", idp.key.kid).sign(
                claims_for(issuer=idp.issuer, audience=AUDIENCE, subject="mallory")
            ),
            decision.TOKEN_INVALID,
        ),
    ]
    for token, reason in cases:
        assert_denied(gw, gw.client.check(check_request(token=token)), reason)
    # Credentials of another scheme are refused as such, never taken for an anonymous request.
    basic = check_request(headers={"authorization": "Basic YWxpY2U6cHc="})
    assert_denied(gw, gw.client.check(basic), decision.TOKEN_INVALID)
    assert_still_serving(gw, idp)


# ---------------------------------------------------------------- non-UTF-8 bytes


def _with_bytes_in_place_of(
    message: external_auth_pb2.CheckRequest, marker: bytes, replacement: bytes
) -> bytes:
    """Serialize, then overwrite a same-length marker: lengths stay valid, the UTF-8 does not."""
    assert len(marker) == len(replacement)
    wire = message.SerializeToString()
    assert marker in wire
    return wire.replace(marker, replacement)


@pytest.mark.parametrize(
    "where",
    ["path", "header value", "header name", "method", "host", "context extension", "body"],
)
def test_non_utf8_in_a_string_field(
    gw: InProcessGateway, idp: TestIssuer, raw_check: Any, where: str
) -> None:
    marker = b"MARKERMARKER"
    text = marker.decode()
    kwargs: dict[str, Any] = {"token": idp.token()}
    if where == "path":
        kwargs["path"] = "/" + text
    elif where == "header value":
        kwargs["headers"] = {"x-note": text}
    elif where == "header name":
        kwargs["headers"] = {"x-" + text.lower(): "v"}
        marker = marker.lower()
    elif where == "method":
        kwargs["method"] = text
    elif where == "host":
        kwargs["host"] = text
    elif where == "context extension":
        kwargs["context_extensions"] = {"route": text}
    else:
        kwargs["body"] = text
    wire = _with_bytes_in_place_of(
        check_request(**kwargs), marker, b"\xff\xfe\xc3\x28" + b"x" * (len(marker) - 4)
    )
    with pytest.raises(Exception):  # noqa: B017 - the stock parser refuses these bytes outright
        external_auth_pb2.CheckRequest.FromString(wire)
    assert_denied(gw, raw_check(wire, timeout=5), decision.REQUEST_INVALID)
    assert_still_serving(gw, idp)


def test_non_utf8_in_a_hand_encoded_check_request(
    gw: InProcessGateway, idp: TestIssuer, raw_check: Any
) -> None:
    # CheckRequest.attributes(1) → AttributeContext.request(4) → Request.http(2) → HttpRequest.method(2)
    def request_with_method(method: bytes) -> bytes:
        return _field(1, _field(4, _field(2, _field(2, method))))

    assert (
        external_auth_pb2.CheckRequest.FromString(request_with_method(b"GET")).attributes.request.http.method
        == "GET"
    )
    assert_denied(gw, raw_check(request_with_method(b"GET"), timeout=5), decision.TOKEN_MISSING)
    assert_denied(gw, raw_check(request_with_method(b"G\xc3\x28T"), timeout=5), decision.REQUEST_INVALID)
    # An overlong encoding and a lone surrogate (both invalid UTF-8).
    assert_denied(gw, raw_check(request_with_method(b"\xc0\xafGET"), timeout=5), decision.REQUEST_INVALID)
    assert_denied(gw, raw_check(request_with_method(b"\xed\xa0\x80"), timeout=5), decision.REQUEST_INVALID)
    assert_still_serving(gw, idp)


def test_non_utf8_raw_body(gw: InProcessGateway, idp: TestIssuer) -> None:
    # No policy here reads the body: a binary upload is not the gateway's to judge. Where a
    # policy reads it, the same bytes are request_unparseable (tests/test_unreadable_bodies.py).
    request = check_request(token=idp.token())
    request.attributes.request.http.raw_body = b'{"jsonrpc":"2.0","method":"tools/call\xff"}'
    assert gw.client.check(request).HasField("ok_response")
    request.attributes.request.http.raw_body = b'{"jsonrpc":"2.0","method":"tools/list","id":1}'
    assert gw.client.check(request).HasField("ok_response")
    assert_still_serving(gw, idp)


def test_non_utf8_header_map_raw_value(gw: InProcessGateway, idp: TestIssuer) -> None:
    request = check_request(token=idp.token())
    request.attributes.request.http.header_map.headers.append(
        base_pb2.HeaderValue(key="x-raw", raw_value=b"caf\xe9")  # Latin-1, not UTF-8
    )
    assert_denied(gw, gw.client.check(request), decision.REQUEST_INVALID)
    # Envoy's header_map form (encode_raw_headers) with a valid value is read normally.
    good = check_request()
    good.attributes.request.http.header_map.headers.append(
        base_pb2.HeaderValue(key="authorization", raw_value=f"Bearer {idp.token()}".encode())
    )
    assert gw.client.check(good).HasField("ok_response")
    assert_still_serving(gw, idp)


def test_oversized_header_map(gw: InProcessGateway, idp: TestIssuer) -> None:
    request = check_request(token=idp.token())
    for i in range(70):
        request.attributes.request.http.header_map.headers.append(
            base_pb2.HeaderValue(key=f"x-big-{i}", raw_value=b"z" * 1024)
        )
    assert_denied(gw, gw.client.check(request), decision.REQUEST_INVALID)
    assert_still_serving(gw, idp)


def test_the_server_survives_a_burst_of_bad_input(
    gw: InProcessGateway, idp: TestIssuer, raw_check: Any
) -> None:
    before = len(gw.decisions)
    futures = [raw_check.future(bytes([i % 256]) * (i % 40 + 1), timeout=10) for i in range(200)]
    responses = [f.result() for f in futures]
    assert all(not r.HasField("ok_response") for r in responses)
    recorded = gw.decisions[before:]
    assert len(recorded) == 200
    assert decision.INTERNAL_ERROR not in {d.reason for d in recorded}
    assert_still_serving(gw, idp)


# ---------------------------------------------------------------- property: no token, no allow


_B64_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_segment = st.text(alphabet=_B64_CHARS, max_size=40)


@st.composite
def tokens(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["text", "segments", "json", "resigned"]))
    if kind == "text":
        return draw(st.text(max_size=200))
    if kind == "segments":
        return ".".join(draw(st.lists(_segment, min_size=0, max_size=5)))
    if kind == "json":
        header = draw(
            st.one_of(
                st.fixed_dictionaries(
                    {"alg": st.sampled_from(["none", "RS256", "HS256", "ES256", "EdDSA", ""])}
                ),
                st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3),
                st.lists(st.integers(), max_size=3),
            )
        )
        body = draw(
            st.one_of(
                st.dictionaries(
                    st.sampled_from(["iss", "sub", "aud", "exp", "nbf", "iat"]),
                    st.one_of(st.text(max_size=10), st.integers(), st.none()),
                    max_size=6,
                ),
                st.text(max_size=10),
                st.integers(),
            )
        )
        return f"{_seg(header)}.{_seg(body)}.{draw(_segment)}"
    # Claims of the trusted issuer, signed by a key it never published (under a made-up kid,
    # or under the issuer's real kid).
    subject = draw(st.text(min_size=1, max_size=20))
    kid = draw(st.sampled_from([_ATTACKER.kid, _TRUSTED["kid"]]))
    forger = SigningKeyPair(kid, "RS256", _ATTACKER.private_key)
    return forger.sign(claims_for(issuer=_TRUSTED["issuer"], audience=AUDIENCE, subject=subject))


_ATTACKER = SigningKeyPair.generate("RS256")
_TRUSTED = {"issuer": "", "kid": ""}  # filled in by the gw fixture, before any example is drawn

_header_names = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=20
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    method=st.one_of(st.sampled_from(["GET", "POST", "DELETE", "PUT", ""]), st.text(max_size=10)),
    path=st.text(max_size=60),
    headers=st.dictionaries(st.one_of(_header_names, st.text(max_size=20)), st.text(max_size=80), max_size=8),
    body=st.one_of(
        st.text(max_size=300),
        st.builds(
            lambda m, n: json.dumps({"jsonrpc": "2.0", "id": 1, "method": m, "params": {"name": n}}),
            st.text(max_size=20),
            st.text(max_size=20),
        ),
    ),
    token=st.one_of(st.none(), tokens()),
    session_id=st.one_of(st.none(), st.text(max_size=40)),
)
def test_arbitrary_requests_without_a_valid_token_are_never_allowed(
    gw: InProcessGateway,
    idp: TestIssuer,
    method: str,
    path: str,
    headers: dict[str, str],
    body: str,
    token: str | None,
    session_id: str | None,
) -> None:
    headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    request = check_request(
        method=method or "GET", path=path, headers=headers, body=body, session_id=session_id
    )
    if not method:
        request.attributes.request.http.method = ""
    response = gw.client.check(request)
    outcome = gw.last
    assert not response.HasField("ok_response")
    assert not outcome.allowed
    assert outcome.reason != decision.INTERNAL_ERROR, outcome
    assert http_status(response) == decision.STATUS_OF[outcome.reason]
    body = json.loads(response.denied_response.body)
    assert set(body) == {"error"} and len(response.denied_response.body) < 100
    if token is not None and len(token.strip()) >= 12:
        assert token.strip() not in response.denied_response.body


def test_the_gateway_answered_everything_it_was_sent(gw: InProcessGateway) -> None:
    # Runs last in this module: nothing above ended in an internal error.
    assert gw.decisions
    assert all(d.reason != decision.INTERNAL_ERROR for d in gw.decisions)
    grpc.channel_ready_future(gw.client.channel).result(timeout=5)
