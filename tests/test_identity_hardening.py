"""Identity hardening: claims a CEL engine would misread, explicit typing, bounded lifetimes,
and withdrawn keys after an idle period.

Real keys throughout; remote key sets are served over real HTTP by TestIssuer, and the key
sets' clock is injected, as is the verifier's time.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import yaml

from gateway import decision
from gateway.config import AuthConfig, ConfigError, IssuerConfig, config_from_mapping
from gateway.example_keys import SigningKeyPair, claims_for
from gateway.identity import verifier as verifier_module
from gateway.identity.keys import RemoteKeys, http_get_json
from gateway.identity.verifier import TokenRejected, TokenVerifier
from gateway.policy.loader import default_policy_dir
from tests.support.inprocess import InProcessGateway
from tests.support.issuer import AUDIENCE, TestIssuer
from tests.support.processes import REPO

DAY = 86400.0

# ---------------------------------------------------------------- helpers


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign_exact(key: SigningKeyPair, header: dict[str, Any], payload: bytes | dict[str, Any]) -> str:
    """A JWS over exactly these header and payload bytes (PyJWT's encoder would add or drop `typ`)."""
    if isinstance(payload, dict):
        payload = json.dumps(payload).encode()  # ensure_ascii: "\ud800" stays a \u escape
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(payload)}".encode()
    signature = jwt.get_algorithm_by_name(key.alg).sign(signing_input, key.private_key)
    return f"{signing_input.decode()}.{_b64(signature)}"


def header_of(key: SigningKeyPair, **fields: Any) -> dict[str, Any]:
    """A header with the key's alg and kid; a field set to None is left out."""
    header = {"alg": key.alg, "kid": key.kid, **fields}
    return {k: v for k, v in header.items() if v is not None}


def make_verifier(tmp_path: Path, *issuers: dict[str, Any], **auth: Any) -> TokenVerifier:
    config = config_from_mapping({"auth": {"issuers": list(issuers), **auth}}, "test.yaml", tmp_path)
    return TokenVerifier(config.auth)


def rejection(verifier: TokenVerifier, token: str, now: float) -> TokenRejected | None:
    try:
        verifier.verify(token, now)
    except TokenRejected as rejected:
        return rejected
    return None


def outcome(verifier: TokenVerifier, token: str, now: float | None = None) -> str:
    rejected = rejection(verifier, token, time.time() if now is None else now)
    return decision.ALLOWED if rejected is None else rejected.reason


@pytest.fixture
def idp() -> TestIssuer:
    return TestIssuer("ES256", serve=False)


@pytest.fixture
def file_verifier(tmp_path: Path, idp: TestIssuer) -> TokenVerifier:
    return make_verifier(tmp_path, idp.issuer_config(jwks_file=idp.write_jwks(tmp_path / "jwks.json")))


def base_claims(idp: TestIssuer, now: float, **extra: Any) -> dict[str, Any]:
    return claims_for(issuer=idp.issuer, audience=AUDIENCE, subject="alice", ttl=600, now=now, **extra)


# ---------------------------------------------------------------- 1. NUL and lone surrogates in claims

UNSAFE_CLAIMS: list[tuple[str, dict[str, Any], str]] = [
    ("nul-in-sub", {"sub": "alice\u0000mallory"}, "sub"),
    ("surrogate-in-sub", {"sub": "\ud800"}, "sub"),
    ("low-surrogate-in-sub", {"sub": "alice\udfff"}, "sub"),
    ("nul-in-email", {"email": "a@example.test\u0000"}, "email"),
    ("nul-in-scope-list", {"scp": ["read", "write\u0000admin"]}, "scp"),
    ("nested-object-value", {"org": {"teams": [{"name": "ok"}, {"name": "x\ud83d"}]}}, "org"),
    ("nested-object-key", {"org": {"te\u0000am": "blue"}}, "org"),
    ("deep-list", {"ctx": [[[["\u0000"]]]]}, "ctx"),
]


