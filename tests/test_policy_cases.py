"""The shipped and example policy test cases, on both CEL engines, and the case runner itself."""

from __future__ import annotations

import json
import textwrap
from functools import cache
from pathlib import Path

import pytest

from gateway.commands.policy_cases import (
    CaseFileError,
    CaseRunner,
    PolicyCase,
    find_test_files,
    load_case_file,
    parse_cases,
    run_case,
)
from gateway.policy.loader import default_policy_dir, load_policy_dir, load_policy_set
from gateway.policy.model import PolicySet

REPO = Path(__file__).resolve().parent.parent
CASE_DIRS = [
    REPO / "policies",
    default_policy_dir(),
    *sorted(p for p in (REPO / "examples" / "policies").iterdir() if p.is_dir()),
]
ENGINES = ("cel", "celpy")


@cache
def policy_set(directory: Path, engine: str) -> PolicySet:
    return load_policy_dir(directory, engine)


def shipped_cases() -> list[tuple[Path, PolicyCase]]:
    return [(d, case) for d in CASE_DIRS for path in find_test_files(d) for case in load_case_file(path)]


SHIPPED = shipped_cases()


def _case_id(item: tuple[Path, PolicyCase]) -> str:
    directory, case = item
    return f"{directory.name}:{case.name}"


def test_every_policy_directory_ships_tests() -> None:
    for directory in CASE_DIRS:
        assert find_test_files(directory), directory
    required = {
        "refresh-keeps-session",
        "other-subject-denied",
        "other-issuer-denied",
        "anonymous-upgrade-denied",
        "no-session-passes",
        "owner-delete-terminates",
        "terminated-session-404",
    }
    assert required <= {c.name for d, c in SHIPPED if d == REPO / "policies"}


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("item", SHIPPED, ids=_case_id)
def test_shipped_case_passes(item: tuple[Path, PolicyCase], engine: str) -> None:
    directory, case = item
    result = run_case(CaseRunner(policy_set(directory, engine)), case, engine)
    assert result.passed, result.failures


@pytest.mark.parametrize("item", SHIPPED, ids=_case_id)
def test_both_engines_give_the_same_response(item: tuple[Path, PolicyCase]) -> None:
    """Not only the expectation: the whole CheckResponse, byte for byte, and the stored session."""
    directory, case = item
    outcomes = [CaseRunner(policy_set(directory, engine)).run(case) for engine in ENGINES]
    cel, celpy = outcomes
    assert cel.response.SerializeToString() == celpy.response.SerializeToString()
    assert (cel.decision.reason, cel.decision.policy, cel.decision.rule) == (
        celpy.decision.reason,
        celpy.decision.policy,
        celpy.decision.rule,
    )
    assert cel.decision.audit_denies == celpy.decision.audit_denies
    assert cel.session_after == celpy.session_after


def run_text(policy_dir: Path, cases: str, engine: str = "cel") -> list[list[str]]:
    runner = CaseRunner(load_policy_dir(policy_dir, engine))
    return [
        run_case(runner, case, engine).failures for case in parse_cases("t_test.yaml", textwrap.dedent(cases))
    ]


def test_a_wrong_expectation_fails_with_what_differs() -> None:
    failures = run_text(
        REPO / "policies",
        """\
        cases:
          - name: wrong
            request: {headers: {mcp-session-id: s-1}}
            claims: {iss: https://idp.example.com, sub: mallory}
            session: {bound: {iss: https://idp.example.com, sub: alice}}
            expect:
              decision: deny
              reason: issuer_mismatch
              status: 403
              rule: same-issuer
              headers: {x-nope: "1"}
              session: {state: terminated}
        """,
    )
    assert failures == [
        [
            "expected deny issuer_mismatch 403, got deny subject_mismatch 404",
            "expected rule 'same-issuer', got 'same-subject'",
            "expected header x-nope: '1', got None",
            "expected the stored session to be terminated, it is live",
        ]
    ]


def test_audit_expectations_are_compared() -> None:
    failures = run_text(
        REPO / "examples/policies/audit-mode",
        """\
        cases:
          - name: claims-no-audit-but-there-is-one
            request: {body: {jsonrpc: "2.0", id: 1, method: tools/list}}
            claims: {iss: i, sub: s}
            expect: {decision: allow, audit: []}
        """,
    )
    assert len(failures[0]) == 1
    assert failures[0][0].startswith("expected audit [], got [{'policy': 'protocol-version-audit'")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (
            "cases:\n  - name: a\n    claims: {iss: i, sub: s}\n    expect: {decision: maybe}\n",
            "t_test.yaml:4:24: expect.decision must be allow or deny",
        ),
        (
            "cases:\n  - name: a\n    claims: {iss: i, sub: s}\n    requets: {}\n"
            "    expect: {decision: allow}\n",
            "t_test.yaml:4:5: unknown key 'requets' in a case",
        ),
        (
            "cases:\n  - name: a\n    request: {methd: GET}\n    anonymous: true\n"
            "    expect: {decision: allow}\n",
            "t_test.yaml:3:15: unknown key 'methd' in request",
        ),
        (
            "cases:\n  - name: a\n    expect: {decision: allow}\n",
            "t_test.yaml:2:5: case 'a' needs claims, or anonymous: true",
        ),
        (
            "cases:\n  - name: a\n    claims: {iss: i}\n    expect: {decision: allow}\n",
            "t_test.yaml:3:13: claims.sub must be a non-empty string",
        ),
        (
            "cases:\n  - name: a\n    anonymous: true\n    session: {id: s-1, state: gone}\n"
            "    expect: {decision: allow}\n",
            "t_test.yaml:4:14: session.state must be one of live, terminated, revoked, expired, legacy",
        ),
        ("cases: [\n", "t_test.yaml:2:1: invalid YAML"),
        # An unclosed quote: where it opens, not at the end of the file (6:1).
        (
            "cases:\n  - name: a\n    claims: {iss: i, sub: s}\n    request: {path: \"/mcp}\n"
            "    expect: {decision: allow}\n",
            "t_test.yaml:4:21: invalid YAML: found unexpected end of stream "
            "(a quoted string that starts here is never closed)",
        ),
    ],
)
def test_case_file_problems_are_located(text: str, problem: str) -> None:
    with pytest.raises(CaseFileError) as caught:
        parse_cases("t_test.yaml", text)
    assert any(p.startswith(problem) for p in caught.value.problems), caught.value.problems


