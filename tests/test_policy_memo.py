"""What the loader works out about the reads of a policy set, and the remembered verdicts built on it.

A remembered verdict must never differ from a fresh evaluation: the property test below
judges the same inputs with and without the memo, on both kinds of outcome.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.policy.evaluate import judge
from gateway.policy.loader import default_policy_dir, load_policy_dir, load_policy_set
from gateway.policy.memo import FusedMemo

RULES = """
name: p
rules:
  - name: r
    allow: {allow}
    deny: {{ status: 403, reason: nope }}
"""


def _reads(allow: str) -> dict[str, Any]:
    return dict(load_policy_set([("p.yaml", RULES.format(allow=allow))]).reads)


def test_the_default_policy_reads_a_few_fields_and_is_remembered() -> None:
    policies = load_policy_dir(default_policy_dir())
    assert policies.reads == {
        "claims": frozenset({"iss", "sub"}),
        "auth": frozenset({"authenticated"}),
        "session": frozenset({"exists", "anonymous", "iss", "sub"}),
        "request": frozenset({"method"}),
    }
    assert policies.memo is not None
    assert policies.memo.key("x", {"claims": {}, "auth": {}, "session": {}, "request": {}}) is not None


def test_whole_maps_macros_and_now_turn_remembering_off() -> None:
    for allow in (
        "claims.exists(k, k == 'admin')",
        "size(claims) > 0",
        "'admin' in claims",
        "request.exists(k, k == 'x')",
        "now > timestamp('2020-01-01T00:00:00Z')",
    ):
        reads = _reads(f'"{allow}"')
        assert None in reads.values(), allow
        assert FusedMemo(None).key("p", {}) is None


def test_string_literals_do_not_count_as_reads() -> None:
    assert _reads("""'request.method == "claims.sub mcp"'""") == {"request": frozenset({"method"})}


def test_a_denied_claim_is_read_for_the_mismatch_event() -> None:
    text = """
name: p
session: { key: '"x" in request.headers ? request.headers["x"] : ""', bind: { email: claims.email } }
rules:
  - name: r
    allow: 'true'
    deny: { status: 404, reason: email_mismatch, claim: email }
"""
    reads = load_policy_set([("p.yaml", text)]).reads
    assert "email" in (reads["claims"] or ())
    assert "email" in (reads["session"] or ())


def test_a_map_valued_field_is_never_a_key() -> None:
    memo = FusedMemo((("request", "headers"),))
    assert memo.key("p", {"request": {"headers": {"a": "b"}}}) is None
    assert memo.key("p", {"request": {"headers": "a"}}) == ("p", str, "a")


def test_true_one_and_one_point_zero_are_different_keys() -> None:
    memo = FusedMemo((("claims", "admin"),))
    keys = {memo.key("p", {"claims": {"admin": value}}) for value in (True, 1, 1.0)}
    assert len(keys) == 3


def test_root_qualified_names_and_comments_are_reads() -> None:
    text = """
name: p
rules:
  - name: a
    allow: claims.iss == 'a'
    deny: { status: 403, reason: nope }
  - name: b
    allow: ALLOW
    deny: { status: 403, reason: blocked }
"""
    commented = '"claims.iss == \'a\' // \'\'\'\\n && !has(claims.blocked) // \'\'\'"'
    for allow in ("'!has(.claims.blocked)'", commented):
        reads = load_policy_set([("p.yaml", text.replace("ALLOW", allow))]).reads
        assert reads["claims"] == frozenset({"iss", "blocked"}), allow


# One set for every example: its memo fills up across examples, as it would across requests.
DEFAULT = load_policy_dir(Path(default_policy_dir()))
names = st.sampled_from(["https://a.example", "https://b.example", "", "alice", "bob"])


@settings(max_examples=300, deadline=None)
@given(
    exists=st.booleans(),
    anonymous=st.booleans(),
    authenticated=st.booleans(),
    session_iss=names,
    session_sub=names,
    claims_iss=names,
    claims_sub=names,
    method=st.sampled_from(["POST", "GET", "DELETE"]),
    drop_session_sub=st.booleans(),
)
def test_remembered_verdicts_equal_fresh_ones(**inputs: Any) -> None:
    policies = DEFAULT
    policy = policies.policies[0]
    session = {
        "id": "s",
        "exists": inputs["exists"],
        "anonymous": inputs["anonymous"],
        "iss": inputs["session_iss"],
        "sub": inputs["session_sub"],
    }
    if inputs["drop_session_sub"]:
        del session["sub"]  # a missing field: an error, which must not be remembered as a verdict
    variables = {
        "claims": {"iss": inputs["claims_iss"], "sub": inputs["claims_sub"]},
        "auth": {"authenticated": inputs["authenticated"]},
        "session": session,
        "request": {"method": inputs["method"]},
    }

    def activation() -> Any:
        return policies.engine.activation(variables)

    fresh = judge(policy, activation, variables)  # no memo: always evaluated
    first = judge(policy, activation, variables, memo=policies.memo)
    again = judge(policy, activation, variables, memo=policies.memo)
    for verdict in (first, again):
        assert verdict.terminate == fresh.terminate
        assert (verdict.enforced is None) == (fresh.enforced is None)
        if fresh.enforced is not None and verdict.enforced is not None:
            assert (verdict.enforced.reason, verdict.enforced.rule) == (
                fresh.enforced.reason,
                fresh.enforced.rule,
            )
