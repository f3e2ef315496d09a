"""`authz-gateway token`: mint a test token with a key from examples/keys (never for production)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from gateway.example_keys import SigningKeyPair, claims_for

EXAMPLE_KEY = Path("examples/keys/issuer-rs256.pem")


SIGNING_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA")


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("token", help="mint a signed test token (examples and demos only)")
    add = parser.add_argument
    add("--key", type=Path, default=EXAMPLE_KEY, help="PEM private key (default: the example key)")
    add("--kid", default="example-rs256", help="key id in the JWT header (default %(default)s)")
    add("--alg", default="RS256", choices=SIGNING_ALGORITHMS, help="fitting the key (default %(default)s)")
    add("--iss", default="https://idp.example.com", help="the iss claim (default %(default)s)")
    add("--aud", default="https://mcp.example.com", help="the aud claim (default %(default)s)")
    add("--sub", default="alice", help="the sub claim: who the token is for (default %(default)s)")
    add("--scope", default=None, help='the scope claim, space-separated (e.g. "mcp tools:echo")')
    add("--ttl", type=int, default=3600, help="seconds until exp (negative: already expired)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        key = SigningKeyPair.from_pem(args.key, args.alg, args.kid)
        token = key.sign(
            claims_for(issuer=args.iss, audience=args.aud, subject=args.sub, ttl=args.ttl, scope=args.scope)
        )
    except OSError as exc:
        print(f"authz-gateway token: cannot read the key {args.key}: {exc.strerror}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, NotImplementedError) as exc:
        # A key that is not PEM, or that does not fit --alg (an RSA key with ES256, say).
        print(f"authz-gateway token: the key {args.key} cannot sign {args.alg}: {exc}", file=sys.stderr)
        return 2
    print(token)
    return 0
