"""A test identity provider: real keys, a JWKS served over real HTTP on loopback,
OIDC discovery, key rotation, and token minting."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from gateway.example_keys import SigningKeyPair, claims_for, jwks

AUDIENCE = "https://mcp.example.test"


class TestIssuer:
    """Signs tokens and publishes its public keys at /jwks.json (and discovery)."""

    __test__ = False  # not a pytest test class

    def __init__(self, alg: str = "RS256", *, serve: bool = True, name: str = "idp") -> None:
        self.keys = [SigningKeyPair.generate(alg)]
        self.published = list(self.keys)
        self.jwks_requests = 0
        self.fail_jwks = False
        self.jwks_delay = 0.0  # seconds the JWKS endpoint waits before answering (a slow IdP)
        self._server: ThreadingHTTPServer | None = None
        self.issuer = f"https://{name}.example.test"
        if serve:
            self._start()

    # ---- HTTP ----
    def _start(self) -> None:
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/jwks.json":
                    issuer.jwks_requests += 1
                    if issuer.jwks_delay:
                        time.sleep(issuer.jwks_delay)
                    if issuer.fail_jwks:
                        self.send_error(503)
                        return
                    payload = jwks(*issuer.published)
                elif self.path == "/.well-known/openid-configuration":
                    payload = {"issuer": issuer.issuer, "jwks_uri": issuer.jwks_uri}
                else:
                    self.send_error(404)
                    return
                body = json.dumps(payload).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self.issuer = self.base_url  # discovery requires issuer == where the document lives
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def jwks_uri(self) -> str:
        return f"{self.base_url}/jwks.json"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    # ---- keys ----
    @property
    def key(self) -> SigningKeyPair:
        return self.keys[-1]

    def rotate(self, alg: str | None = None, *, drop_old: bool = False) -> SigningKeyPair:
        new = SigningKeyPair.generate(alg or self.key.alg)
        self.keys.append(new)
        self.published = [new] if drop_old else [*self.published, new]
        return new

    def write_jwks(self, path: Path) -> Path:
        path.write_text(json.dumps(jwks(*self.published)))
        return path

    # ---- tokens ----
    def token(
        self,
        subject: str = "alice",
        *,
        audience: str = AUDIENCE,
        ttl: float = 600,
        key: SigningKeyPair | None = None,
        headers: dict[str, Any] | None = None,
        now: float | None = None,
        **claims: Any,
    ) -> str:
        body = claims_for(
            issuer=self.issuer, audience=audience, subject=subject, ttl=ttl, now=now or time.time()
        )
        body.update(claims)
        return (key or self.key).sign(body, headers)

    def issuer_config(self, *, jwks_file: Path | None = None, **extra: Any) -> dict[str, Any]:
        config: dict[str, Any] = {"issuer": self.issuer, "audiences": [AUDIENCE]}
        if jwks_file is not None:
            config["jwks_file"] = str(jwks_file)
        else:
            config["jwks_uri"] = self.jwks_uri
        config.update(extra)
        return config
