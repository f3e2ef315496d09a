"""An unreachable store is visible: NOT_SERVING, /readyz 503, one ERROR line down, one INFO up.

Real gateway processes and a real redis-server, stopped and started again on the same port.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gateway.session import display_url, redis_url
from tests.support.checks import CheckClient
from tests.support.issuer import TestIssuer
from tests.support.processes import GatewayProcess, RedisServer, free_port, health_status, wait_until
from tests.test_telemetry_admin import NO_EXPORT, get, sample

CHECK_SERVICE = "envoy.service.auth.v3.Authorization"
PASSWORD = "s3cret-store-password"


def _config(idp: TestIssuer, tmp_path: Path, store: str, admin_port: int) -> dict[str, object]:
    return {
        "auth": {"issuers": [idp.issuer_config(jwks_file=idp.write_jwks(tmp_path / "jwks.json"))]},
        "store": store,
        "telemetry": {"metrics_listen": f"127.0.0.1:{admin_port}"},
    }


def _status(gateway: GatewayProcess) -> str:
    return health_status(gateway.address, CHECK_SERVICE)


def test_a_store_going_down_and_up_is_seen(tmp_path: Path) -> None:
    idp = TestIssuer(serve=False)
    redis = RedisServer(tmp_path, password=PASSWORD)
    admin_port = free_port()
    gateway = GatewayProcess(_config(idp, tmp_path, redis.url, admin_port), tmp_path, env=NO_EXPORT)
    client = CheckClient(gateway.address)
    try:
        assert _status(gateway) == "SERVING"
        assert client.status(token=idp.token("alice"), session_id="s-1") == 200
        assert sample(get(admin_port, "/metrics")[1], "authz_store_up", store="redis") == 1

        redis.stop()
        wait_until(lambda: _status(gateway) == "NOT_SERVING", timeout=10, what="NOT_SERVING")
        assert health_status(gateway.address) == "NOT_SERVING"
        assert get(admin_port, "/readyz")[0] == 503
        assert sample(get(admin_port, "/metrics")[1], "authz_store_up", store="redis") == 0
        # Checks still fail closed exactly as before.
        assert client.status(token=idp.token("alice"), session_id="s-1") == 503

        redis = RedisServer(tmp_path, port=redis.port, name="redis-again", password=PASSWORD)
        wait_until(lambda: _status(gateway) == "SERVING", timeout=10, what="SERVING again")
        assert get(admin_port, "/readyz")[0] == 200
        log = gateway.log_text()
        down = [line for line in log.splitlines() if "does not answer" in line]
        up = [line for line in log.splitlines() if "answers: serving" in line]
        assert len(down) == 1 and " ERROR " in down[0], log
        assert len(up) == 2 and all(" INFO " in line for line in up), log  # at start, and on recovery
        assert display_url(redis.url) in down[0]
        assert PASSWORD not in log
    finally:
        client.close()
        assert gateway.stop() == 0
        redis.stop()


def test_starting_with_an_unreachable_store_serves_not_serving_and_retries(tmp_path: Path) -> None:
    idp = TestIssuer(serve=False)
    port = free_port()
    store = f"redis://:{PASSWORD}@127.0.0.1:{port}/0"
    gateway = GatewayProcess(_config(idp, tmp_path, store, free_port()), tmp_path, wait=False)
    try:
        wait_until(lambda: _status(gateway) == "NOT_SERVING", timeout=20, what="NOT_SERVING at start")
        assert gateway.alive()
        wait_until(lambda: "does not answer" in gateway.log_text(), timeout=5, what="the ERROR line")
        redis = RedisServer(tmp_path, port=port, password=PASSWORD)
        try:
            wait_until(lambda: _status(gateway) == "SERVING", timeout=10, what="SERVING, the store answering")
        finally:
            redis.stop()
        assert PASSWORD not in gateway.log_text()
    finally:
        gateway.stop()


def test_store_urls_are_shown_without_their_password() -> None:
    assert display_url(f"redis://:{PASSWORD}@127.0.0.1:6379/0") == "redis://:***@127.0.0.1:6379/0"
    assert display_url(f"redis://user:{PASSWORD}@redis.internal/1") == "redis://user:***@redis.internal/1"
    assert PASSWORD not in display_url(f"redis://127.0.0.1:6379/0?password={PASSWORD}")
    assert PASSWORD not in display_url(f"unix:///run/redis.sock?db=0&password={PASSWORD}")
    for plain in ("memory://", "sqlite:////var/lib/authz/sessions.db", "redis://127.0.0.1:6379/0"):
        assert display_url(plain) == plain


@pytest.mark.parametrize("secret", ["s3cr/et9q", "s3cr?et9q#xx9", "s3cr@et9q", "s3cr/et9q@wx9?yz7"])
def test_a_password_holding_url_delimiters_is_never_shown(secret: str) -> None:
    """Unescaped `/`, `?`, `#` or `@` in a password must not move where the redaction ends."""
    fragments = re.split(r"[/?#@]", secret)
    for url in (
        f"redis://user:{secret}@h:6379/0",
        f"redis+sentinel://user:{secret}@h:1,h:2/mymaster",
        f"redis+cluster://user:{secret}@h:1,h:2",
        f"redis+sentinel://h:1,h:2/mymaster?sentinel_password={secret}",
        f"redis://h:6379/0?password={secret}",
    ):
        shown = display_url(url)
        assert not any(fragment in shown for fragment in fragments), (url, shown)
        try:
            parsed = redis_url.parse(url)
        except redis_url.RedisURLError as refused:
            assert not any(fragment in str(refused) for fragment in fragments), (url, str(refused))
        else:
            # A parsed target that reaches a log line or a traceback by its repr shows no password.
            assert not any(fragment in repr(parsed) for fragment in fragments), (url, repr(parsed))
