"""DPoP (RFC 9449) and certificate-bound tokens (RFC 8705) at the identify step, through a real
gateway over gRPC. Proofs are signed with joserfc (tests/support/dpop_client.py), not with the
PyJWT/cryptography code the gateway verifies with."""

from __future__ import annotations

import base64
import datetime
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway import decision
from gateway.config import DpopConfig
from gateway.decision import Decision
from gateway.envoy_api.envoy.config.core.v3 import base_pb2
from gateway.envoy_api.envoy.service.auth.v3 import external_auth_pb2
from gateway.identity.dpop import (
    AccessTokenHashMismatch,
    ProofVerifier,
    access_token_hash,
    jwk_thumbprint,
    normalize_uri,
)
from gateway.session.replay import MemoryReplayCache
from gateway.telemetry.tracing import decision_attributes
from tests.support.checks import check_request, http_status
from tests.support.dpop_client import DpopKey, ath_of
from tests.support.inprocess import InProcessGateway
from tests.support.issuer import TestIssuer

HOST = "mcp.example.test"
URL = f"http://{HOST}/mcp"

# RFC 9449 §4.1 Figure 2 (the proof) and §6.1 Figure 9 (the thumbprint of its key,
# "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"), and §7.1 Figures 13-14: the access token
# "Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU" and its ath. https://www.rfc-editor.org/rfc/rfc9449
RFC_JWK = {
    "kty": "EC",
    "x": "l8tFrhx-34tV3hRICRDY9zCkDlpBhF42UQUfWVAWBFs",
    "y": "9VE4jf_Ok_o64zbTTlcuNJajHmt6v9TDVrU0CdvGRDA",
    "crv": "P-256",
}
RFC_JKT = "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"
RFC_ACCESS_TOKEN = "Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU"
RFC_ATH = "fUHyO2r2Z3DZ53EsNrWBb0xWXoaNy59IiKCAqksmQEo"
RFC_PROOF = (
    "eyJ0eXAiOiJkcG9wK2p3dCIsImFsZyI6IkVTMjU2IiwiandrIjp7Imt0eSI6IkVDIiwieCI6Imw4dEZyaHgtMzR0VjNoUklDUkRZOXpDa0Rs"
    "cEJoRjQyVVFVZldWQVdCRnMiLCJ5IjoiOVZFNGpmX09rX282NHpiVFRsY3VOSmFqSG10NnY5VERWclUwQ2R2R1JEQSIsImNydiI6IlAtMjU2"
    "In19.eyJqdGkiOiItQndDM0VTYzZhY2MybFRjIiwiaHRtIjoiUE9TVCIsImh0dSI6Imh0dHBzOi8vc2VydmVyLmV4YW1wbGUuY29tL3Rva2Vu"
    "IiwiaWF0IjoxNTYyMjYyNjE2fQ.2-GxA6T8lP4vfrg8v-FdWP0A0zdrj8igiMLvqRMUvwnQg4PtFLbdLXiOSsX0x7NVY-FNyJK70nfbV37xRZT3Lg"
)


def test_rfc9449_example_thumbprint_and_ath() -> None:
    assert jwk_thumbprint(RFC_JWK) == RFC_JKT
    assert access_token_hash(RFC_ACCESS_TOKEN) == RFC_ATH
    assert ath_of(RFC_ACCESS_TOKEN) == RFC_ATH  # the test helper agrees, computed on its own


def test_rfc9449_example_proof_passes_every_check_up_to_ath() -> None:
    """The RFC's own token-endpoint proof: typ, alg, jwk, signature, htm, htu, iat and jti pass at
    its iat; it has no ath (it was made for the token endpoint), which a resource refuses."""
    proofs = ProofVerifier(DpopConfig(), 0.0, MemoryReplayCache())
    assert proofs.proof_key(RFC_PROOF.split(".")[0]).jkt == RFC_JKT
    with pytest.raises(AccessTokenHashMismatch) as refused:
        proofs.verify(RFC_PROOF, method="POST", uri="https://server.example.com/token",
                      access_token=RFC_ACCESS_TOKEN, bound_jkt=RFC_JKT, now=1562262616)
    assert refused.value.failure == "ath"
    assert RFC_PROOF not in str(refused.value)


