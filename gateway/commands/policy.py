"""`authz-gateway policy check|test|explain`: the policy author's tools, like `opa test`.

check    loads a directory as the gateway would: exit 0, or 1 with every file:line:col problem.
test     runs the `*_test.yaml` cases beside the policies through the real Authorizer.
explain  shows, for one input, each policy and rule with its result, and the decision.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, TextIO

from gateway.commands.policy_cases import (
    CaseFileError,
    CaseResult,
    CaseRunner,
    PolicyCase,
    failures,
    find_test_files,
    load_case_file,
    run_case,
    session_state,
    summary,
)
from gateway.mcp import McpCall
from gateway.policy.engines import make_engine
from gateway.policy.loader import PolicyLoadError, load_policy_dir, policy_files, resolve_policy_dir
from gateway.policy.model import PolicySet

ENGINES = ("cel", "celpy")


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("policy", help="check, test and explain CEL policy files")
    commands = parser.add_subparsers(dest="policy_command", metavar="SUBCOMMAND", required=True)

    check = commands.add_parser("check", help="load and type-check a policy directory")
    check.add_argument(
        "dirs", nargs="*", type=Path, metavar="DIR", help="policy directories (default ./policies)"
    )
    _engine_option(check)
    check.set_defaults(run=run_check)

    test = commands.add_parser("test", help="run the *_test.yaml cases beside the policies")
    test.add_argument(
        "dirs", nargs="*", type=Path, metavar="DIR", help="policy directories (default ./policies)"
    )
    _engine_option(test)
    test.add_argument("-v", "--verbose", action="store_true", help="also print each case's description")
    test.set_defaults(run=run_test)

    explain = commands.add_parser("explain", help="show each policy and rule's result for one input")
    explain.add_argument(
        "--input",
        type=Path,
        required=True,
        metavar="CASE.yaml",
        help="one case, or a test file (pick a case with --case)",
    )
    explain.add_argument("--case", help="the case's name, when the input file holds several")
    explain.add_argument(
        "--policies",
        type=Path,
        metavar="DIR",
        help="policy directory (default: the input file's directory if it holds policies, else ./policies)",
    )
    explain.add_argument("--engine", choices=ENGINES, default="cel", help="CEL engine (default cel)")
    explain.set_defaults(run=run_explain)


def _engine_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--engine",
        choices=(*ENGINES, "all"),
        default="all",
        help="CEL engine: cel (cel-expr-python), celpy (cel-python), or all (default: both, so that "
        "they cannot disagree)",
    )


def _engines(choice: str) -> tuple[str, ...]:
    return ENGINES if choice == "all" else (choice,)


def _shown(path: Path | str) -> str:
    """A path as the author typed it: relative to the working directory when inside it."""
    text = str(path)
    try:
        relative = os.path.relpath(text)
    except ValueError:
        return text
    return text if relative.startswith("..") else relative


def _shown_problem(problem: object) -> str:
    text = str(problem)
    path, sep, rest = text.partition(":")
    return f"{_shown(path)}{sep}{rest}" if sep else text


def _directories(given: list[Path]) -> list[Path]:
    return given or [resolve_policy_dir(None)]


def _load(directory: Path, engine: str, out: TextIO) -> PolicySet | None:
    try:
        # Cases may well exercise an audit-only set: the refusal is `policy check`'s to report.
        return load_policy_dir(directory, make_engine(engine), allow_unprotected=True)
    except PolicyLoadError as exc:
        for problem in exc.problems:
            print(_shown_problem(problem), file=out)
        return None


# ---------------------------------------------------------------------- check


def run_check(args: argparse.Namespace) -> int:
    return check(_directories(args.dirs), _engines(args.engine), sys.stdout)


def check(directories: list[Path], engines: tuple[str, ...], out: TextIO) -> int:
    failed = False
    for directory in directories:
        problems: list[str] = []
        loaded: PolicySet | None = None
        for engine in engines:
            try:
                loaded = load_policy_dir(directory, make_engine(engine))
            except PolicyLoadError as exc:
                # The native engine type-checks; cel-python only parses. Report each problem once.
                problems.extend(p for p in map(_shown_problem, exc.problems) if p not in problems)
        if problems:
            failed = True
            for problem in problems:
                print(problem, file=out)
            print(f"{_shown(directory)}: {len(problems)} problem(s); the set would be rejected", file=out)
            continue
        assert loaded is not None
        for policy in loaded.policies:
            features = [f"{len(policy.rules)} rule(s)", policy.mode]
            if policy.session is not None:
                features.append("binds sessions")
            if policy.handles:
                features.append(f"binds handles: {', '.join(kind.name for kind in policy.handles)}")
            if policy.uses_body:
                features.append("reads the body")
            print(f"{_shown(str(policy.location))}: {policy.name} ({', '.join(features)})", file=out)
        files = len(policy_files(directory))
        print(
            f"{_shown(directory)}: ok, {len(loaded.policies)} policies in {files} file(s) "
            f"(engines: {', '.join(engines)})",
            file=out,
        )
    return 1 if failed else 0


# ---------------------------------------------------------------------- test


def run_test(args: argparse.Namespace) -> int:
    return test(_directories(args.dirs), _engines(args.engine), sys.stdout, verbose=args.verbose)


def test(directories: list[Path], engines: tuple[str, ...], out: TextIO, verbose: bool = False) -> int:
    results: list[CaseResult] = []
    broken = 0
    files = 0
    for directory in directories:
        case_files = find_test_files(directory)
        if not case_files:
            print(f"{_shown(directory)}: no *_test.yaml files", file=out)
            broken += 1
            continue
        cases: list[PolicyCase] = []
        for path in case_files:
            files += 1
            try:
                cases.extend(load_case_file(path))
            except CaseFileError as exc:
                broken += 1
                for problem in exc.problems:
                    print(_shown_problem(problem), file=out)
        for engine in engines:
            policies = _load(directory, engine, out)
            if policies is None:
                broken += 1
                continue
            runner = CaseRunner(policies)
            for case in cases:
                result = run_case(runner, case, engine)
                results.append(result)
                _print_result(result, out, verbose)
    passed = sum(r.passed for r in results)
    failed = len(results) - passed
    extra = f", {broken} file(s) with errors" if broken else ""
    print(
        f"{passed} passed, {failed} failed{extra} ({files} test file(s), engines: {', '.join(engines)})",
        file=out,
    )
    return 0 if failed == 0 and broken == 0 and results else 1


def _print_result(result: CaseResult, out: TextIO, verbose: bool) -> None:
    case = result.case
    where = f"{_shown(case.location.file)}:{case.location.line}"
    got = summary(result.outcome) if result.outcome is not None else "error"
    print(
        f"{'PASS' if result.passed else 'FAIL'}  [{result.engine:5}] {where}  {case.name}  ({got})", file=out
    )
    if verbose and case.description:
        print(f"        {case.description}", file=out)
    for failure in result.failures:
        print(f"        {failure}", file=out)


# ---------------------------------------------------------------------- explain


def run_explain(args: argparse.Namespace) -> int:
    return explain(args.input, args.case, args.policies, args.engine, sys.stdout)


def _policy_dir_for(input_path: Path, given: Path | None) -> Path:
    if given is not None:
        return given
    if input_path.parent.is_dir() and policy_files(input_path.parent):
        return input_path.parent
    return resolve_policy_dir(None)


def explain(
    input_path: Path, case_name: str | None, policies_dir: Path | None, engine: str, out: TextIO
) -> int:
    try:
        cases = load_case_file(input_path)
    except CaseFileError as exc:
        for problem in exc.problems:
            print(_shown_problem(problem), file=out)
        return 1
    if case_name is not None:
        cases = [c for c in cases if c.name == case_name]
        if not cases:
            print(f"{_shown(input_path)}: no case named {case_name!r}", file=out)
            return 1
    directory = _policy_dir_for(input_path, policies_dir)
    policies = _load(directory, engine, out)
    if policies is None:
        return 1
    status = 0
    for index, case in enumerate(cases):
        if index:
            print(file=out)
        status |= _explain_case(case, policies, directory, engine, out)
    return status


class _Steps:
    """Collects the trace of one check, policy by policy, for printing afterwards."""

    def __init__(self) -> None:
        self.calls: list[McpCall] = []
        self.events: list[tuple[int, str, str, str, Any]] = []

    def __call__(self, policy: str, rule: str, step: str, result: Any) -> None:
        if step == "mcp":
            self.calls.append(result)
            return
        self.events.append((len(self.calls), policy, rule, step, result))


def _describe_session(found: Any) -> str:
    if found is None:
        return "no session key: the request has no session"
    if hasattr(found, "reason") and hasattr(found, "allowed"):
        return f"the stored session is refused: {found.reason}"
    bound = dict(found.data.get("bound", {}))
    who = "anonymous" if found.data.get("anonymous") else ", ".join(f"{k}={v}" for k, v in bound.items())
    return f"{'stored session found' if found.existed else 'new session bound'} ({who})"


def _describe_handle(step: str, found: Any) -> str:
    """One handle step of the trace: a handle presented (found or refused), ended, or minted."""
    if step.endswith(" terminate"):
        return "terminate is true: the handle ends (tombstone)"
    if hasattr(found, "reason"):
        return f"REFUSED {found.reason}: {found.message}"
    bound = dict(found.data.get("bound", {}))
    who = "anonymous" if found.data.get("anonymous") else ", ".join(f"{k}={v}" for k, v in bound.items())
    if step.endswith(" minted"):
        return f"{'a new handle, bound' if not found.existed else 'already this caller’s'} ({who})"
    if not found.existed:
        return "never minted, passes (unknown: allow)"
    return f"stored handle found ({who})"


def _explain_case(case: PolicyCase, policies: PolicySet, directory: Path, engine: str, out: TextIO) -> int:
    steps = _Steps()
    outcome = CaseRunner(policies).run(case, steps)
    request = case.request
    print(f"case      {case.name}  ({_shown(case.location.file)}:{case.location.line})", file=out)
    print(f"policies  {_shown(directory)}  (engine {engine})", file=out)
    print(
        f"request   {request['method']} {request['path']}"
        + ("  (partial body)" if request["partial_body"] else ""),
        file=out,
    )
    if case.claims is None:
        print("identity  anonymous", file=out)
    else:
        scopes = case.claims.get("scope", case.claims.get("scp", ""))
        print(
            f"identity  iss={case.claims['iss']} sub={case.claims['sub']}"
            + (f" scopes={scopes}" if scopes else ""),
            file=out,
        )
    if case.session is not None:
        s = case.session
        who = "anonymous" if s.anonymous else ", ".join(f"{k}={v}" for k, v in s.bound.items())
        print(f"stored    session {s.id}: {s.state} ({who})", file=out)
    if case.handle is not None:
        h = case.handle
        who = "anonymous" if h.anonymous else ", ".join(f"{k}={v}" for k, v in h.bound.items())
        print(f"stored    handle {h.kind}:{h.id}: {h.state} ({who})", file=out)
    if case.response is not None:
        kind = case.response.headers.get("content-type", "no content type")
        size = len(case.response.body)
        print(f"response  {case.response.status} ({kind}, {size} bytes) from the upstream", file=out)
    for number, call in enumerate(steps.calls, start=1):
        label = f"mcp call {number} of {len(steps.calls)}" if len(steps.calls) > 1 else "mcp"
        described = f"method={call.method!r} name={call.name!r}" if call.method else "(not an MCP request)"
        print(f"{label:9} {described}", file=out)
    print(file=out)
    for call_index in range(1, max(len(steps.calls), 1) + 1):
        if len(steps.calls) > 1:
            print(f"-- mcp call {call_index}", file=out)
        reached = [e for e in steps.events if e[0] == call_index]
        for policy in policies.policies:
            failed_here = outcome.decision if outcome.decision.policy == policy.name else None
            _print_policy(policy, [e for e in reached if e[1] == policy.name], failed_here, out)
        if not reached and len(steps.calls) > 1:
            print("   (not evaluated: the check ended before this call)", file=out)
    d = outcome.decision
    print(file=out)
    if d.allowed:
        print(f"decision  allow ({d.reason})", file=out)
    else:
        where = " ".join(
            x for x in (f"policy={d.policy}" if d.policy else "", f"rule={d.rule}" if d.rule else "") if x
        )
        print(f"decision  deny {d.status} {d.reason}" + (f"  [{where}]" if where else ""), file=out)
        if d.error:
            print(f"error     {d.error}  (telemetry only; never sent to the client)", file=out)
        body = outcome.response.denied_response.body
        headers = ", ".join(
            f"{h.header.key}: {h.header.value}" for h in outcome.response.denied_response.headers
        )
        print(f"response  {d.status} {body}  [{headers}]", file=out)
    for audit in d.audit_denies:
        print(
            f"audit     would deny {audit.status} {audit.reason} (policy={audit.policy} rule={audit.rule})",
            file=out,
        )
    if outcome.session_id:
        print(
            f"session   {outcome.session_id}: {session_state(outcome.session_after)} after the check",
            file=out,
        )
    if outcome.handle_key:
        state = session_state(outcome.handle_after)
        print(f"handle    {outcome.handle_key}: {state} after the check", file=out)
    if case.expect is not None:
        problems = failures(case.expect, outcome)
        print(f"expected  {'as expected' if not problems else '; '.join(problems)}", file=out)
        return 1 if problems else 0
    return 0


def _print_policy(
    policy: Any, events: list[tuple[int, str, str, str, Any]], decided_here: Any, out: TextIO
) -> None:
    header = f"policy {policy.name}" + (" [audit]" if policy.audit else "")
    if not events and decided_here is not None and not decided_here.rule:
        # Decided before any rule: its `when` failed, or the body it reads was cut short.
        print(f"{header}: DENY {decided_here.status} {decided_here.reason}: {decided_here.error}", file=out)
        return
    if not events and policy.when is not None:
        print(f"{header}: not evaluated (the check ended before it)", file=out)
        return
    by_step: dict[tuple[str, str], Any] = {(rule, step): result for _, _, rule, step, result in events}
    applies = by_step.get(("", "when"), True if policy.when is None else None)
    if applies is None:
        print(f"{header}: not evaluated (the check ended before it)", file=out)
        return
    if not applies:
        print(f"{header}: when is false, the policy does not apply", file=out)
        return
    print(f"{header}: applies" + (" (when is true)" if policy.when is not None else " (always)"), file=out)
    if ("", "session") in by_step:
        print(f"   session: {_describe_session(by_step[('', 'session')])}", file=out)
        if hasattr(by_step[("", "session")], "allowed"):
            return
    elif policy.session is not None:
        print("   session: as for the first call of the batch", file=out)
    handle_steps = [
        (step, result) for _, _, rule, step, result in events if not rule and step.startswith("handle ")
    ]
    for step, result in handle_steps:
        if not step.endswith(" minted"):
            print(f"   {step}: {_describe_handle(step, result)}", file=out)
    decided = False
    for rule in policy.rules:
        mark = _rule_line(rule, by_step, decided, policy.audit)
        print(f"   rule {rule.name:32} {mark}", file=out)
        if by_step.get((rule.name, "allow")) is False or (rule.name, "error") in by_step:
            decided = True
    if by_step.get(("", "session.terminate")):
        print("   session.terminate is true: the session ends (tombstone)", file=out)
    for step, result in handle_steps:
        if step.endswith(" minted"):
            print(f"   {step} in the response: {_describe_handle(step, result)}", file=out)


def _rule_line(rule: Any, by_step: dict[tuple[str, str], Any], decided: bool, audit: bool) -> str:
    if (rule.name, "error") in by_step:
        return f"ERROR -> policy_error: {by_step[(rule.name, 'error')]}"
    when = by_step.get((rule.name, "when"))
    allow = by_step.get((rule.name, "allow"))
    if decided or (when is None and allow is None):
        return "not reached"
    if when is False:
        return "when false -> skipped"
    prefix = "when true, " if when is True else ""
    if allow is False and audit:
        return f"{prefix}allow false -> AUDIT: would deny {rule.deny.status} {rule.deny.reason}, passes"
    if allow is False:
        return f"{prefix}allow false -> DENY {rule.deny.status} {rule.deny.reason}"
    return f"{prefix}allow true"
