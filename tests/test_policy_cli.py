"""`authz-gateway policy check|test|explain`, run as the installed command runs: a real process."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import MCP_SDK_SESSION_NOT_FOUND_BODY
from gateway.policy.loader import default_policy_dir

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = sorted(str(p.relative_to(REPO)) for p in (REPO / "examples" / "policies").iterdir() if p.is_dir())

pytestmark = pytest.mark.timeout(60)


def cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "policy", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=50,
    )


def test_check_passes_on_the_shipped_and_example_policies() -> None:
    result = cli("check", "policies", *EXAMPLES)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (
        "policies/10-mcp-session-binding.yaml:4:1: mcp-session-binding (3 rule(s), enforce, binds sessions)"
        in (result.stdout)
    )
    assert "examples/policies/tool-scopes: ok, 2 policies in 2 file(s) (engines: cel, celpy)" in result.stdout
    assert "protocol-version-audit (1 rule(s), audit, reads the body)" in result.stdout


def test_check_without_a_directory_uses_local_policies() -> None:
    result = cli("check")
    assert result.returncode == 0
    assert result.stdout.splitlines()[-1] == "policies: ok, 1 policies in 1 file(s) (engines: cel, celpy)"


def test_check_lists_every_problem_and_exits_1(tmp_path: Path) -> None:
    (tmp_path / "10-a.yaml").write_text(
        "name: a\nrules:\n  - name: r\n    allow: 'request.method == 1 && \"x\"'\n    deny: {reason: Bad}\n"
    )
    (tmp_path / "20-b.yaml").write_text(
        "name: b\nrules:\n  - name: r\n    allow: 'a &&& b'\n    deny: {reason: x}\n"
    )
    result = cli("check", str(tmp_path))
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert lines == [
        f"{tmp_path}/10-a.yaml:4:33: allow: found no matching overload for '_&&_' applied to "
        "'(bool, string)'",
        f"{tmp_path}/10-a.yaml:5:20: deny.reason 'Bad' is not lower_snake_case",
        f"{tmp_path}/20-b.yaml:4:17: allow: Syntax error: token recognition error at: '& '",
        # cel-python finds the same syntax error in its own words; it is reported too.
        f"{tmp_path}/20-b.yaml:4:17: allow: Syntax error: unexpected character '&'",
        f"{tmp_path}: 4 problem(s); the set would be rejected",
    ]


def test_check_and_test_point_at_the_line_of_the_mistake(tmp_path: Path) -> None:
    # A header name inside a block scalar: its own line, not the `|` (7:12).
    (tmp_path / "10-a.yaml").write_text(
        "name: a\nrules:\n  - name: r\n    deny: {reason: x}\n    when: request.method == 'POST'\n"
        "    # the client\n    allow: |\n      request.path == '/mcp' &&\n"
        "        request.headers['X-Client'] == 'cli'\n"
    )
    result = cli("check", str(tmp_path))
    assert result.returncode == 1
    problem = "allow: header names are lower-case in request.headers: 'X-Client'"
    assert result.stdout.splitlines()[0] == f"{tmp_path}/10-a.yaml:9:26: {problem}"
    # An unclosed quote in a test file: where it opens, not at the end of the file (6:1).
    (tmp_path / "10-a.yaml").write_text("name: a\n")
    (tmp_path / "10-a_test.yaml").write_text(
        "cases:\n  - name: x\n    anonymous: true\n    request: {path: '/mcp}\n"
        "    expect: {decision: allow}\n"
    )
    result = cli("test", "--engine", "cel", str(tmp_path))
    assert result.returncode == 1
    assert (
        f"{tmp_path}/10-a_test.yaml:4:21: invalid YAML: found unexpected end of stream "
        "(a quoted string that starts here is never closed)"
    ) in result.stdout


def test_check_with_one_engine(tmp_path: Path) -> None:
    (tmp_path / "10-a.yaml").write_text(
        "name: a\nrules:\n  - name: r\n    allow: 'size(1) > 0'\n    deny: {reason: x}\n"
    )
    # Only the native engine type-checks; cel-python accepts what parses.
    assert cli("check", "--engine", "cel", str(tmp_path)).returncode == 1
    assert cli("check", "--engine", "celpy", str(tmp_path)).returncode == 0


def test_test_runs_the_shipped_and_example_cases_on_both_engines() -> None:
    result = cli("test", "policies", *EXAMPLES)
    assert result.returncode == 0, result.stdout
    lines = result.stdout.splitlines()
    assert (
        "PASS  [cel  ] policies/10-mcp-session-binding_test.yaml:24  other-subject-denied  "
        "(deny subject_mismatch 404)" in lines
    )
    assert (
        "PASS  [celpy] policies/10-mcp-session-binding_test.yaml:24  other-subject-denied  "
        "(deny subject_mismatch 404)" in lines
    )
    summary = lines[-1]
    assert summary.endswith("passed, 0 failed (6 test file(s), engines: cel, celpy)")
    assert int(summary.split()[0]) == len(lines) - 1 >= 2 * 40


def test_test_fails_with_one_line_per_case(tmp_path: Path) -> None:
    shutil.copy(default_policy_dir() / "10-mcp-session-binding.yaml", tmp_path)
    (tmp_path / "10-mcp-session-binding_test.yaml").write_text(
        "defaults:\n"
        "  request: {headers: {mcp-session-id: s-1}}\n"
        "  claims: {iss: https://idp.example.com, sub: mallory}\n"
        "  session: {bound: {iss: https://idp.example.com, sub: alice}}\n"
        "cases:\n"
        "  - name: right\n"
        "    expect: {decision: deny, reason: subject_mismatch, status: 404}\n"
        "  - name: wrong\n"
        "    expect: {decision: allow}\n"
    )
    result = cli("test", "--engine", "cel", str(tmp_path))
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        f"PASS  [cel  ] {tmp_path}/10-mcp-session-binding_test.yaml:6  right  (deny subject_mismatch 404)",
        f"FAIL  [cel  ] {tmp_path}/10-mcp-session-binding_test.yaml:8  wrong  (deny subject_mismatch 404)",
        "        expected allow, got deny subject_mismatch 404",
        "1 passed, 1 failed (1 test file(s), engines: cel)",
    ]


def test_test_fails_on_a_broken_policy_or_test_file(tmp_path: Path) -> None:
    (tmp_path / "10-a.yaml").write_text("name: a\nmode: loud\n")
    (tmp_path / "10-a_test.yaml").write_text(
        "cases:\n  - name: x\n    anonymous: true\n    expect: {decision: allow}\n"
    )
    result = cli("test", "--engine", "cel", str(tmp_path))
    assert result.returncode == 1
    assert f"{tmp_path}/10-a.yaml:2:7: mode must be enforce or audit, not 'loud'" in result.stdout
    (tmp_path / "10-a.yaml").write_text("name: a\n")
    (tmp_path / "10-a_test.yaml").write_text("cases:\n  - name: x\n    expect: {decision: allow}\n")
    result = cli("test", "--engine", "cel", str(tmp_path))
    assert result.returncode == 1
    assert f"{tmp_path}/10-a_test.yaml:2:5: case 'x' needs claims, or anonymous: true" in result.stdout


def test_test_without_test_files_fails(tmp_path: Path) -> None:
    (tmp_path / "10-a.yaml").write_text("name: a\n")
    result = cli("test", str(tmp_path))
    assert result.returncode == 1
    assert f"{tmp_path}: no *_test.yaml files" in result.stdout


def test_explain_shows_each_policy_and_rule_and_the_decision() -> None:
    result = cli(
        "explain", "--input", "policies/10-mcp-session-binding_test.yaml", "--case", "other-subject-denied"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "identity  iss=https://idp.example.com sub=mallory" in out
    assert "policy mcp-session-binding: applies (always)" in out
    assert "   session: stored session found (iss=https://idp.example.com, sub=alice)" in out
    assert "   rule anonymous-stays-anonymous        when true, allow true" in out
    assert "   rule same-issuer                      when true, allow true" in out
    assert (
        "   rule same-subject                     when true, allow false -> DENY 404 subject_mismatch" in out
    )
    assert "decision  deny 404 subject_mismatch  [policy=mcp-session-binding rule=same-subject]" in out
    assert f"response  404 {MCP_SDK_SESSION_NOT_FOUND_BODY}" in out
    assert "session   s-1: live after the check" in out
    assert "expected  as expected" in out


def test_explain_a_batch_and_a_policy_that_does_not_apply(tmp_path: Path) -> None:
    case = tmp_path / "case.yaml"
    case.write_text(
        "claims: {iss: https://idp.example.com, sub: alice, scope: 'tools:echo'}\n"
        "request:\n"
        "  body:\n"
        "    - {jsonrpc: '2.0', id: 1, method: tools/call, params: {name: echo}}\n"
        "    - {jsonrpc: '2.0', id: 2, method: tools/call, params: {name: drop}}\n"
    )
    result = cli("explain", "--input", str(case), "--policies", "examples/policies/tool-scopes")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "mcp call 1 of 2 method='tools/call' name='echo'" in out
    assert "mcp call 2 of 2 method='tools/call' name='drop'" in out
    assert "-- mcp call 2\n" in out
    assert "   rule tool-in-scope                    allow false -> DENY 403 insufficient_scope" in out
    assert "decision  deny 403 insufficient_scope  [policy=tool-scopes rule=tool-in-scope]" in out
    assert 'www-authenticate: Bearer error="insufficient_scope", scope="tools:drop"' in out


def test_explain_an_audit_and_a_runtime_error(tmp_path: Path) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "10-a.yaml").write_text(
        "name: a\nmode: audit\nrules:\n  - name: quiet\n    allow: 'false'\n    deny: {reason: would_deny}\n"
        "---\n"
        "name: b\nrules:\n  - name: reads-a-missing-claim\n    allow: claims.tenant == 'x'\n"
        "    deny: {reason: wrong_tenant}\n"
    )
    case = tmp_path / "case.yaml"
    case.write_text("claims: {iss: i, sub: s}\nexpect: {decision: deny, reason: policy_error, status: 403}\n")
    result = cli("explain", "--input", str(case), "--policies", str(policies))
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "policy a [audit]: applies (always)" in out
    assert (
        "   rule quiet                            allow false -> AUDIT: would deny 403 would_deny, passes"
        in out
    )
    assert "   rule reads-a-missing-claim            ERROR -> policy_error: allow:" in out
    assert "decision  deny 403 policy_error  [policy=b rule=reads-a-missing-claim]" in out
    assert "(telemetry only; never sent to the client)" in out
    assert "audit     would deny 403 would_deny (policy=a rule=quiet)" in out


def test_explain_exits_1_when_the_case_expectation_fails(tmp_path: Path) -> None:
    case = tmp_path / "case.yaml"
    case.write_text("anonymous: true\nexpect: {decision: deny}\n")
    result = cli("explain", "--input", str(case), "--policies", "policies")
    assert result.returncode == 1
    assert "expected  expected deny, got allow allowed 200" in result.stdout
    assert cli("explain", "--input", str(case), "--case", "nope", "--policies", "policies").returncode == 1


def test_explain_the_shipped_example_input() -> None:
    result = cli(
        "explain",
        "--input",
        "examples/policies/explain-batch.yaml",
        "--policies",
        "examples/policies/tool-scopes",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "policy tool-scopes: applies (when is true)" in result.stdout
    assert "   session: as for the first call of the batch" in result.stdout
    assert result.stdout.splitlines()[-1] == "expected  as expected"