@pytest.mark.parametrize(
    ("presented", "expected"),
    [
        ("HTTP://MCP.Example.TEST:80/mcp", "http://mcp.example.test/mcp"),
        ("https://mcp.example.test:443", "https://mcp.example.test/"),
        ("https://mcp.example.test:8443/a/./b/../c", "https://mcp.example.test:8443/a/c"),
        ("http://mcp.example.test/%7euser/%2fx", "http://mcp.example.test/~user/%2Fx"),
        ("http://[::1]:80/mcp", "http://[::1]/mcp"),
    ],
)
def test_uri_normalization(presented: str, expected: str) -> None:
    assert normalize_uri(presented) == expected


@pytest.mark.parametrize(
    "bad", ["ftp://mcp.example.test/", "http://user@mcp.example.test/", "http://mcp.example.test:99999/",
            "http:///mcp", "http://mcp.example.test:x/"]
)
def test_uri_normalization_refuses(bad: str) -> None:
    with pytest.raises(ValueError):
        normalize_uri(bad)


# ---------------------------------------------------------------------------- through the gateway


class Stack:
    def __init__(self, gateway: InProcessGateway, idp: TestIssuer) -> None:
        self.gateway = gateway
        self.idp = idp

    def check(
        self,
        token: str,
        proof: str | None,
        *,
        scheme: str = "DPoP",
        method: str = "POST",
        path: str = "/mcp",
        host: str = HOST,
        certificate: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Decision, external_auth_pb2.CheckResponse]:
        all_headers = {"authorization": f"{scheme} {token}", **(headers or {})}
        if proof is not None:
            all_headers["dpop"] = proof
        request = check_request(method=method, path=path, host=host, headers=all_headers)
        if certificate is not None:
            request.attributes.source.certificate = certificate
        response = self.gateway.client.check(request)
        return http_status(response), self.gateway.last, response


def challenges(response: external_auth_pb2.CheckResponse) -> list[str]:
    return [h.header.value for h in response.denied_response.headers if h.header.key == "www-authenticate"]


def _stack(tmp: Path, **dpop: Any) -> Stack:
    idp = TestIssuer("ES256", serve=False)
    jwks = idp.write_jwks(tmp / "jwks.json")
    auth: dict[str, Any] = {"issuers": [idp.issuer_config(jwks_file=jwks)], "leeway": "5s"}
    if dpop:
        auth["dpop"] = dpop
    return Stack(InProcessGateway({"auth": auth}), idp)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    running = _stack(tmp_path_factory.mktemp("dpop"), max_proof_bytes=32 * 1024)
    yield running
    running.gateway.stop()


@pytest.fixture(scope="module")
def client_key() -> DpopKey:
    return DpopKey("ES256")


def _bound_token(stack: Stack, key: DpopKey, subject: str = "alice", **claims: Any) -> str:
    return stack.idp.token(subject, cnf={"jkt": key.jkt}, **claims)


@pytest.mark.parametrize("alg", ["ES256", "RS256", "PS256", "EdDSA", ("EdDSA", "Ed448")])
def test_a_proof_of_each_default_algorithm_passes(stack: Stack, alg: Any) -> None:
    alg, curve = alg if isinstance(alg, tuple) else (alg, None)
    key = DpopKey(alg, curve=curve)
    token = _bound_token(stack, key)
    status, outcome, _ = stack.check(token, key.proof("POST", URL, token))
    assert (status, outcome.reason) == (200, decision.ALLOWED)


def test_every_asymmetric_algorithm_when_configured(tmp_path: Path) -> None:
    algorithms = ["ES256", "ES384", "ES512", "RS384", "RS512", "PS384", "PS512"]
    stack = _stack(tmp_path, algorithms=algorithms)
    try:
        for alg in algorithms:
            key = DpopKey(alg)
            token = _bound_token(stack, key)
            assert stack.check(token, key.proof("POST", URL, token))[0] == 200, alg
            # A signature of the right length but from another key of the same curve does not verify.
            header, payload, _ = key.proof("POST", URL, token).split(".")
            other = DpopKey(alg).proof("POST", URL, token).split(".")[2]
            assert stack.check(token, f"{header}.{payload}.{other}")[1].dpop_failure == "signature", alg
    finally:
        stack.gateway.stop()


