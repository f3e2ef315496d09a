"""One `Check` called directly, in process: a DPoP request (ES256 proof) against a Bearer request,
in one run.

    python bench/bench_dpop.py [--rounds 5] [--size 2000]

The gateway runs with the default policy, the memory store, no telemetry, and the real 1.3 KB
CheckRequest of an MCP tools/call on a bound session (bench_check.build_check_request), a
message of its own for every Check, decoded from its bytes as the gRPC server does. The
Bearer request repeats one RS256 token; the DPoP request uses an RS256 token bound to an ES256
key (`cnf.jkt`; --alg RS256: an RSA 2048 key), with `Authorization: DPoP` and a fresh proof on
every request, as a client sends it: the token's verification is cached in both, the proof's
signature is verified every time. Last, the proofs' signature verification alone (the
gateway's own function, on the proof keys it parsed) shows the part no cache can remove.
Proofs are signed before each batch, outside the timing. Batches alternate, Bearer then DPoP,
round after round; each figure is the median of the rounds, in checks per second of wall time
and µs of process CPU per check. The ratio is DPoP / Bearer checks per second (target >= 0.6).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

os.environ.setdefault("OTEL_SDK_DISABLED", "true")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(1, str(REPO / "bench"))

import yaml  # noqa: E402
from bench_check import AUDIENCE, ISSUER, SUBJECT, build_check_request  # noqa: E402
from cryptography.hazmat.primitives import hashes  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature  # noqa: E402

from gateway.app import Gateway  # noqa: E402
from gateway.config import load_config  # noqa: E402
from gateway.envoy_api.envoy.service.auth.v3.external_auth_pb2 import CheckRequest  # noqa: E402
from gateway.example_keys import SigningKeyPair, claims_for, jwks  # noqa: E402

HTU = "https://mcp.bench.example/mcp"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class ProofSigner:
    """A client key signing DPoP proofs with `cryptography` directly: ES256 (P-256) or RS256."""

    def __init__(self, alg: str = "ES256") -> None:
        self.alg = alg
        if alg == "ES256":
            self._key: Any = ec.generate_private_key(ec.SECP256R1())
            numbers = self._key.public_key().public_numbers()
            self.jwk = {"crv": "P-256", "kty": "EC", "x": _b64(numbers.x.to_bytes(32, "big")),
                        "y": _b64(numbers.y.to_bytes(32, "big"))}
        else:
            self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            rsa_numbers = self._key.public_key().public_numbers()
            self.jwk = {"e": _b64(rsa_numbers.e.to_bytes(3, "big")), "kty": "RSA",
                        "n": _b64(rsa_numbers.n.to_bytes(256, "big"))}
        canonical = json.dumps(self.jwk, separators=(",", ":"), sort_keys=True)
        self.jkt = _b64(hashlib.sha256(canonical.encode()).digest())
        self._header = _b64(json.dumps({"typ": "dpop+jwt", "alg": alg, "jwk": self.jwk}).encode())

    def proof(self, token: str) -> str:
        ath = _b64(hashlib.sha256(token.encode()).digest())
        claims = {"jti": uuid.uuid4().hex, "htm": "POST", "htu": HTU, "iat": int(time.time()), "ath": ath}
        signing_input = f"{self._header}.{_b64(json.dumps(claims).encode())}"
        if self.alg == "ES256":
            r, s = decode_dss_signature(self._key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
            signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
        else:
            signature = self._key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{_b64(signature)}"


class Rpc:
    def invocation_metadata(self) -> tuple[()]:
        return ()


def _batch(check: Any, requests: list[Any]) -> tuple[float, float]:
    """(checks per second of wall time, µs of CPU per check) for one batch."""
    rpc = Rpc()
    started_wall, started_cpu = time.perf_counter(), time.process_time()
    for request in requests:
        response = check(request, rpc)
    wall, cpu = time.perf_counter() - started_wall, time.process_time() - started_cpu
    if not response.HasField("ok_response"):
        raise SystemExit(f"the last check was not allowed: {response}")
    return len(requests) / wall, cpu / len(requests) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size", type=int, default=2000)
    parser.add_argument("--alg", choices=["ES256", "RS256"], default="ES256", help="the proofs' algorithm")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-dpop-"))
    issuer_key = SigningKeyPair.generate("RS256", kid="bench-rs256")
    (work / "jwks.json").write_text(json.dumps(jwks(issuer_key)))
    config = {
        "listen": "127.0.0.1:0",
        "store": "memory://",
        "auth": {"issuers": [{"issuer": ISSUER, "audiences": [AUDIENCE], "jwks_file": str(work / "jwks.json"),
                              "algorithms": ["RS256"]}]},
    }
    (work / "gateway.yaml").write_text(yaml.safe_dump(config))
    gateway = Gateway(load_config(work / "gateway.yaml"))
    check = gateway.service.Check

    signer = ProofSigner(args.alg)
    bearer_token = issuer_key.sign(claims_for(issuer=ISSUER, audience=AUDIENCE, subject=SUBJECT, ttl=3600))
    dpop_token = issuer_key.sign(
        claims_for(issuer=ISSUER, audience=AUDIENCE, subject=SUBJECT, ttl=3600, cnf={"jkt": signer.jkt})
    )
    bearer_bytes = build_check_request(bearer_token).SerializeToString()

    # Every Check gets a message of its own, decoded from the bytes Envoy would send, as the gRPC
    # server hands it over: a repeated message object would favour the Bearer side (its maps
    # are cached on the object).
    def bearer_requests(count: int) -> list[Any]:
        return [CheckRequest.FromString(bearer_bytes) for _ in range(count)]

    def dpop_requests(count: int) -> list[Any]:
        requests = []
        for _ in range(count):
            request = build_check_request(dpop_token)
            headers = request.attributes.request.http.headers
            headers["authorization"] = f"DPoP {dpop_token}"
            headers["dpop"] = signer.proof(dpop_token)
            requests.append(CheckRequest.FromString(request.SerializeToString()))
        return requests

    _batch(check, bearer_requests(200))  # warm-up: caches, the session bound
    _batch(check, dpop_requests(200))
    bearer: list[tuple[float, float]] = []
    dpop: list[tuple[float, float]] = []
    for round_number in range(1, args.rounds + 1):
        bearer.append(_batch(check, bearer_requests(args.size)))
        dpop.append(_batch(check, dpop_requests(args.size)))
        print(f"round {round_number}: bearer {bearer[-1][0]:7.0f}/s {bearer[-1][1]:6.1f} µs CPU, "
              f"dpop {dpop[-1][0]:7.0f}/s {dpop[-1][1]:6.1f} µs CPU, ratio {dpop[-1][0] / bearer[-1][0]:.2f}",
              flush=True)
    bearer_rate = statistics.median(r for r, _ in bearer)
    dpop_rate = statistics.median(r for r, _ in dpop)
    bearer_cpu = statistics.median(c for _, c in bearer)
    dpop_cpu = statistics.median(c for _, c in dpop)
    print(f"median of {args.rounds} rounds of {args.size} checks, {args.alg} proofs:")
    print(f"bearer  {bearer_rate:7.0f} checks/s  {bearer_cpu:6.1f} µs CPU per check")
    print(f"dpop    {dpop_rate:7.0f} checks/s  {dpop_cpu:6.1f} µs CPU per check")
    print(f"ratio dpop/bearer checks/s: {dpop_rate / bearer_rate:.2f} (target >= 0.60); "
          f"CPU per check {dpop_cpu / bearer_cpu:.2f}x")
    _signature_floor(gateway, dpop_requests(args.size))
    gateway.stop(grace=0.1)


def _signature_floor(gateway: Gateway, requests: list[Any]) -> None:
    from gateway.identity.dpop import _signature_verifies, b64url_decode

    proofs = gateway.authorizer.identity_step.sender.proofs
    parts = [request.attributes.request.http.headers["dpop"].split(".") for request in requests]
    keys = [proofs.proof_key(header) for header, _, _ in parts]
    started = time.process_time()
    for key, (header, payload, signature) in zip(keys, parts, strict=True):
        if not _signature_verifies(key, f"{header}.{payload}".encode(), b64url_decode(signature)):
            raise SystemExit("a proof's signature did not verify")
    cpu = (time.process_time() - started) / len(parts) * 1e6
    print(f"the proof's signature verification alone: {cpu:6.1f} µs CPU per proof")


if __name__ == "__main__":
    main()
