"""Loading policy files: every problem at its exact file:line:col, a bad set rejected whole."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from gateway.policy.loader import (
    PolicyLoadError,
    default_policy_dir,
    load_policy_dir,
    load_policy_set,
    policy_files,
)

REPO = Path(__file__).resolve().parent.parent
ENGINES = ("cel", "celpy")


def problems_of(text: str, engine: str = "cel", name: str = "p.yaml") -> list[str]:
    with pytest.raises(PolicyLoadError) as caught:
        load_policy_set([(name, textwrap.dedent(text))], engine)
    return [str(p) for p in caught.value.problems]


VALID = """\
name: ok
rules:
  - name: r
    allow: request.method == "GET"
    deny: {reason: not_get}
"""


@pytest.mark.parametrize("engine", ENGINES)
def test_valid_policy_loads(engine: str) -> None:
    loaded = load_policy_set([("p.yaml", VALID)], engine)
    assert [p.name for p in loaded.policies] == ["ok"]
    assert loaded.policies[0].rules[0].deny.status == 403


@pytest.mark.parametrize("engine", ENGINES)
def test_yaml_error_is_located(engine: str) -> None:
    text = """\
    name: p
    rules:
      - name: r
        allow: [unclosed
        deny: {reason: x}
    """
    found = problems_of(text, engine)
    assert len(found) == 1
    assert found[0].startswith("p.yaml:5:")
    assert "invalid YAML" in found[0]


@pytest.mark.parametrize("engine", ENGINES)
def test_an_unclosed_quote_is_reported_where_it_opens(engine: str) -> None:
    # The scanner only gives up at the end of the file (6:1 here): the mistake is the quote.
    text = """\
    name: p
    rules:
      - name: r
        allow: "request.method == 'GET'
        deny: {reason: x}
    """
    assert problems_of(text, engine) == [
        "p.yaml:4:12: invalid YAML: found unexpected end of stream "
        "(a quoted string that starts here is never closed)"
    ]


@pytest.mark.parametrize("engine", ENGINES)
def test_a_header_name_inside_a_block_scalar_is_located_on_its_line(engine: str) -> None:
    # Reported at the `|` (7:12) before: the header name is two lines further down.
    text = """\
    name: p
    rules:
      - name: r
        deny: {reason: x}
        when: request.method == "POST"
        # the client's name
        allow: |
          request.path == "/mcp" &&
            request.headers["X-Client"] == "cli"
    """
    assert problems_of(text, engine) == [
        "p.yaml:9:26: allow: header names are lower-case in request.headers: 'X-Client'"
    ]


HEADER_LOOKUPS = {
    # On one line: the column of the name, not of the expression.
    "quoted": (
        """\
        name: p
        session:
          key: 'request.headers.Session == "" ? "" : "s"'
        """,
        "p.yaml:3:25",
    ),
    "folded-in": (
        """\
        name: p
        session:
          key: >
            "Mcp-Session-Id" in request.headers
            ? request.headers["Mcp-Session-Id"] : ""
        """,
        "p.yaml:4:6",
    ),
    "literal-index": (
        """\
        name: p
        session:
          key: |
            "" + (
              request["headers"]["X-Up"])
        """,
        "p.yaml:5:27",
    ),
    "double-quoted-escapes": (
        """\
        name: p
        session:
          key: "\\"\\" +
            request.headers.Accept"
        """,
        "p.yaml:4:21",
    ),
}


@pytest.mark.parametrize(("text", "expected"), HEADER_LOOKUPS.values(), ids=HEADER_LOOKUPS)
def test_a_header_name_is_located_in_any_scalar_style(text: str, expected: str) -> None:
    found = problems_of(text)
    assert len(found) == 1, found
    assert found[0].startswith(f"{expected}: session.key: header names are lower-case"), found


@pytest.mark.parametrize("engine", ENGINES)
def test_unknown_keys_are_located(engine: str) -> None:
    text = """\
    name: p
    whenn: 'true'
    rules:
      - name: r
        allow: 'true'
        deny: {reason: x, stauts: 403}
    """
    assert problems_of(text, engine) == [
        "p.yaml:2:1: unknown key 'whenn' in a policy "
        "(allowed: description, handles, mode, name, rules, session, when)",
        "p.yaml:6:23: unknown key 'stauts' in deny (allowed: claim, headers, reason, status)",
    ]


@pytest.mark.parametrize("engine", ENGINES)
def test_cel_syntax_error_is_located_inside_the_file(engine: str) -> None:
    text = """\
    name: p
    rules:
      - name: r
        allow: 'request.method == "GET" &&& true'
        deny: {reason: x}
    """
    found = problems_of(text, engine)
    assert len(found) == 1
    # The third '&' is the 27th character of the expression, which starts at column 13.
    assert found[0].startswith("p.yaml:4:39: allow: Syntax error")


@pytest.mark.parametrize("engine", ENGINES)
def test_cel_syntax_error_in_a_block_scalar(engine: str) -> None:
    text = """\
    name: p
    rules:
      - name: r
        allow: |
          request.method == "GET" &&
            request.path ==
        deny: {reason: x}
    """
    found = problems_of(text, engine)
    assert len(found) == 1
    # The expression ends after `==` on line 6; the error is at (or just past) its end.
    assert found[0].startswith("p.yaml:6:")
    assert "Syntax error" in found[0]


def test_cel_type_error_is_located_inside_the_file() -> None:
    text = """\
    name: p
    rules:
      - name: r
        allow: "request.method == \\"GET\\" && size(1) > 0"
        deny: {reason: x}
    """
    # CEL places a call at its parenthesis: character 32 of the expression, which starts at
    # column 13, plus 2 for the escaping backslashes that are in the file but not in the value.
    assert problems_of(text) == [
        "p.yaml:4:46: allow: found no matching overload for 'size' applied to '(int)'"
    ]


def test_cel_type_error_on_a_folded_second_line() -> None:
    text = """\
    name: p
    rules:
      - name: r
        allow: request.method == "GET" &&
          1 == 1 && "x"
        deny: {reason: x}
    """
    found = problems_of(text)
    assert found == ["p.yaml:5:14: allow: found no matching overload for '_&&_' applied to '(bool, string)'"]


def test_expression_of_the_wrong_type_is_rejected_at_load() -> None:
    text = """\
    name: p
    when: request.path
    session:
      key: '1 + 1'
    rules:
      - name: r
        allow: '"yes"'
        deny: {reason: x}
    """
    assert problems_of(text) == [
        "p.yaml:4:9: session.key: must evaluate to a string, not int",
        "p.yaml:7:13: allow: must evaluate to a bool, not string",
    ]


def test_undeclared_variable_is_a_type_error() -> None:
    text = """\
    name: p
    rules:
      - name: r
        allow: 'reqest.method == "GET"'
        deny: {reason: x}
    """
    assert problems_of(text) == [
        # CEL places a field selection at its dot.
        "p.yaml:4:19: allow: undeclared reference to 'reqest.method' (in container '')"
    ]


def test_dyn_fields_pass_the_type_check() -> None:
    # Map-typed variables are map(string, dyn): a field is dyn, so `request.path` as a
    # `when` is accepted at load (it is a string at run time, and then denies policy_error).
    loaded = load_policy_set([("p.yaml", "name: p\nwhen: request.path\n")], "cel")
    assert loaded.policies[0].when is not None


@pytest.mark.parametrize("engine", ENGINES)
def test_duplicate_policy_names_across_files(engine: str) -> None:
    with pytest.raises(PolicyLoadError) as caught:
        load_policy_set([("a.yaml", VALID), ("b.yaml", "# the same name again\n" + VALID)], engine)
    assert [str(p) for p in caught.value.problems] == [
        "b.yaml:2:1: duplicate policy name 'ok' (first at a.yaml:1:1)"
    ]


@pytest.mark.parametrize("engine", ENGINES)
def test_duplicate_policy_names_in_one_file(engine: str) -> None:
    found = problems_of(VALID + "---\n" + VALID, engine)
    assert found == ["p.yaml:7:1: duplicate policy name 'ok' (first at p.yaml:1:1)"]


@pytest.mark.parametrize("engine", ENGINES)
def test_duplicate_rule_names(engine: str) -> None:
    text = """\
    name: p
    rules:
      - name: r
        allow: 'true'
        deny: {reason: x}
      - name: r
        allow: 'false'
        deny: {reason: y}
    """
    assert problems_of(text, engine) == ["p.yaml:6:5: duplicate rule name 'r' in policy 'p'"]


@pytest.mark.parametrize("engine", ENGINES)
def test_reason_must_be_lower_snake_case(engine: str) -> None:
    text = """\
    name: p
    rules:
      - name: r
        allow: 'true'
        deny: {status: 403, reason: Insufficient-Scope}
    """
    assert problems_of(text, engine) == [
        "p.yaml:5:33: deny.reason 'Insufficient-Scope' is not lower_snake_case"
    ]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(("status", "column"), [(200, 20), (302, 20), (600, 20), ("teapot", 20)])
def test_status_must_be_400_to_599(engine: str, status: object, column: int) -> None:
    text = f"""\
    name: p
    rules:
      - name: r
        allow: 'true'
        deny: {{status: {status}, reason: x}}
    """
    found = problems_of(text, engine)
    assert len(found) == 1
    assert found[0].startswith(f"p.yaml:5:{column}: deny.status")


@pytest.mark.parametrize("engine", ENGINES)
def test_every_problem_is_reported_and_the_set_rejected_whole(engine: str, tmp_path: Path) -> None:
    (tmp_path / "10-good.yaml").write_text(VALID)
    (tmp_path / "20-bad.yaml").write_text(
        "name: bad\nrules:\n  - name: r\n    allow: 'true'\n    deny: {reason: X}\n"
    )
    (tmp_path / "30-bad.yaml").write_text("name: worse\nmode: sometimes\n")
    with pytest.raises(PolicyLoadError) as caught:
        load_policy_dir(tmp_path, engine)
    assert [str(p) for p in caught.value.problems] == [
        f"{tmp_path}/20-bad.yaml:5:20: deny.reason 'X' is not lower_snake_case",
        f"{tmp_path}/30-bad.yaml:2:7: mode must be enforce or audit, not 'sometimes'",
    ]


def test_files_load_in_name_order_and_tests_are_not_policies(tmp_path: Path) -> None:
    for name in ("20-b.yaml", "10-a.yml", "05-c_test.yaml", ".hidden.yaml", "notes.txt"):
        (tmp_path / name).write_text(VALID.replace("name: ok", f"name: {name.split('.')[0] or 'hidden'}"))
    assert [p.name for p in policy_files(tmp_path)] == ["10-a.yml", "20-b.yaml"]
    loaded = load_policy_dir(tmp_path)
    assert [p.name for p in loaded.policies] == ["10-a", "20-b"]


@pytest.mark.parametrize(
    ("expression", "reads_body"),
    [
        ('"mcp-session-id" in request.headers ? request.headers["mcp-session-id"] : ""', False),
        ('request.headers["x-mcp-thing"] == "no body here"', False),
        ('mcp.method == "tools/call"', True),
        ('request.body.contains("x")', True),
        ('request["body"] == ""', True),
        ("size(request.headers) > 0", False),
    ],
)
def test_uses_body_sees_real_references_only(expression: str, reads_body: bool) -> None:
    text = f"name: p\nrules:\n  - name: r\n    allow: '{expression}'\n    deny: {{reason: x}}\n"
    loaded = load_policy_set([("p.yaml", text.replace("'", "'" if "'" not in expression else '"'))])
    assert loaded.policies[0].uses_body is reads_body


def test_the_default_policy_does_not_read_the_body() -> None:
    # Otherwise every request whose body Envoy cut short would be denied.
    assert load_policy_dir(default_policy_dir()).policies[0].uses_body is False


def test_default_policy_copies_are_identical() -> None:
    packaged = default_policy_dir()
    for name in ("10-mcp-session-binding.yaml", "10-mcp-session-binding_test.yaml"):
        shipped = (packaged / name).read_bytes()
        assert (REPO / "policies" / name).read_bytes() == shipped, name
    for example in ("tool-scopes", "audit-mode"):
        copy = REPO / "examples/policies" / example / "10-mcp-session-binding.yaml"
        assert copy.read_bytes() == (packaged / "10-mcp-session-binding.yaml").read_bytes(), example


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('name: "p\\n"\nrules: []\n', "p.yaml:1:7: policy name 'p\\n'"),
        (
            'name: p\nrules:\n  - name: "r\\n"\n    allow: "true"\n    deny: {reason: x}\n',
            "p.yaml:3:11: rule name 'r\\n'",
        ),
        (
            'name: p\nrules:\n  - name: r\n    allow: "true"\n    deny: {reason: "x_y\\n"}\n',
            "p.yaml:5:20: deny.reason 'x_y\\n' is not lower_snake_case",
        ),
        (
            'name: p\nrules:\n  - name: r\n    allow: "true"\n'
            '    deny: {reason: x, headers: {"x-a\\n": \'"v"\'}}\n',
            "p.yaml:5:33: invalid header name 'x-a\\n'",
        ),
        ('name: p\nhandles:\n  "draft\\n": {presented: \'""\'}\n', "p.yaml:3:3: handle kind 'draft\\n'"),
    ],
)
def test_a_name_with_a_trailing_newline_is_refused(engine: str, text: str, expected: str) -> None:
    """A final newline would reach store keys, span attributes and metric labels."""
    (problem,) = problems_of(text, engine)
    assert problem.startswith(expected), problem