def test_a_replayed_proof_is_refused(stack: Stack, client_key: DpopKey) -> None:
    token = _bound_token(stack, client_key)
    proof = client_key.proof("POST", URL, token)
    assert stack.check(token, proof)[0] == 200
    status, outcome, _ = stack.check(token, proof)
    assert (status, outcome.reason, outcome.dpop_failure) == (401, decision.DPOP_PROOF_REPLAYED, "jti")


def test_a_refused_proof_does_not_use_up_its_jti(stack: Stack, client_key: DpopKey) -> None:
    token = _bound_token(stack, client_key)
    wrong = client_key.proof("GET", URL, token, jti="kept-for-later")
    assert stack.check(token, wrong)[1].dpop_failure == "htm"
    assert stack.check(token, client_key.proof("POST", URL, token, jti="kept-for-later"))[0] == 200


def test_a_key_bound_token_sent_as_bearer_is_dpop_required(stack: Stack, client_key: DpopKey) -> None:
    token = _bound_token(stack, client_key)
    status, outcome, response = stack.check(token, client_key.proof("POST", URL, token), scheme="Bearer")
    assert (status, outcome.reason) == (401, decision.DPOP_REQUIRED)
    options = [h for h in response.denied_response.headers if h.header.key == "www-authenticate"]
    assert [h.header.value.split(" ")[0] for h in options] == ["Bearer", "DPoP"]
    # The second value is added beside the first, not in its place.
    assert options[1].append_action == base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD
    assert 'algs="ES256 RS256 PS256 EdDSA"' in options[1].header.value


def test_the_dpop_scheme_with_an_unbound_token_is_refused(stack: Stack, client_key: DpopKey) -> None:
    token = stack.idp.token("alice")
    status, outcome, _ = stack.check(token, client_key.proof("POST", URL, token))
    assert (status, outcome.reason, outcome.dpop_failure) == (401, decision.DPOP_KEY_MISMATCH, "jkt")


def test_a_proof_from_another_key_is_a_key_mismatch(stack: Stack, client_key: DpopKey) -> None:
    token = _bound_token(stack, client_key)
    thief = DpopKey("ES256")
    status, outcome, response = stack.check(token, thief.proof("POST", URL, token))
    assert (status, outcome.reason, outcome.dpop_failure) == (401, decision.DPOP_KEY_MISMATCH, "jkt")
    dpop = challenges(response)[1]
    assert dpop.startswith('DPoP realm="authz-gateway", error="invalid_dpop_proof", algs="')
    assert json.loads(response.denied_response.body) == {"error": "invalid_dpop_proof"}


def test_a_cnf_that_is_not_an_object_is_refused(stack: Stack, client_key: DpopKey) -> None:
    token = stack.idp.token("alice", cnf=client_key.jkt)
    status, outcome, _ = stack.check(token, client_key.proof("POST", URL, token))
    assert (status, outcome.reason) == (401, decision.TOKEN_INVALID)
    token = stack.idp.token("alice", cnf={"jkt": 7})
    assert stack.check(token, client_key.proof("POST", URL, token))[1].reason == decision.TOKEN_INVALID


def test_a_binding_the_gateway_cannot_check_refuses_the_token(stack: Stack, client_key: DpopKey) -> None:
    """RFC 7800's jwk, kid or jku, a SHA-1 x5t, an empty cnf: taken as unbound, a sender-constrained
    token would pass as a bearer token."""
    for cnf in (
        {"jwk": client_key.public_jwk}, {"kid": "k1"}, {"jku": "https://idp/jwks"}, {"x5t": "AAAA"},
        {}, {"jkt": None}, {"JKT": client_key.jkt}, {"jkt": client_key.jkt, "kid": "k1"},
    ):
        token = stack.idp.token("alice", cnf=cnf)
        status, outcome, _ = stack.check(token, None, scheme="Bearer")
        assert (status, outcome.reason) == (401, decision.TOKEN_INVALID), cnf


def _jwe_like() -> str:
    parts = [{"alg": "RSA-OAEP", "enc": "A256GCM", "typ": "dpop+jwt"}, "k", "iv", "ct", "tag"]
    encoded = [base64.urlsafe_b64encode(json.dumps(p).encode()).rstrip(b"=").decode() for p in parts]
    return ".".join(encoded)