@pytest.mark.parametrize(
    ("change", "claim"), [(c, n) for _, c, n in UNSAFE_CLAIMS], ids=[i for i, _, _ in UNSAFE_CLAIMS]
)
def test_a_claim_with_a_nul_or_a_lone_surrogate_is_refused(
    idp: TestIssuer, file_verifier: TokenVerifier, change: dict[str, Any], claim: str
) -> None:
    now = time.time()
    token = sign_exact(idp.key, header_of(idp.key, typ="JWT"), base_claims(idp, now, **change))
    rejected = rejection(file_verifier, token, now)
    assert rejected is not None and rejected.reason == decision.TOKEN_INVALID
    message = str(rejected)
    assert repr(claim) in message and "NUL or a lone surrogate" in message
    for value in ("mallory", "admin", "a@example.test", "blue", "x\ud83d"):  # never the value
        assert value not in message


def test_an_unsafe_claim_name_is_not_repeated(idp: TestIssuer, file_verifier: TokenVerifier) -> None:
    now = time.time()
    for name in ("role\u0000admin", "ro\ud800le", "x" * 65 + "\u0000"):
        token = sign_exact(idp.key, header_of(idp.key), base_claims(idp, now, **{name: "v"}))
        rejected = rejection(file_verifier, token, now)
        assert rejected is not None and rejected.reason == decision.TOKEN_INVALID
        assert str(rejected) == "a claim holds a NUL or a lone surrogate (U+D800..U+DFFF)"
    # A safe but long name is not repeated either.
    long_name = "n" * 200
    token = sign_exact(idp.key, header_of(idp.key), base_claims(idp, now, **{long_name: "\u0000"}))
    rejected = rejection(file_verifier, token, now)
    assert rejected is not None and long_name not in str(rejected)


def test_a_surrogate_in_raw_utf8_bytes_is_refused_too(idp: TestIssuer, file_verifier: TokenVerifier) -> None:
    """The JSON parser reads the payload's bytes with surrogatepass: ED A0 80 becomes U+D800."""
    now = time.time()
    text = json.dumps(base_claims(idp, now, sub="SUBJECT")).encode()
    payload = text.replace(b"SUBJECT", b"alice\xed\xa0\x80")
    token = sign_exact(idp.key, header_of(idp.key), payload)
    assert jwt.decode(token, options={"verify_signature": False})["sub"] == "alice\ud800"
    assert outcome(file_verifier, token, now) == decision.TOKEN_INVALID


def test_text_that_is_safe_is_accepted(idp: TestIssuer, file_verifier: TokenVerifier) -> None:
    now = time.time()
    for sub in ("ålice", "\U0001f600", "a b", "\u00ff\uffff"):
        token = sign_exact(idp.key, header_of(idp.key), base_claims(idp, now, sub=sub, org={"k": [sub]}))
        identity = file_verifier.verify(token, now)
        assert identity.subject == sub
    # Control characters are fine in other claims; a sub must not hold one (it goes upstream
    # as a header): tests/test_cel_strings.py.
    token = sign_exact(idp.key, header_of(idp.key), base_claims(idp, now, org={"k": ["a\tb\r\n"]}))
    assert file_verifier.verify(token, now).claims["org"] == {"k": ["a\tb\r\n"]}
    # A surrogate pair escaped in JSON is one code point, not a lone surrogate.
    payload = json.dumps(base_claims(idp, now, sub="PAIR")).encode().replace(b"PAIR", b"\\ud83d\\ude00")
    assert file_verifier.verify(sign_exact(idp.key, header_of(idp.key), payload), now).subject == "\U0001f600"


