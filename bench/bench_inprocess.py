"""One `Check` called directly, in process: this tree against another revision, in one run.

    python bench/bench_inprocess.py --baseline ee5513d   # this tree against that commit
    python bench/bench_inprocess.py --baseline none      # this tree alone

Each revision runs in a process of its own (the baseline from a temporary `git worktree`),
with no telemetry, the memory store and a real 1.3 KB CheckRequest of an MCP tools/call on a
bound session. Two policy sets: the shipped default, and examples/policies/tool-scopes, which
reads the body. The processes alternate, round after round; each figure is the best of 7
batches of 5,000 checks, in µs of CPU per check, and the ratio is this tree / baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
POLICY_SETS = {"default": None, "tool-scopes": "examples/policies/tool-scopes"}


def _measure(tree: Path, policies: str | None, batches: int, size: int, extra: list[str]) -> float:
    """Runs inside a worker: the best batch, in µs of process CPU per Check."""
    # The tree given, not the one an editable install maps `gateway` to, nor the one
    # bench_check.py would put first on the path (it does not when REPO is on it already).
    editable = [finder for finder in sys.meta_path if "Editable" in getattr(finder, "__name__", "")]
    for finder in editable:
        sys.meta_path.remove(finder)
    sys.path.insert(0, str(tree))
    sys.path.insert(1, str(REPO / "bench"))
    sys.path.append(str(REPO))
    sys.path.extend(extra)  # after site-packages: only what the venv lacks comes from there
    import yaml
    from bench_check import AUDIENCE, ISSUER, SUBJECT, SigningKeyPair, build_check_request, claims_for, jwks

    from gateway.app import Gateway
    from gateway.config import load_config

    work = Path(tempfile.mkdtemp(prefix="bench-inprocess-"))
    key = SigningKeyPair.generate("RS256")
    (work / "jwks.json").write_text(json.dumps(jwks(key)))
    config: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "store": "memory://",
        "auth": {
            "issuers": [{"issuer": ISSUER, "audiences": [AUDIENCE], "jwks_file": str(work / "jwks.json")}]
        },
    }
    if policies is not None:
        config["policies"] = str(tree / policies)
    (work / "gateway.yaml").write_text(yaml.safe_dump(config))
    gateway = Gateway(load_config(work / "gateway.yaml"))
    import gateway as package

    if Path(package.__file__).resolve().parent != (tree / "gateway").resolve():
        raise SystemExit(f"measured {package.__file__}, not {tree}")
    claims = claims_for(issuer=ISSUER, audience=AUDIENCE, subject=SUBJECT, scope="mcp tools:search")
    token = key.sign(claims)
    request = build_check_request(token)

    class Rpc:
        def invocation_metadata(self) -> tuple[()]:
            return ()

    rpc = Rpc()
    check = gateway.service.Check
    response = check(request, rpc)
    if not response.HasField("ok_response"):
        raise SystemExit(f"the check was not allowed: {response}")
    best = float("inf")
    for _ in range(batches):
        started = time.process_time()
        for _ in range(size):
            check(request, rpc)
        best = min(best, (time.process_time() - started) / size * 1e6)
    return best


def _worktree(revision: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix="bench-baseline-"))
    subprocess.run(["git", "worktree", "add", "--detach", str(path), revision], cwd=REPO, check=True,
                   capture_output=True)
    return path


def _run(tree: Path, policies: str, batches: int, size: int, extra: tuple[str, ...] = ()) -> float:
    command = [sys.executable, __file__, "--worker", str(tree), "--policies", policies,
               "--batches", str(batches), "--size", str(size), *(f"--extra-path={p}" for p in extra)]
    env = {**os.environ, "OTEL_SDK_DISABLED": "true"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        raise SystemExit(result.stderr)
    return float(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", default="none", help="a git revision to compare with, or none")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=7)
    parser.add_argument("--size", type=int, default=5000)
    parser.add_argument(
        "--extra-path", action="append", default=[],
        help="for the baseline only: a directory searched after site-packages (e.g. pip install"
        " --target DIR xds-protos, for revisions that imported Envoy's API from it)",
    )
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--policies", default="default", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        print(_measure(args.worker, POLICY_SETS[args.policies], args.batches, args.size, args.extra_path))
        return
    baseline = None if args.baseline == "none" else _worktree(args.baseline)
    try:
        for policies in POLICY_SETS:
            ours: list[float] = []
            theirs: list[float] = []
            for round_number in range(1, args.rounds + 1):
                if baseline is not None:
                    theirs.append(_run(baseline, policies, args.batches, args.size, tuple(args.extra_path)))
                ours.append(_run(REPO, policies, args.batches, args.size))
                line = f"{policies:12} round {round_number}: this tree {ours[-1]:6.1f} µs"
                if baseline is not None:
                    line += f", {args.baseline} {theirs[-1]:6.1f} µs, ratio {ours[-1] / theirs[-1]:.2f}"
                print(line, flush=True)
            summary = f"{policies:12} best: this tree {min(ours):6.1f} µs"
            if baseline is not None:
                summary += f", {args.baseline} {min(theirs):6.1f} µs, ratio {min(ours) / min(theirs):.2f}"
            print(summary, flush=True)
    finally:
        if baseline is not None:
            subprocess.run(["git", "worktree", "remove", "--force", str(baseline)], cwd=REPO, check=False)


if __name__ == "__main__":
    main()