def _bad_proofs(key: DpopKey, token: str) -> dict[str, tuple[str, str]]:
    """name -> (proof, the failure it must be refused with)."""
    rsa_small = DpopKey("RS256", rsa_bits=1024)
    huge_rsa = {"kty": "RSA", "e": "AQAB", "n": _b64_raw(b"\xc5" + bytes(range(256)) * 4)}  # 8200 bits
    big_exponent = {**DpopKey("RS256").public_jwk, "e": _b64_raw((2**32 + 1).to_bytes(5, "big"))}
    with_private = {**key.public_jwk, "d": "AAAA"}
    secp256k1 = DpopKey("ES256", curve="secp256k1")  # joserfc makes the key; the proof names ES256
    x25519 = {"kty": "OKP", "crv": "X25519", "x": key.public_jwk["x"]}
    header, payload, signature = key.proof("POST", URL, token).split(".")
    tampered = json.loads(base64.urlsafe_b64decode(payload + "==="))
    tampered["htm"] = "POST"
    tampered["jti"] = "forged"
    forged_payload = base64.urlsafe_b64encode(json.dumps(tampered).encode()).rstrip(b"=").decode()
    return {
        "not a JWT": ("not-a-jwt", "typ"),
        "a JWE": (_jwe_like(), "typ"),
        "two segments": ("abc.def", "typ"),
        "typ JWT": (key.proof("POST", URL, token, header={"typ": "JWT"}), "typ"),
        "no typ": (key.proof("POST", URL, token, omit=("typ",)), "typ"),
        "crit": (key.proof("POST", URL, token, header={"crit": ["kid"], "kid": "k1"}), "typ"),
        "alg none": (f"{_b64({'typ': 'dpop+jwt', 'alg': 'none', 'jwk': key.public_jwk})}.{payload}.", "alg"),
        "alg HS256": (f"{_b64({'typ': 'dpop+jwt', 'alg': 'HS256', 'jwk': key.public_jwk})}.{payload}.c2ln",
                      "alg"),
        "no jwk": (key.proof("POST", URL, token, omit=("jwk",)), "jwk"),
        "private jwk": (key.proof("POST", URL, token, header={"jwk": with_private}), "jwk"),
        "oct jwk": (key.proof("POST", URL, token, header={"jwk": {"kty": "oct", "k": "c2VjcmV0"}}), "jwk"),
        "curve secp256k1": (key.proof("POST", URL, token, header={"jwk": secp256k1.public_jwk}), "jwk"),
        "curve X25519": (key.proof("POST", URL, token, header={"jwk": x25519}), "jwk"),
        "RSA 1024": (rsa_small.proof("POST", URL, token), "jwk"),
        "RSA exponent of 33 bits": (
            f"{_b64({'typ': 'dpop+jwt', 'alg': 'RS256', 'jwk': big_exponent})}.{payload}.{signature}", "jwk"
        ),
        "RSA of 8200 bits": (
            f"{_b64({'typ': 'dpop+jwt', 'alg': 'RS256', 'jwk': huge_rsa})}.{payload}.{signature}", "jwk"
        ),
        "jwk of another type than alg": (
            f"{_b64({'typ': 'dpop+jwt', 'alg': 'RS256', 'jwk': key.public_jwk})}.{payload}.{signature}", "jwk"
        ),
        "signature": (f"{header}.{forged_payload}.{signature}", "signature"),
        "signature not base64": (f"{header}.{payload}.!!!", "signature"),
        "htm": (key.proof("GET", URL, token), "htm"),
        "htm lower case": (key.proof("post", URL, token), "htm"),
        "htu other port": (key.proof("POST", f"http://{HOST}:8080/mcp", token), "htu"),
        "htu other path": (key.proof("POST", f"http://{HOST}/other", token), "htu"),
        "htu other scheme": (key.proof("POST", f"https://{HOST}/mcp", token), "htu"),
        "htu other host": (key.proof("POST", "http://evil.example.test/mcp", token), "htu"),
        "htu not a string": (key.proof("POST", URL, token, claims={"htu": ["x"]}), "htu"),
        "iat in the future": (key.proof("POST", URL, token, iat=time.time() + 60), "iat"),
        "iat too old": (key.proof("POST", URL, token, iat=time.time() - 120), "iat"),
        "iat a string": (key.proof("POST", URL, token, claims={"iat": "now"}), "iat"),
        "iat true": (key.proof("POST", URL, token, claims={"iat": True}), "iat"),
        "iat beyond a float": (key.proof("POST", URL, token, claims={"iat": 10**400}), "iat"),
        "iat NaN": (key.proof("POST", URL, token, raw_payload=_nan_payload(token)), "iat"),
        "crv a list": (key.proof("POST", URL, token, header={"jwk": {**key.public_jwk, "crv": ["P-256"]}}),
                       "jwk"),
        "kty a list": (key.proof("POST", URL, token, header={"jwk": {**key.public_jwk, "kty": ["EC"]}}),
                       "jwk"),
        "jti of 10 KB": (key.proof("POST", URL, token, jti="j" * 10_240), "jti"),
        "no jti": (key.proof("POST", URL, token, omit=("jti",)), "jti"),
        "jti a number": (key.proof("POST", URL, token, claims={"jti": 12345}), "jti"),
        "no ath": (key.proof("POST", URL, None), "ath"),
        "ath of another token": (key.proof("POST", URL, "another-token"), "ath"),
        "ath with a NUL": (key.proof("POST", URL, None, claims={"ath": "\u0000"}), "ath"),
        "payload not an object": (f"{header}.{_b64_raw(b'[1]')}.{signature}", "signature"),
        "header nested deep": (f"{_b64_raw(b'[' * 5000)}.{payload}.{signature}", "typ"),
        "header not JSON": (f"{_b64_raw(b'{nope')}.{payload}.{signature}", "typ"),
        "header a list": (f"{_b64_raw(b'[1]')}.{payload}.{signature}", "typ"),
        "header not base64": (f"!!.{payload}.{signature}", "typ"),
        "payload nested deep": (key.proof("POST", URL, token, raw_payload="[" * 5000 + "]" * 5000), "typ"),
        "jwk members of the wrong type": (
            key.proof("POST", URL, token, header={"jwk": {**key.public_jwk, "x": 5}}), "jwk"
        ),
        "typ not a string": (
            f"{_b64({'typ': ['dpop+jwt'], 'alg': 'ES256', 'jwk': key.public_jwk})}.{payload}.{signature}",
            "typ",
        ),
    }