def test_the_claims_are_walked_once_per_token_not_per_cache_hit(
    idp: TestIssuer, file_verifier: TokenVerifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    walks = [0]
    original = verifier_module._unsafe_claim

    def counting(claims: Any) -> str | None:
        walks[0] += 1
        return original(claims)

    monkeypatch.setattr(verifier_module, "_unsafe_claim", counting)
    now = time.time()
    token = idp.token("alice", now=now)
    first = file_verifier.verify(token, now)
    for i in range(50):
        assert file_verifier.verify(token, now + i) is first
    assert walks == [1]


def test_a_kid_with_a_nul_is_refused_even_if_the_jwks_has_it(tmp_path: Path) -> None:
    idp = TestIssuer("RS256", serve=False)
    idp.keys = idp.published = [SigningKeyPair("key\u0000one", "RS256", idp.key.private_key)]
    verifier = make_verifier(tmp_path, idp.issuer_config(jwks_file=idp.write_jwks(tmp_path / "jwks.json")))
    now = time.time()
    token = sign_exact(idp.key, header_of(idp.key), base_claims(idp, now))
    rejected = rejection(verifier, token, now)
    assert rejected is not None and rejected.reason == decision.TOKEN_INVALID
    assert str(rejected) == "the kid header holds a NUL or a lone surrogate"


def test_an_unknown_alg_is_not_repeated_in_the_message(idp: TestIssuer, file_verifier: TokenVerifier) -> None:
    now = time.time()
    token = sign_exact(idp.key, {"alg": "XY-secret-marker\u0000", "kid": idp.key.kid}, base_claims(idp, now))
    rejected = rejection(file_verifier, token, now)
    assert rejected is not None and rejected.reason == decision.TOKEN_INVALID
    assert "secret" not in str(rejected) and "XY" not in str(rejected)
    # A known name may be: it tells the operator something and carries nothing of the sender's.
    token = sign_exact(idp.key, {"alg": "HS256", "kid": idp.key.kid}, base_claims(idp, now))
    assert "'HS256'" in str(rejection(file_verifier, token, now))


@pytest.fixture
def session_gateway(tmp_path: Path, idp: TestIssuer) -> Iterator[InProcessGateway]:
    """The shipped session-binding policy (session.sub == claims.sub) behind real gRPC."""
    config = {
        "auth": {"issuers": [idp.issuer_config(jwks_file=idp.write_jwks(tmp_path / "jwks.json"))]},
        "policies": str(default_policy_dir()),
    }
    gateway = InProcessGateway(config, tmp_path)
    yield gateway
    gateway.stop()


def test_a_nul_in_sub_cannot_take_over_another_subjects_session(
    session_gateway: InProcessGateway, idp: TestIssuer
) -> None:
    gw = session_gateway
    assert gw.client.status(token=idp.token("alice"), session_id="alice-sid") == 200
    assert gw.client.status(token=idp.token("mallory"), session_id="alice-sid") == 404
    impostor = sign_exact(
        idp.key, header_of(idp.key), base_claims(idp, time.time(), sub="alice\u0000mallory")
    )
    assert gw.client.status(token=impostor, session_id="alice-sid") == 401
    assert gw.last.reason == decision.TOKEN_INVALID
    assert gw.client.status(token=idp.token("alice"), session_id="alice-sid") == 200


def test_a_lone_surrogate_in_sub_is_a_401_not_a_crash(
    session_gateway: InProcessGateway, idp: TestIssuer
) -> None:
    gw = session_gateway
    token = sign_exact(idp.key, header_of(idp.key), base_claims(idp, time.time(), sub="\ud800"))
    assert gw.client.status(token=token) == 401  # was: gRPC UNKNOWN while serializing x-authz-subject
    assert gw.last.reason == decision.TOKEN_INVALID


# ---------------------------------------------------------------- 2. explicit typing (typ)


@pytest.mark.parametrize(
    "typ", [None, "JWT", "jwt", "application/jwt", "at+jwt", "AT+JWT", "application/At+Jwt"]
)
def test_default_token_types_are_accepted(
    idp: TestIssuer, file_verifier: TokenVerifier, typ: str | None
) -> None:
    now = time.time()
    token = sign_exact(idp.key, header_of(idp.key, typ=typ), base_claims(idp, now))
    assert outcome(file_verifier, token, now) == decision.ALLOWED


@pytest.mark.parametrize(
    "typ",
    [
        "dpop+jwt",
        "DPoP+JWT",
        "application/dpop+jwt",
        "logout+jwt",
        "secevent+jwt",
        "text/jwt",
        "at+jwt; v=1",
        "",
        " JWT",
        "JWT\u0000",
        5,
        False,
        ["JWT"],
        "jwt+at",
    ],
)
def test_other_token_types_are_refused(idp: TestIssuer, file_verifier: TokenVerifier, typ: Any) -> None:
    now = time.time()
    token = sign_exact(idp.key, header_of(idp.key, typ=typ), base_claims(idp, now))
    rejected = rejection(file_verifier, token, now)
    assert rejected is not None and rejected.reason == decision.TOKEN_INVALID
    assert "typ" in str(rejected)
    if isinstance(typ, str) and typ:
        assert typ not in str(rejected)


def test_an_explicit_null_typ_is_not_taken_for_no_typ(idp: TestIssuer, file_verifier: TokenVerifier) -> None:
    now = time.time()
    token = sign_exact(idp.key, {"alg": idp.key.alg, "kid": idp.key.kid, "typ": None}, base_claims(idp, now))
    assert outcome(file_verifier, token, now) == decision.TOKEN_INVALID


def test_configured_token_types(tmp_path: Path, idp: TestIssuer) -> None:
    jwks_file = idp.write_jwks(tmp_path / "jwks.json")
    now = time.time()

    def allowed(types: list[str], typ: str | None) -> bool:
        verifier = make_verifier(tmp_path, idp.issuer_config(jwks_file=jwks_file, token_types=types))
        token = sign_exact(idp.key, header_of(idp.key, typ=typ), base_claims(idp, now))
        return outcome(verifier, token, now) == decision.ALLOWED

    assert allowed(["at+jwt"], "application/AT+JWT")
    assert not allowed(["at+jwt"], "JWT")
    assert not allowed(["at+jwt"], None)
    assert allowed([""], None)
    assert not allowed([""], "JWT")
    assert not allowed([""], "")  # an empty typ is a typ, and not a media type
    assert allowed(["application/jwt", ""], "JWT")
    assert allowed(["example+jwt"], "Example+JWT")


def test_a_dpop_proof_is_refused_even_if_configured_around_the_loader(
    idp: TestIssuer, tmp_path: Path
) -> None:
    issuer = IssuerConfig(
        idp.issuer,
        (AUDIENCE,),
        jwks_file=idp.write_jwks(tmp_path / "jwks.json"),
        token_types=("at+jwt", "dpop+jwt", "application/DPoP+JWT"),
    )
    verifier = TokenVerifier(AuthConfig(issuers=(issuer,)))
    now = time.time()
    for typ in ("dpop+jwt", "application/dpop+jwt"):
        token = sign_exact(idp.key, header_of(idp.key, typ=typ), base_claims(idp, now))
        assert outcome(verifier, token, now) == decision.TOKEN_INVALID
    assert outcome(
        verifier, sign_exact(idp.key, header_of(idp.key, typ="at+jwt"), base_claims(idp, now))
    ) == (decision.ALLOWED)


@pytest.mark.parametrize(
    ("types", "detail"),
    [
        (["at+jwt", "dpop+jwt"], "DPoP"),
        (["application/DPoP+JWT"], "DPoP"),
        ([], "at least one"),
        (["at+jwt "], "not a media type"),
        (["a/b/c"], "not a media type"),
        ([5], "list of strings"),
    ],
)
def test_token_types_config_errors(tmp_path: Path, idp: TestIssuer, types: list[Any], detail: str) -> None:
    entry = idp.issuer_config(jwks_file=idp.write_jwks(tmp_path / "jwks.json"), token_types=types)
    with pytest.raises(ConfigError, match=r"auth\.issuers\[0\]\.token_types: .*" + detail):
        config_from_mapping({"auth": {"issuers": [entry]}}, "test.yaml", tmp_path)


def test_token_types_default_and_single_string(tmp_path: Path, idp: TestIssuer) -> None:
    jwks_file = idp.write_jwks(tmp_path / "jwks.json")
    config = config_from_mapping({"auth": {"issuers": [idp.issuer_config(jwks_file=jwks_file)]}})
    assert config.auth.issuers[0].token_types == ("", "JWT", "at+jwt")
    config = config_from_mapping(
        {"auth": {"issuers": [idp.issuer_config(jwks_file=jwks_file, token_types="at+jwt")]}}
    )
    assert config.auth.issuers[0].token_types == ("at+jwt",)


# ---------------------------------------------------------------- 3. auth.max_token_lifetime


def test_the_default_lifetime_bound_is_24h(idp: TestIssuer, file_verifier: TokenVerifier) -> None:
    now = 1_700_000_000.0

    def lifetime_outcome(**times: Any) -> str:
        claims = base_claims(idp, now)
        claims.update(times)
        for name in [k for k, v in claims.items() if v is None]:
            del claims[name]
        return outcome(file_verifier, sign_exact(idp.key, header_of(idp.key), claims), now)

    assert lifetime_outcome(iat=now, exp=now + DAY) == decision.ALLOWED
    assert lifetime_outcome(iat=now, exp=now + DAY + 1) == decision.TOKEN_INVALID
    assert lifetime_outcome(iat=now, exp=1e30) == decision.TOKEN_INVALID
    assert lifetime_outcome(iat=None, exp=1e30) == decision.TOKEN_INVALID
    assert lifetime_outcome(iat=now - 2 * DAY, exp=now + 60) == decision.TOKEN_INVALID  # exp - iat
    # Without iat the lifetime is exp - now (the issuer's clock may be `leeway`, 30 s, ahead).
    assert lifetime_outcome(iat=None, exp=now + DAY + 30) == decision.ALLOWED
    assert lifetime_outcome(iat=None, exp=now + DAY + 31) == decision.TOKEN_INVALID
    # An integer beyond the float range is refused as well (it used to raise OverflowError).
    huge = json.dumps(base_claims(idp, now, exp="HUGE")).encode().replace(b'"HUGE"', b"1" + b"0" * 400)
    assert (
        outcome(file_verifier, sign_exact(idp.key, header_of(idp.key), huge), now) == decision.TOKEN_INVALID
    )
    claims = base_claims(idp, now, exp=1e30)
    rejected = rejection(file_verifier, sign_exact(idp.key, header_of(idp.key), claims), now)
    assert rejected is not None
    assert str(rejected) == "the token's lifetime exceeds auth.max_token_lifetime"


def test_a_configured_lifetime_bound(tmp_path: Path, idp: TestIssuer) -> None:
    source = idp.issuer_config(jwks_file=idp.write_jwks(tmp_path / "jwks.json"))
    verifier = make_verifier(tmp_path, source, max_token_lifetime="1h")
    assert verifier._auth.max_token_lifetime == 3600.0
    now = time.time()
    assert outcome(verifier, idp.token(ttl=3600, now=now), now) == decision.ALLOWED
    assert outcome(verifier, idp.token(ttl=3601, now=now), now) == decision.TOKEN_INVALID


def test_the_cache_does_not_outlive_the_lifetime_bound(idp: TestIssuer, file_verifier: TokenVerifier) -> None:
    """A token without iat passes at first sight; the same token seen at a time when exp - now is
    over the bound (the wall clock stepped back) is refused, cached or not."""
    now = 1_700_000_000.0
    claims = base_claims(idp, now, exp=now + DAY - 60)
    del claims["iat"]
    token = sign_exact(idp.key, header_of(idp.key), claims)
    first = file_verifier.verify(token, now)
    assert file_verifier.verify(token, now + 10) is first  # a cache hit
    rejected = rejection(file_verifier, token, now - 3600)
    assert rejected is not None and rejected.reason == decision.TOKEN_INVALID
    assert "max_token_lifetime" in str(rejected)


@pytest.mark.parametrize(
    ("value", "detail"),
    [
        (0, "longer than 0s"),
        ("0s", "longer than 0s"),
        (-1, "negative"),
        (float("inf"), "finite"),
        (float("nan"), "finite"),
        ("forever", "not a duration"),
    ],
)
def test_max_token_lifetime_config_errors(value: Any, detail: str) -> None:
    with pytest.raises(ConfigError, match=r"auth\.max_token_lifetime: .*" + detail):
        config_from_mapping({"auth": {"max_token_lifetime": value}}, "test.yaml")


def test_a_nan_leeway_is_a_config_error() -> None:
    """A NaN leeway would make every exp comparison false: no token would ever expire."""
    with pytest.raises(ConfigError, match=r"auth\.leeway: must be a finite duration"):
        config_from_mapping({"auth": {"leeway": float("nan")}}, "test.yaml")


def test_config_errors_stop_serve_with_exit_status_2(tmp_path: Path, idp: TestIssuer) -> None:
    cli = str(Path(sys.executable).with_name("authz-gateway"))
    for auth_change, key in (
        ({"max_token_lifetime": "0s"}, "auth.max_token_lifetime:"),
        (
            {
                "issuers": [
                    {
                        **idp.issuer_config(jwks_file=idp.write_jwks(tmp_path / "j.json")),
                        "token_types": ["at+jwt", "dpop+jwt"],
                    }
                ]
            },
            "auth.issuers[0].token_types:",
        ),
    ):
        path = tmp_path / "gateway.yaml"
        path.write_text(yaml.safe_dump({"listen": "127.0.0.1:0", "auth": auth_change}))
        result = subprocess.run(
            [cli, "serve", "--config", str(path)],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=REPO,
            env={"OTEL_SDK_DISABLED": "true", "PATH": "/usr/bin:/bin"},
        )
        assert result.returncode == 2, result
        last = result.stderr.strip().splitlines()[-1]
        assert re.search(rf"{re.escape(str(path))}:\d+:\d+: {re.escape(key)}", last), last


# ---------------------------------------------------------------- 4. withdrawn keys after an idle period


@pytest.fixture
def served() -> Iterator[TestIssuer]:
    issuer = TestIssuer("RS256")
    yield issuer
    issuer.stop()


class Rig:
    """A verifier over one remote key set with a hand-driven clock."""

    def __init__(
        self,
        idp: TestIssuer,
        *,
        refresh: float = 300.0,
        cooldown: float = 30.0,
        timeout: float = 2.0,
        fetch: Any = http_get_json,
    ) -> None:
        self.clock = 1000.0
        self.keys = RemoteKeys(
            idp.issuer,
            jwks_uri=idp.jwks_uri,
            discovery=False,
            timeout=timeout,
            refresh_every=refresh,
            cooldown=cooldown,
            clock=lambda: self.clock,
            fetch=fetch,
        )
        config = config_from_mapping({"auth": {"issuers": [idp.issuer_config()]}})
        self.verifier = TokenVerifier(config.auth, {idp.issuer: self.keys})
        assert self.keys.fetch_now()  # as the gateway does at start

    def outcome(self, token: str) -> str:
        return outcome(self.verifier, token)


def test_a_withdrawn_key_is_refused_on_the_first_check_after_idle(served: TestIssuer) -> None:
    rig = Rig(served)
    old = served.key
    assert rig.outcome(served.token("alice")) == decision.ALLOWED
    new = served.rotate(drop_old=True)  # the issuer withdraws the old key
    rig.clock += 301  # no traffic for longer than jwks_refresh
    assert rig.outcome(served.token("mallory", key=old)) == decision.TOKEN_INVALID
    assert served.jwks_requests == 2  # one refresh, before judging
    assert rig.outcome(served.token("alice", key=new)) == decision.ALLOWED
    assert served.jwks_requests == 2


def test_a_cached_token_of_a_withdrawn_key_is_refused_on_the_first_check_after_idle(
    served: TestIssuer,
) -> None:
    rig = Rig(served)
    token = served.token("alice")
    assert rig.outcome(token) == decision.ALLOWED
    assert rig.outcome(token) == decision.ALLOWED  # cached
    served.rotate(drop_old=True)
    rig.clock += 301
    assert rig.outcome(token) == decision.TOKEN_INVALID
    assert served.jwks_requests == 2


def test_a_failing_idp_is_tried_once_per_cooldown_and_the_keys_in_hand_serve(served: TestIssuer) -> None:
    rig = Rig(served, refresh=300.0, cooldown=30.0)
    served.fail_jwks = True
    rig.clock += 301
    for i in range(20):
        assert rig.outcome(served.token(f"user{i}")) == decision.ALLOWED
    assert served.jwks_requests == 2  # one failed attempt, then the cooldown
    rig.clock += 29
    assert rig.outcome(served.token("bob")) == decision.ALLOWED
    assert served.jwks_requests == 2
    rig.clock += 2
    assert rig.outcome(served.token("carol")) == decision.ALLOWED
    assert served.jwks_requests == 3
    served.fail_jwks = False
    old = served.key
    served.rotate(drop_old=True)
    rig.clock += 31
    assert rig.outcome(served.token("mallory", key=old)) == decision.TOKEN_INVALID
    assert served.jwks_requests == 4


def test_a_slow_idp_holds_a_check_for_at_most_the_jwks_timeout(served: TestIssuer) -> None:
    """Even an IdP that trickles its answer (which a socket timeout alone does not bound)."""
    released = threading.Event()

    def slow_fetch(url: str, timeout: float) -> Any:
        if served.jwks_requests >= 1:
            released.wait(10)
        return http_get_json(url, timeout)

    rig = Rig(served, timeout=0.5, fetch=slow_fetch)
    rig.clock += 301
    try:
        started = time.monotonic()
        assert rig.outcome(served.token("alice")) == decision.ALLOWED  # the keys in hand
        assert time.monotonic() - started < 2.0
        # An attempt that overran counts as failed: the next checks neither wait nor fetch again.
        for name in ("bob", "carol", "dave"):
            started = time.monotonic()
            assert rig.outcome(served.token(name)) == decision.ALLOWED
            assert time.monotonic() - started < 0.4
    finally:
        released.set()
    deadline = time.monotonic() + 5
    while served.jwks_requests < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    assert served.jwks_requests == 2


def test_a_busy_gateway_refreshes_early_in_the_background(served: TestIssuer) -> None:
    gate = threading.Event()

    def gated_fetch(url: str, timeout: float) -> Any:
        if served.jwks_requests >= 1:  # the start-up fetch passes, the refresh waits for the gate
            assert gate.wait(30)
        return http_get_json(url, timeout)

    rig = Rig(served, refresh=300.0, timeout=30.0, fetch=gated_fetch)
    old = served.key
    served.rotate(drop_old=True)
    rig.clock += 250  # past 80 % of jwks_refresh, not yet stale
    finished: list[str] = []
    check = threading.Thread(target=lambda: finished.append(rig.outcome(served.token("alice", key=old))))
    check.start()
    check.join(5)
    assert finished == [decision.ALLOWED]  # judged at once, while the refresh waits at the gate
    gate.set()
    deadline = time.monotonic() + 5
    while served.jwks_requests < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert served.jwks_requests == 2
    deadline = time.monotonic() + 5
    while rig.outcome(served.token("bob", key=old)) == decision.ALLOWED and time.monotonic() < deadline:
        time.sleep(0.01)  # the refresh's HTTP response is on its way
    assert rig.outcome(served.token("bob", key=old)) == decision.TOKEN_INVALID
    assert served.jwks_requests == 2


@pytest.mark.parametrize("cooldown", [0.0, 30.0])
def test_concurrent_checks_on_stale_keys_share_one_fetch(served: TestIssuer, cooldown: float) -> None:
    rig = Rig(served, cooldown=cooldown)
    old = served.key
    withdrawn = cooldown > 0  # without a cooldown each unknown kid may refetch: use a live key then
    if withdrawn:
        served.rotate(drop_old=True)
    tokens = [served.token(f"user{i}", key=old) for i in range(16)]
    served.jwks_delay = 0.3
    rig.clock += 301
    barrier = threading.Barrier(len(tokens))
    results: list[str] = []

    def attempt(token: str) -> None:
        barrier.wait()
        results.append(rig.outcome(token))

    threads = [threading.Thread(target=attempt, args=(t,)) for t in tokens]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    expected = decision.TOKEN_INVALID if withdrawn else decision.ALLOWED
    assert results == [expected] * len(tokens)
    assert served.jwks_requests == 2
