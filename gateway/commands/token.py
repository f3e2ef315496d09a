"""`authz-gateway token`: mint a test token with a key from examples/keys (never for production)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from gateway.example_keys import SigningKeyPair, claims_for

EXAMPLE_KEY = Path("examples/keys/issuer-rs256.pem")


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("token", help="mint a signed test token (examples and demos only)")
    parser.add_argument(
        "--key", type=Path, default=EXAMPLE_KEY, help="PEM private key (default: the example key)"
    )
    parser.add_argument("--kid", default="example-rs256", help="key id in the JWT header")
    parser.add_argument("--alg", default="RS256")
    parser.add_argument("--iss", default="https://idp.example.com")
    parser.add_argument("--aud", default="https://mcp.example.com")
    parser.add_argument("--sub", default="alice")
    parser.add_argument("--scope", default=None)
    parser.add_argument("--ttl", type=int, default=3600, help="seconds until exp (negative: already expired)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    key = SigningKeyPair.from_pem(args.key, args.alg, args.kid)
    print(
        key.sign(
            claims_for(issuer=args.iss, audience=args.aud, subject=args.sub, ttl=args.ttl, scope=args.scope)
        )
    )
    return 0