def _nan_payload(token: str) -> str:
    claims = {"jti": "nan-iat", "htm": "POST", "htu": URL, "ath": ath_of(token)}
    return json.dumps(claims)[:-1] + ', "iat": NaN}'


def _b64(value: Any) -> str:
    return _b64_raw(json.dumps(value).encode())


def _b64_raw(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_each_bad_proof_is_refused_with_its_own_failure(stack: Stack, client_key: DpopKey) -> None:
    token = _bound_token(stack, client_key)
    for name, (proof, failure) in _bad_proofs(client_key, token).items():
        status, outcome, response = stack.check(token, proof)
        assert (status, outcome.dpop_failure) == (401, failure), name
        assert outcome.reason == decision.DPOP_PROOF_INVALID, name
        # The span names the check; neither the proof nor the token appears anywhere.
        attributes = decision_attributes(outcome, None)
        assert attributes["authz.dpop.failure"] == failure
        assert proof not in (outcome.error or "") and token not in (outcome.error or ""), name
        assert proof.encode() not in response.SerializeToString(), name


@pytest.mark.parametrize(
    "htu",
    [
        f"{URL}?query=1",
        f"{URL}#fragment",
        "http://MCP.EXAMPLE.test/mcp",
        f"HTTP://{HOST}:80/mcp",
        f"http://{HOST}/./mcp",
    ],
)
def test_htu_forms_that_are_the_same_uri_pass(stack: Stack, client_key: DpopKey, htu: str) -> None:
    token = _bound_token(stack, client_key)
    assert stack.check(token, client_key.proof("POST", htu, token))[0] == 200


def test_the_request_side_is_normalized_too(stack: Stack, client_key: DpopKey) -> None:
    token = _bound_token(stack, client_key)
    proof = client_key.proof("POST", URL, token)
    assert stack.check(token, proof, host="MCP.example.TEST:80", path="/mcp?x=1")[0] == 200


def test_two_dpop_headers_or_an_oversized_proof_are_refused(stack: Stack, client_key: DpopKey) -> None:
    token = _bound_token(stack, client_key)
    one, two = client_key.proof("POST", URL, token), client_key.proof("POST", URL, token)
    # Envoy joins a repeated header with a comma.
    status, outcome, _ = stack.check(token, f"{one},{two}")
    assert (status, outcome.reason, outcome.dpop_failure) == (401, decision.DPOP_PROOF_INVALID, "typ")
    huge = client_key.proof("POST", URL, token, claims={"pad": "x" * 40_000})
    assert stack.check(token, huge)[1].reason == decision.DPOP_PROOF_INVALID
    assert stack.check(token, None)[1].reason == decision.DPOP_PROOF_INVALID
    assert stack.check(token, "")[1].reason == decision.DPOP_PROOF_INVALID
    # Both were refused before their jti could be used: the first still passes.
    assert stack.check(token, one)[0] == 200


def test_a_proof_with_a_nul_is_refused_before_judging(stack: Stack, client_key: DpopKey) -> None:
    token = _bound_token(stack, client_key)
    status, outcome, _ = stack.check(token, client_key.proof("POST", URL, token) + "\x00")
    assert (status, outcome.reason) == (400, decision.REQUEST_INVALID)


def test_the_default_proof_size_limit(tmp_path: Path, client_key: DpopKey) -> None:
    stack = _stack(tmp_path)
    try:
        token = _bound_token(stack, client_key)
        proof = client_key.proof("POST", URL, token, jti="j" * 10_240)
        status, outcome, _ = stack.check(token, proof)
        assert (status, outcome.reason) == (401, decision.DPOP_PROOF_INVALID)
    finally:
        stack.gateway.stop()


def test_an_algorithm_not_configured_is_refused(tmp_path: Path) -> None:
    stack = _stack(tmp_path, algorithms=["ES256"])
    try:
        key = DpopKey("EdDSA")
        token = _bound_token(stack, key)
        status, outcome, response = stack.check(token, key.proof("POST", URL, token))
        assert (status, outcome.dpop_failure) == (401, "alg")
        values = challenges(response)
        assert 'algs="ES256"' in values[1]
    finally:
        stack.gateway.stop()


def test_dpop_required_refuses_bearer_tokens(tmp_path: Path, client_key: DpopKey) -> None:
    stack = _stack(tmp_path, required=True)
    try:
        status, outcome, response = stack.check(stack.idp.token("alice"), None, scheme="Bearer")
        assert (status, outcome.reason) == (401, decision.DPOP_REQUIRED)
        values = challenges(response)
        assert len(values) == 1 and values[0].startswith("DPoP ")
        token = _bound_token(stack, client_key)
        assert stack.check(token, client_key.proof("POST", URL, token))[0] == 200
    finally:
        stack.gateway.stop()


def test_public_url_sets_the_external_base(tmp_path: Path, client_key: DpopKey) -> None:
    stack = _stack(tmp_path, public_url="https://api.example.test/base/")
    try:
        token = _bound_token(stack, client_key)
        outside = client_key.proof("POST", "https://api.example.test/base/mcp", token)
        assert stack.check(token, outside)[0] == 200
        inside = client_key.proof("POST", URL, token)
        assert stack.check(token, inside)[1].dpop_failure == "htu"
    finally:
        stack.gateway.stop()


def test_server_nonces_are_checked_without_shared_state(tmp_path: Path, client_key: DpopKey) -> None:
    secret = "n" * 40
    first = _stack(tmp_path, nonce=True, nonce_key=secret)
    second = Stack(_second_gateway(tmp_path, first.idp, secret), first.idp)
    try:
        token = _bound_token(first, client_key)
        status, outcome, response = first.check(token, client_key.proof("POST", URL, token))
        assert (status, outcome.reason, outcome.dpop_failure) == (401, decision.DPOP_NONCE_REQUIRED, "nonce")
        headers = {h.header.key: h.header.value for h in response.denied_response.headers}
        nonce = headers["dpop-nonce"]
        assert 'error="use_dpop_nonce"' in challenges(response)[1]
        assert secret not in response.SerializeToString().decode("utf-8", "replace")
        # Another replica that shares only the key accepts the nonce.
        assert second.check(token, client_key.proof("POST", URL, token, nonce=nonce))[0] == 200
        assert first.check(token, client_key.proof("POST", URL, token, nonce=nonce))[0] == 200
        wrong = first.check(token, client_key.proof("POST", URL, token, nonce="made-up"))
        assert wrong[1].reason == decision.DPOP_NONCE_REQUIRED
    finally:
        first.gateway.stop()
        second.gateway.stop()


def _second_gateway(tmp_path: Path, idp: TestIssuer, secret: str) -> InProcessGateway:
    jwks = idp.write_jwks(tmp_path / "jwks-2.json")
    auth = {"issuers": [idp.issuer_config(jwks_file=jwks)], "dpop": {"nonce": True, "nonce_key": secret}}
    return InProcessGateway({"auth": auth})


# ---------------------------------------------------------------------------- mTLS-bound tokens


def make_certificate(common_name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .sign(key, hashes.SHA256())
    )
    return certificate, key


def x5t_s256(certificate: x509.Certificate) -> str:
    digest = hashes.Hash(hashes.SHA256())
    digest.update(certificate.public_bytes(serialization.Encoding.DER))
    return base64.urlsafe_b64encode(digest.finalize()).rstrip(b"=").decode()


def envoy_encoded(certificate: x509.Certificate) -> str:
    return quote(certificate.public_bytes(serialization.Encoding.PEM).decode(), safe="")


def test_a_certificate_bound_token_needs_that_certificate(stack: Stack) -> None:
    mine, _ = make_certificate("client")
    other, _ = make_certificate("client")
    token = stack.idp.token("alice", cnf={"x5t#S256": x5t_s256(mine)})
    assert stack.check(token, None, scheme="Bearer", certificate=envoy_encoded(mine))[0] == 200
    for certificate in (envoy_encoded(other), None, "not%20a%20certificate", "%ff%fe"):
        status, outcome, _ = stack.check(token, None, scheme="Bearer", certificate=certificate)
        assert (status, outcome.reason) == (401, decision.CERTIFICATE_MISMATCH), certificate
    # A thumbprint that is not ASCII can never match, and is no crash.
    odd = stack.idp.token("alice", cnf={"x5t#S256": "é" + x5t_s256(mine)[1:]})
    assert stack.check(odd, None, scheme="Bearer", certificate=envoy_encoded(mine))[1].reason == (
        decision.CERTIFICATE_MISMATCH
    )
    # Envoy may send a chain: the peer's own certificate comes first.
    chain = envoy_encoded(mine) + envoy_encoded(other)
    assert stack.check(token, None, scheme="Bearer", certificate=chain)[0] == 200
    oversized = stack.check(token, None, scheme="Bearer", certificate="A" * 70_000)
    assert oversized[1].reason == decision.CERTIFICATE_MISMATCH
    # An unbound token does not care about the certificate.
    unbound = stack.idp.token("alice")
    assert stack.check(unbound, None, scheme="Bearer", certificate=envoy_encoded(other))[0] == 200


def test_policies_never_see_the_proof_and_read_the_confirmation(tmp_path: Path, client_key: DpopKey) -> None:
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "10-confirmation.yaml").write_text(
        """
name: confirmation
rules:
  - name: no-proof-in-headers
    allow: '!("dpop" in request.headers) && !("authorization" in request.headers)'
    deny: { status: 403, reason: proof_visible }
  - name: dpop-only
    allow: auth.confirmation == "dpop" && auth.jkt != "" && auth.x5t == ""
    deny: { status: 403, reason: not_dpop }
"""
    )
    idp = TestIssuer("ES256", serve=False)
    jwks = idp.write_jwks(tmp_path / "jwks.json")
    gateway = InProcessGateway(
        {"auth": {"issuers": [idp.issuer_config(jwks_file=jwks)]}, "policies": str(tmp_path / "policies")}
    )
    stack = Stack(gateway, idp)
    try:
        token = _bound_token(stack, client_key)
        assert stack.check(token, client_key.proof("POST", URL, token))[0] == 200
        status, outcome, _ = stack.check(idp.token("alice"), None, scheme="Bearer")
        assert (status, outcome.reason) == (403, "not_dpop")
    finally:
        gateway.stop()


