"""gateway.yaml_reader: one way to read the config, policy and policy test files, and to say where."""

from __future__ import annotations

import textwrap
from typing import Any

import pytest
import yaml
from yaml.nodes import Node, ScalarNode

from gateway.yaml_reader import (
    NodeReader,
    Position,
    YamlError,
    compose_all,
    load,
    offset_in,
    values,
    wrong_type,
)

NEVER_CLOSED = "(a quoted string that starts here is never closed)"
END = f"invalid YAML: found unexpected end of stream {NEVER_CLOSED}"


class Collect(NodeReader):
    def __init__(self, text: str) -> None:
        super().__init__("f.yaml", text)
        self.problems: list[str] = []

    def report(self, position: Position, message: str) -> None:
        self.problems.append(f"{position}: {message}")


def invalid(text: str) -> str:
    with pytest.raises(YamlError) as caught:
        load("f.yaml", text)
    with pytest.raises(YamlError) as caught_all:
        compose_all("f.yaml", text)
    assert str(caught.value) == str(caught_all.value)
    return str(caught.value)


# ---------------------------------------------------------------- invalid YAML, located


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # The scanner reaches the end of the file inside the quotes: the quote is the mistake.
        ('a: 1\nb: 2\nc: 3\nd: "never closed\ne: 5\nf: 6\n', f"f.yaml:4:4: {END}"),
        ("a: 1\nb: 'never closed\n", f"f.yaml:2:4: {END}"),
        ('a: [x, "y\n', f"f.yaml:1:8: {END}"),
        (
            'a: "x\n---\nb: 1\n',
            f"f.yaml:1:4: invalid YAML: found unexpected document separator {NEVER_CLOSED}",
        ),
        # Without a final newline too (the end of the stream is then on the last line).
        ('a: "x\nb: 1', f"f.yaml:1:4: {END}"),
    ],
)
def test_an_unclosed_quote_is_reported_where_it_opens(text: str, expected: str) -> None:
    assert invalid(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # A mistake inside a quoted string that does close: at the mistake itself.
        ('a: "abc\\q"\n', "f.yaml:1:9: invalid YAML: found unknown escape character 'q'"),
        # Other errors keep the place where the parser found them.
        ("cases: [\n", "f.yaml:2:1: invalid YAML: expected the node content, but found '<stream end>'"),
        ("a: b: c\n", "f.yaml:1:5: invalid YAML: mapping values are not allowed here"),
        # A character YAML refuses: its place, not 1:1.
        (
            "a: 1\nb: x\x07y\n",
            "f.yaml:2:5: invalid YAML: unacceptable character #x0007: special characters are not allowed",
        ),
    ],
)
def test_other_yaml_errors_keep_their_place(text: str, expected: str) -> None:
    assert invalid(text) == expected


def test_a_yaml_error_carries_its_position_and_problem() -> None:
    with pytest.raises(YamlError) as caught:
        load("dir/x.yaml", "k: 'v\n")
    assert caught.value.position == Position("dir/x.yaml", 1, 4)
    assert caught.value.problem == f"found unexpected end of stream {NEVER_CLOSED}"


def test_load_gives_the_node_and_the_value_of_safe_load() -> None:
    text = "base: &b {x: 1}\nmerged: {<<: *b, y: 2}\nwhen: 2026-01-01T00:00:00Z\nlist: [1, 2.5, true, null]\n"
    node, value = load("f.yaml", text)
    assert value == yaml.safe_load(text)
    assert node is not None and node.start_mark.line == 0
    assert load("f.yaml", "") == (None, None)
    assert load("f.yaml", "# only a comment\n") == (None, None)
    # More than one document where one is expected: invalid, at the second one.
    assert invalid_load("a: 1\n---\nb: 2\n") == "f.yaml:2:1: invalid YAML: but found another document"


def invalid_load(text: str) -> str:
    with pytest.raises(YamlError) as caught:
        load("f.yaml", text)
    return str(caught.value)


def test_a_value_that_cannot_be_built_is_invalid_yaml() -> None:
    # Composes, but yaml.safe_load could not build it: reported like safe_load's error.
    assert invalid_load("a: [1]\n? [1]\n: 2\n") == "f.yaml:2:3: invalid YAML: found unhashable key"


def test_compose_all_gives_every_document() -> None:
    documents = compose_all("f.yaml", "a: 1\n---\nb: 2\n")
    assert [list(values(d)) for d in documents] == [["a"], ["b"]]
    assert compose_all("f.yaml", "") == compose_all("f.yaml", "# nothing\n") == []


# ---------------------------------------------------------------- where: nodes and places inside scalars


def scalar_at(text: str, key: str) -> tuple[Collect, ScalarNode]:
    (document,) = compose_all("f.yaml", text)
    node = values(document)[key]
    assert isinstance(node, ScalarNode)
    return Collect(text), node


def where_of(text: str, key: str, needle: str) -> Position:
    """Where `needle` (its first occurrence in the value) is written in the file."""
    reader, node = scalar_at(text, key)
    return reader.where_in(node, str(node.value).index(needle))


