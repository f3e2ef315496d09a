"""CEL policy evaluation, per expression and per policy, on both engines, in one run.

    python bench/bench_policy.py              # about 0.25 s of timing per row and engine
    python bench/bench_policy.py --time 0.05  # a quick look

Rows:
- building one activation (what every check pays once per variable set),
- every expression of the default policy and of the tool allow-list example, alone,
- the default policy's rules as the gateway runs them (one fused expression), and rule by
  rule (the path `policy explain` and errors take),
- the whole policy step of a check with the default policy: `Authorizer.check_identity`
  for an existing session in the memory store (store lookup, activations, rules).

Each row is the mean over as many evaluations as fit in the time given (one run, no
repetitions), in microseconds per evaluation, and the celpy/cel ratio.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from gateway.commands.policy_cases import check_request_for, identity_from_claims  # noqa: E402
from gateway.config import AuthConfig, SessionConfig  # noqa: E402
from gateway.identity.verifier import TokenVerifier  # noqa: E402
from gateway.pipeline import Authorizer, PolicyHolder  # noqa: E402
from gateway.policy.engines import CompiledExpression  # noqa: E402
from gateway.policy.evaluate import judge  # noqa: E402
from gateway.policy.loader import default_policy_dir, load_policy_dir  # noqa: E402
from gateway.policy.model import Policy, PolicySet  # noqa: E402
from gateway.request import from_check_request  # noqa: E402
from gateway.session.memory import MemoryStore  # noqa: E402
from gateway.session.record import new_record, owner_key  # noqa: E402
from gateway.session.store import StoreSettings  # noqa: E402

ENGINES = ("cel", "celpy")
NOW = 1_767_225_600.0
ISSUER = "https://idp.example.com"
SESSION_ID = "7f3c2a9e5b1d4c6f8a0e2b4d6f8a1c3e"
CLAIMS = {
    "iss": ISSUER,
    "sub": "alice",
    "aud": "https://mcp.example.com",
    "exp": NOW + 3600,
    "iat": NOW - 60,
    "jti": "j-1",
    "scope": "mcp tools:echo",
}
REQUEST = {
    "method": "POST",
    "path": "/mcp",
    "host": "mcp.example.com",
    "scheme": "https",
    "headers": {
        "mcp-session-id": SESSION_ID,
        "mcp-protocol-version": "2025-11-25",
        "content-type": "application/json",
        "accept": "application/json, text/event-stream",
        "user-agent": "bench/1.0",
    },
    "body": json.dumps(
        {
            "jsonrpc": "2.0",
            "id": 7,
            "method": "tools/call",
            "params": {"name": "echo", "arguments": {"text": "hello"}},
        }
    ),
    "context": {"route": "mcp"},
    "source": {"address": "10.0.0.7"},
    "partial_body": False,
}


def per_call_us(fn: Callable[[], Any], seconds: float) -> float:
    """Mean microseconds per call over as many calls as fit in `seconds` (after one warm-up)."""
    fn()
    calls = 0
    batch = 1
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(batch):
            fn()
        calls += batch
        now = time.perf_counter()
        if now >= deadline:
            return (now - start) / calls * 1e6
        batch = min(batch * 2, 4096)


def variables_for(policy_set: PolicySet, with_session: bool) -> dict[str, Any]:
    """The variables a check builds for REQUEST (as gateway.pipeline does), plus the session."""
    context = from_check_request(check_request_for(REQUEST))
    identity = identity_from_claims(CLAIMS, NOW)
    variables: dict[str, Any] = {
        "request": context.request_map(),
        "mcp": context.mcp.as_cel(),
        "claims": identity.claims,
        "auth": identity.auth_map,
        "session": {"id": "", "exists": False, "anonymous": False},
        "context": context.context_extensions,
        "source": {"address": context.source_address, "principal": context.source_principal},
    }
    if with_session:
        from gateway.policy.activation import session_variable  # the exact session map the gateway builds

        record = new_record(
            anonymous=False,
            bound={"iss": ISSUER, "sub": "alice"},
            owner=owner_key(ISSUER, "alice"),
            now=NOW - 600,
        )
        variables["session"] = session_variable(SESSION_ID, record, True, None)
    return variables


def expressions(policy: Policy) -> list[tuple[str, CompiledExpression]]:
    found: list[tuple[str, CompiledExpression]] = []
    if policy.when is not None:
        found.append((f"{policy.name} when", policy.when))
    if policy.session is not None:
        found.append((f"{policy.name} session.key", policy.session.key))
        found.extend((f"{policy.name} bind.{name}", expr) for name, expr in policy.session.bind)
        if policy.session.terminate is not None:
            found.append((f"{policy.name} session.terminate", policy.session.terminate))
    for rule in policy.rules:
        if rule.when is not None:
            found.append((f"{policy.name}/{rule.name} when", rule.when))
        found.append((f"{policy.name}/{rule.name} allow", rule.allow))
    return found


def authorizer_for(policy_set: PolicySet) -> tuple[Authorizer, Any, Any]:
    sessions = SessionConfig()
    store = MemoryStore(StoreSettings(ttl=sessions.ttl, idle_timeout=1e9))
    record = new_record(
        anonymous=False,
        bound={"iss": ISSUER, "sub": "alice"},
        owner=owner_key(ISSUER, "alice"),
        now=NOW - 600,
    )
    store.replace(SESSION_ID, record, NOW - 1)
    auth = AuthConfig()
    authorizer = Authorizer(auth, sessions, TokenVerifier(auth), store, PolicyHolder(policy_set))
    context = from_check_request(check_request_for(REQUEST))
    return authorizer, context, identity_from_claims(CLAIMS, NOW)


def measure_engine(engine: str, seconds: float, put: Callable[[str, str, float], None]) -> None:
    default_set = load_policy_dir(default_policy_dir(), engine)
    tools_set = load_policy_dir(REPO / "examples" / "policies" / "tool-scopes", engine)
    binding = default_set.policies[0]
    variables = variables_for(default_set, with_session=True)
    activation = default_set.engine.activation(variables)
    put(
        "activation: all variables, built once per check",
        engine,
        per_call_us(lambda: default_set.engine.activation(variables), seconds),
    )
    for policy_set in (default_set, tools_set):
        for policy in policy_set.policies:
            if policy_set is tools_set and policy.name == binding.name:
                continue
            for label, expr in expressions(policy):
                put(label, engine, per_call_us(partial(expr.evaluate, activation), seconds))
    put(
        "default policy: rules, fused (a new identity or session)",
        engine,
        per_call_us(lambda: judge(binding, lambda: activation, variables), seconds),
    )
    put(
        "default policy: rules, remembered (steady traffic, as served)",
        engine,
        per_call_us(lambda: judge(binding, lambda: activation, variables, memo=default_set.memo), seconds),
    )
    put(
        "default policy: rules one by one",
        engine,
        per_call_us(lambda: judge(binding, lambda: activation, variables, lambda *a: None), seconds),
    )
    authorizer, context, identity = authorizer_for(default_set)
    decision = authorizer.check_identity(context, identity, NOW)
    assert decision.allowed, decision
    put(
        "default policy: whole policy step of a check",
        engine,
        per_call_us(lambda: authorizer.check_identity(context, identity, NOW), seconds),
    )


def measure(seconds: float) -> list[tuple[str, dict[str, float]]]:
    rows: dict[str, dict[str, float]] = {}

    def put(label: str, engine: str, value: float) -> None:
        rows.setdefault(label, {})[engine] = value

    for engine in ENGINES:
        measure_engine(engine, seconds, put)
    return list(rows.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--time", type=float, default=0.25, help="seconds of timing per row and engine")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args(argv)
    rows = measure(args.time)
    if args.json:
        print(json.dumps({label: values for label, values in rows}, indent=2))
        return 0
    width = max(len(label) for label, _ in rows)
    print(f"{'what':{width}}  {'cel µs':>9}  {'celpy µs':>9}  {'celpy/cel':>9}")
    for label, values in rows:
        cel, celpy = values["cel"], values["celpy"]
        print(f"{label:{width}}  {cel:9.2f}  {celpy:9.1f}  {celpy / cel:8.0f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