@pytest.mark.parametrize(
    ("dpop", "complaint"),
    [
        ({"algorithms": ["HS256"]}, "auth.dpop.algorithms: algorithm 'HS256' is not allowed"),
        ({"algorithms": []}, "auth.dpop.algorithms: must name at least one"),
        ({"max_age": "0s"}, "auth.dpop.max_age: must be a finite duration longer than 0s"),
        ({"max_proof_bytes": 10}, "auth.dpop.max_proof_bytes"),
        ({"nonce": True}, "auth.dpop.nonce_key: nonce: true needs nonce_key"),
        ({"nonce": True, "nonce_key": "short-secret-value"}, "at least 32 bytes"),
        ({"nonce_key": "k" * 40}, "auth.dpop.nonce_key: has no effect without nonce: true"),
        ({"public_url": "ftp://x.example"}, "auth.dpop.public_url: must be an http(s) URL"),
        ({"public_url": "https://u:p@x.example"}, "auth.dpop.public_url: must not carry user information"),
        ({"public_url": "https://x.example/?q=1"}, "auth.dpop.public_url: must be an http(s) URL"),
        ({"required": "yes"}, "auth.dpop.required"),
        ({"algorithm": ["ES256"]}, "auth.dpop: unknown key 'algorithm'"),
    ],
)
def test_dpop_config_errors(dpop: dict[str, Any], complaint: str) -> None:
    from gateway.config import ConfigError, config_from_mapping

    with pytest.raises(ConfigError) as error:
        config_from_mapping({"auth": {"dpop": dpop}}, "gateway.yaml")
    assert complaint in str(error.value)
    if "nonce_key" in dpop:  # the secret is never repeated
        assert dpop["nonce_key"] not in str(error.value)