def test_where_is_the_node_start_and_the_file_start_without_one() -> None:
    reader, node = scalar_at("a: 1\nb:   two\n", "b")
    assert reader.where(node) == Position("f.yaml", 2, 6)
    assert str(reader.where(None)) == "f.yaml:1:1"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # A literal block: the value's line n is the file's line after the `|` plus n - 1, and
        # the column is the value's column plus the block's indentation.
        ('x: 1\nallow: |\n  a == "1" &&\n    HERE == 2\n', (4, 5)),
        # The indicator line may hold a comment, or an indentation indicator.
        ('allow: | # the rule\n  a &&\n  HERE\n', (3, 3)),
        ("allow: |2\n    a &&\n   HERE\n", (3, 4)),
        # A folded block: its lines join with spaces in the value.
        ("allow: >\n  a &&\n  b &&\n      HERE\n", (4, 7)),
        # Quoted: past the quote; escapes and folded lines take more room in the file.
        ('allow: "a == \\"x\\" && HERE"\n', (1, 23)),
        ("allow: 'a == ''x'' &&\n  HERE'\n", (2, 3)),
        # Plain, over two lines.
        ("allow: a &&\n  HERE\n", (2, 3)),
    ],
)
def test_where_in_finds_a_place_inside_a_scalar(text: str, expected: tuple[int, int]) -> None:
    assert where_of(text, "allow", "HERE") == Position("f.yaml", *expected)


def test_offset_in_turns_an_engines_line_and_column_into_an_index() -> None:
    value = "ab\ncd\nef"
    assert value[offset_in(value, 2, 2)] == "d"
    assert offset_in(value, 1, 1) == 0
    assert offset_in(value, 9, 9) == len(value)  # past the end: clamped


# ---------------------------------------------------------------- typed accessors and unknown keys


def read(text: str) -> tuple[Collect, Node]:
    (document,) = compose_all("f.yaml", textwrap.dedent(text))
    return Collect(textwrap.dedent(text)), document


def test_unknown_repeated_and_non_string_keys_are_each_at_their_line() -> None:
    reader, node = read(
        """\
        name: a
        nmae: b
        name: c
        ? [x]
        : d
        """
    )
    fields = reader.mapping(node, {"name", "mode"}, "a policy")
    assert fields is not None and list(fields) == ["name"]
    assert reader.problems == [
        "f.yaml:2:1: unknown key 'nmae' in a policy (allowed: mode, name)",
        "f.yaml:3:1: duplicate key 'name'",
        "f.yaml:4:3: a policy keys must be strings",
    ]
    # The first of a repeated key counts (the rest are problems).
    key_node, value_node = fields["name"]
    assert (key_node.start_mark.line, value_node.value) == (0, "a")


def test_keys_of_constructed_values_allow_merges_and_take_the_last() -> None:
    # As yaml.safe_load builds the values: `<<` merges, and a repeated key's last value wins.
    reader, node = read(
        """\
        base: &b {x: 1}
        case:
          <<: *b
          name: a
          name: b
          nmae: c
        """
    )
    case = values(node)["case"]
    fields = reader.fields(case, {"name", "x"}, "a case", constructed=True)
    assert fields is not None and fields["name"][1].value == "b"
    assert reader.problems == ["f.yaml:6:3: unknown key 'nmae' in a case (allowed: name, x)"]


def test_fields_of_something_else_than_a_mapping_is_none_and_no_problem() -> None:
    reader, node = read("a: [1]\n")
    assert reader.fields(values(node)["a"], {"x"}, "a") is None
    assert reader.fields(None, {"x"}, "a") is None
    assert reader.problems == []


def test_typed_accessors_report_file_line_col() -> None:
    reader, node = read(
        """\
        deny: [1]
        rules: {a: 1}
        reason: {a: 1}
        status: four
        ok: 404
        """
    )
    fields = values(node)
    assert reader.mapping(fields["deny"], {"x"}, "deny") is None
    assert reader.sequence(fields["rules"], "rules") is None
    assert reader.scalar(fields["reason"], "deny.reason") is None
    assert reader.integer(fields["status"], "deny.status") is None
    assert reader.integer(fields["ok"], "deny.status") == 404
    assert reader.sequence(fields["deny"], "deny") is not None
    assert reader.problems == [
        "f.yaml:1:7: deny must be a mapping",
        "f.yaml:2:8: rules must be a list",
        "f.yaml:3:9: deny.reason must be a scalar",
        "f.yaml:4:9: deny.status must be an integer",
    ]


@pytest.mark.parametrize(
    ("value", "kind", "minimum", "expected"),
    [
        ("x", "string", None, None),
        (1, "string", None, "must be a string"),
        (True, "boolean", None, None),
        ("yes", "boolean", None, "must be true or false"),
        (3, "integer", None, None),
        (True, "integer", None, "must be an integer"),  # YAML's true is no integer
        (1.0, "integer", None, "must be an integer"),
        (0, "integer", 1, "must be an integer >= 1"),
        (False, "integer", 0, "must be an integer >= 0"),
        (5, "integer", 1, None),
        ({}, "mapping", None, None),
        ([], "mapping", None, "must be a mapping"),
        ([], "list", None, None),
        (None, "list", None, "must be a list"),
        (["a", "b"], "strings", None, None),
        (["a", 1], "strings", None, "must be a list of strings"),
        ("a", "strings", None, "must be a list of strings"),
    ],
)
def test_wrong_type_phrases(value: Any, kind: Any, minimum: int | None, expected: str | None) -> None:
    assert wrong_type(value, kind, minimum) == expected
