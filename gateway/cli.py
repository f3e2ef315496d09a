"""The `authz-gateway` command: serve, and the tools around it."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import NoReturn

from gateway import __version__

# Each subcommand lives in gateway/commands/<name>.py with add_parser() and run().
COMMANDS = ("serve", "token", "policy", "demo", "sessions")


class _OneLineErrors(argparse.ArgumentParser):
    """A usage error is one line on stderr and exit 2: no usage block to read past."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineErrors(
        prog="authz-gateway",
        description=(
            "Envoy ext_authz gateway: JWT identity, sessions bound to iss+sub, CEL policies as files."
        ),
    )
    parser.add_argument("--version", action="version", version=f"authz-gateway {__version__}")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default INFO)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"gateway.commands.{name}")
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    result: int = args.run(args)
    return result