def test_dpop_config_defaults_and_values() -> None:
    from gateway.config import config_from_mapping

    assert config_from_mapping({}).auth.dpop == DpopConfig()
    dpop = config_from_mapping(
        {"auth": {"dpop": {"algorithms": "ES256", "max_age": "30s", "required": True, "nonce": True,
                           "nonce_key": "k" * 32, "public_url": "https://api.example.test"}}}
    ).auth.dpop
    assert (dpop.algorithms, dpop.max_age, dpop.required, dpop.public_url) == (
        ("ES256",), 30.0, True, "https://api.example.test"
    )
    assert "k" * 32 not in repr(dpop)


# ---------------------------------------------------------------------------- fuzzing

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from gateway.identity.dpop import DpopRejected  # noqa: E402

_FUZZ_KEY = DpopKey("ES256")
_FUZZ_PROOF = _FUZZ_KEY.proof("POST", URL, "tok")
_JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(
    header=st.dictionaries(st.sampled_from(["typ", "alg", "jwk", "crit", "kid"]), _JSONISH, max_size=5),
    jwk=st.dictionaries(st.sampled_from(["kty", "crv", "x", "y", "n", "e", "d"]), _JSONISH, max_size=6),
    payload=st.dictionaries(
        st.sampled_from(["htm", "htu", "iat", "jti", "ath", "nonce"]), _JSONISH, max_size=6
    ),
    raw=st.text(max_size=60),
)
def test_no_proof_is_accepted_or_crashes(
    header: dict[str, Any], jwk: dict[str, Any], payload: dict[str, Any], raw: str
) -> None:
    """Random headers, keys and claims under a real signature segment, and random text: each is
    refused with a DPoP failure, never accepted, never another exception."""
    proofs = ProofVerifier(DpopConfig(), 5.0, MemoryReplayCache())
    signature = _FUZZ_PROOF.split(".")[2]
    forged = f"{_b64({**header, 'jwk': jwk} if jwk else header)}.{_b64(payload)}.{signature}"
    signed = _FUZZ_KEY.proof("POST", URL, raw_payload=json.dumps(payload))  # past the signature check
    for proof in (forged, raw, f"{_FUZZ_PROOF.split('.')[0]}.{_b64(payload)}.{signature}", signed):
        with pytest.raises(DpopRejected) as refused:
            proofs.verify(proof, method="POST", uri=normalize_uri(URL), access_token="tok",
                          bound_jkt=_FUZZ_KEY.jkt, now=time.time())
        assert refused.value.failure in {"typ", "alg", "jwk", "signature", "htm", "htu", "iat", "jti", "ath",
                                         "jkt", "nonce"}


def test_nonces_on_without_a_key_are_refused_not_silently_off() -> None:
    with pytest.raises(ValueError, match="nonce key"):
        ProofVerifier(DpopConfig(nonce=True, nonce_key=None), 0.0, MemoryReplayCache())