def test_defaults_merge_and_null_removes() -> None:
    cases = parse_cases(
        "t_test.yaml",
        textwrap.dedent("""\
        defaults:
          request: {path: /mcp, headers: {mcp-session-id: s-1, x-a: "1"}}
          claims: {iss: i, sub: s, scope: "a b"}
        cases:
          - name: one
            request: {headers: {mcp-session-id: null}}
            claims: {scope: null}
            expect: {decision: allow}
          - name: two
            anonymous: true
            expect: {decision: allow}
        """),
    )
    one, two = cases
    assert one.request["headers"] == {"x-a": "1"}
    assert one.claims == {"iss": "i", "sub": "s"}
    assert two.claims is None
    assert two.request["headers"] == {"mcp-session-id": "s-1", "x-a": "1"}


def test_each_case_gets_a_fresh_store() -> None:
    # The first case binds s-1 to alice; the second, as mallory, must not see that binding.
    failures = run_text(
        REPO / "policies",
        """\
        defaults:
          request: {headers: {mcp-session-id: s-1}}
        cases:
          - name: alice-binds
            claims: {iss: i, sub: alice}
            expect: {decision: allow, session: {state: live, bound: {iss: i, sub: alice}}}
          - name: mallory-binds-her-own
            claims: {iss: i, sub: mallory}
            expect: {decision: allow, session: {state: live, bound: {iss: i, sub: mallory}}}
        """,
    )
    assert failures == [[], []]


MINTS_ON_CREATE = """\
name: drafts
handles:
  draft:
    presented: '""'
    minted: 'response.json.result.structuredContent.draft_id'
    minted_by: 'mcp.method == "tools/call" && mcp.name == "create_draft"'
rules: []
"""


@pytest.mark.parametrize("engine", ENGINES)
def test_a_response_is_read_only_when_the_call_may_mint(engine: str) -> None:
    """As the gateway: a call no kind mints never has its response read, so a body that is not
    JSON passes; the same body for a call that may mint is handle_unreadable."""
    runner = CaseRunner(load_policy_set([("p.yaml", MINTS_ON_CREATE)], engine))

    def case(tool: str) -> PolicyCase:
        params = {"name": tool, "arguments": {}}
        message = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": params}
        body = json.dumps(message)
        text = (
            f"name: c\nrequest: {{body: '{body}', headers: {{content-type: application/json}}}}\n"
            "claims: {iss: https://idp.example.com, sub: alice}\n"
            "response: {status: 200, headers: {content-type: text/plain}, body: 'not json'}\n"
            "expect: {decision: allow}\n"
        )
        (parsed,) = parse_cases("t_test.yaml", text)
        return parsed

    listed = runner.run(case("list_drafts")).decision
    assert listed.allowed and not listed.mints_handles, listed
    created = runner.run(case("create_draft")).decision
    assert (created.allowed, created.reason) == (False, "handle_unreadable"), created


@pytest.mark.parametrize("engine", ENGINES)
def test_a_bad_pattern_from_the_request_is_not_in_the_error(engine: str) -> None:
    policy = (
        "name: p\nrules:\n  - name: r\n"
        "    allow: 'request.headers[\"x-name\"].matches(request.headers[\"x-pattern\"])'\n"
        "    deny: {reason: name_mismatch}\n"
    )
    runner = CaseRunner(load_policy_set([("p.yaml", policy)], engine))
    for pattern in ("s3cretV4lue(", "[s3cretV4lue", "a{2,1}s3cretV4lue", "(?P<s3cretV4lue"):
        text = (
            f"name: c\nrequest: {{headers: {{x-name: abc, x-pattern: '{pattern}'}}}}\n"
            "claims: {iss: https://idp.example.com, sub: alice}\n"
        )
        (case,) = parse_cases("t_test.yaml", text)
        denial = runner.run(case).decision
        assert denial.reason == "policy_error" and denial.error, denial
        assert "s3cretV4lue" not in denial.error, denial.error
