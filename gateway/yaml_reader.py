"""Reading the gateway's YAML files (the config, policies, policy tests): what the three share.

Each file kind keeps its own schema code; this module holds the rest:

- `compose_all` and `load`: the file's nodes, which carry their place in the file, and for
  `load` its plain values too (as `yaml.safe_load` builds them). Invalid YAML raises
  `YamlError`, located at the mistake: an unclosed quote at its opening quote, not at the
  end of the file where the scanner gave up;
- `NodeReader`: the `file:line:col` of a node (`where`) and of a place inside a scalar's
  value (`where_in`: a CEL expression in a quoted or block scalar), typed accessors over
  nodes and the unknown-key check, each problem reported at its node;
- `wrong_type`: the wrong-type phrases for plain values ("must be a string", ...), for
  readers that check values rather than nodes (the config, and the test cases, whose values
  merge with their defaults).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.reader import ReaderError

__all__ = [
    "locate",
    "Kind",
    "NodeReader",
    "Position",
    "YamlError",
    "compose_all",
    "load",
    "offset_in",
    "values",
    "wrong_type",
]

MERGE_KEY = "<<"


class Position(NamedTuple):
    """A place in a file, 1-based."""

    file: str
    line: int
    column: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


class YamlError(Exception):
    """A file that is not YAML: `file:line:col: invalid YAML: problem`."""

    def __init__(self, position: Position, problem: str) -> None:
        super().__init__(f"{position}: invalid YAML: {problem}")
        self.position = position
        self.problem = problem


def _invalid(path: str, text: str, exc: yaml.YAMLError) -> YamlError:
    context = getattr(exc, "context", None)
    context_mark = getattr(exc, "context_mark", None)
    problem_mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    if isinstance(exc, ReaderError):
        # A character YAML does not allow: the error has an index into the text, not a mark.
        index = max(0, min(exc.position, len(text)))
        line = text.count("\n", 0, index) + 1
        column = index - (text.rfind("\n", 0, index) + 1) + 1
        return YamlError(Position(path, line, column), str(exc).split("\n", 1)[0])
    if context == "while scanning a quoted scalar" and context_mark is not None:
        # The scanner found the end of the stream (or a `---`) still inside the quotes: the
        # mistake is the quote that never closes, wherever the scanner gave up.
        where = Position(path, context_mark.line + 1, context_mark.column + 1)
        return YamlError(where, f"{problem} (a quoted string that starts here is never closed)")
    mark = problem_mark or context_mark
    where = Position(path, mark.line + 1, mark.column + 1) if mark is not None else Position(path, 1, 1)
    return YamlError(where, str(problem or exc))


def compose_all(path: str, text: str) -> list[Node]:
    """The node of every document of the file (a file may hold several)."""
    try:
        return [node for node in yaml.compose_all(text, Loader=yaml.SafeLoader) if node is not None]
    except yaml.YAMLError as exc:
        raise _invalid(path, text, exc) from None


def load(path: str, text: str) -> tuple[Node | None, Any]:
    """The node of the file's one document and its plain value (None and None when empty)."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is None:
            return None, None
        return node, SafeConstructor().construct_document(node)
    except yaml.YAMLError as exc:
        raise _invalid(path, text, exc) from None


def values(node: Node | None) -> dict[str, Node]:
    """A mapping's value nodes by key (nothing when `node` is not a mapping); no checks."""
    if not isinstance(node, MappingNode):
        return {}
    return {k.value: v for k, v in node.value if isinstance(k, ScalarNode) and isinstance(k.value, str)}


def locate(path: str, root: Node, keys: Sequence[str], on_key: bool = False) -> Position:
    """Where the value at `keys` is written (with `on_key`, its key: for a key that should not
    be there), or as deep as the path goes in the file."""
    node = root
    for index, key in enumerate(keys):
        name, _, item = key.partition("[")  # "issuers[0]": the first item of issuers
        if not isinstance(node, MappingNode):
            break
        entry = next(((k, v) for k, v in node.value if isinstance(k, ScalarNode) and k.value == name), None)
        if entry is None:
            break
        node = entry[0] if on_key and index == len(keys) - 1 else entry[1]
        position = item.rstrip("]")
        if position.isdigit() and isinstance(node, SequenceNode) and int(position) < len(node.value):
            node = node.value[int(position)]
    mark = node.start_mark
    return Position(path, mark.line + 1, mark.column + 1)


def offset_in(value: str, line: int, column: int) -> int:
    """The index in `value` of a 1-based line and column of it (an engine's error position)."""
    lines = value.split("\n")
    offset = sum(len(text) + 1 for text in lines[: line - 1]) + column - 1
    return max(0, min(offset, len(value)))


Kind = Literal["string", "boolean", "integer", "mapping", "list", "strings"]


def wrong_type(value: object, kind: Kind, minimum: int | None = None) -> str | None:
    """What is wrong with a plain value that should be of `kind` ("must be a string"), or None.

    YAML's true and false are not integers here, as they are for Python.
    """
    if kind == "string":
        return None if isinstance(value, str) else "must be a string"
    if kind == "boolean":
        return None if isinstance(value, bool) else "must be true or false"
    if kind == "integer":
        phrase = "must be an integer" if minimum is None else f"must be an integer >= {minimum}"
        if isinstance(value, bool) or not isinstance(value, int):
            return phrase
        return None if minimum is None or value >= minimum else phrase
    if kind == "mapping":
        return None if isinstance(value, Mapping) else "must be a mapping"
    if kind == "list":
        return None if isinstance(value, list) else "must be a list"
    ok = isinstance(value, list) and all(isinstance(item, str) for item in value)
    return None if ok else "must be a list of strings"


class NodeReader(ABC):
    """Reads one file's nodes; every problem is reported at a node, as `file:line:col`.

    Each file kind says how it keeps its problems (`report`); reading goes on after one.
    """

    def __init__(self, path: str, text: str) -> None:
        self.path = path
        self.text = text

    @abstractmethod
    def report(self, position: Position, message: str) -> None: ...

    def where(self, node: Node | None) -> Position:
        """The node's first character; the file's start when there is no node."""
        if node is None:
            return Position(self.path, 1, 1)
        return Position(self.path, node.start_mark.line + 1, node.start_mark.column + 1)

    def where_in(self, node: ScalarNode, offset: int) -> Position:
        """Where the character at `offset` of the scalar's value is written in the file.

        The file holds the value's raw text: with quotes, escapes, the indentation of a block
        scalar (whose lines start on the line after its `|` or `>`), and folded lines. Every
        non-blank character of the value appears in the raw text in the same order, so
        walking both in step finds it.
        """
        value = str(node.value)
        offset = max(0, min(offset, len(value)))
        raw_start = node.start_mark.index
        raw = self.text[raw_start : node.end_mark.index]
        # Past the opening quote, or past a block's indicator line (which may hold a comment).
        position = 1 if node.style in ("'", '"') else 0
        if node.style in ("|", ">"):
            position = raw.find("\n") + 1
        for character in value[:offset]:
            if not character.isspace():
                found = raw.find(character, position)
                position = found + 1 if found >= 0 else position
        if offset < len(value) and not value[offset].isspace():
            found = raw.find(value[offset], position)
            position = found if found >= 0 else position
        absolute = raw_start + position
        line_start = self.text.rfind("\n", 0, absolute) + 1
        return Position(self.path, self.text.count("\n", 0, absolute) + 1, absolute - line_start + 1)

    def problem(self, node: Node | None, message: str) -> None:
        self.report(self.where(node), message)

    def fields(
        self, node: Node | None, allowed: Collection[str], what: str, *, constructed: bool = False
    ) -> dict[str, tuple[Node, Node]] | None:
        """A mapping's (key node, value node) by key; None, and no problem, if it is not one.

        Every key not in `allowed` is a problem at its own line ("unknown key 'x' in deny
        (allowed: ...)"), and so is a repeated key. `constructed`: the values are read from the
        plain data (`load`), as yaml.safe_load builds it: a `<<` merge key is no problem, and a
        repeated key's last value counts.
        """
        if not isinstance(node, MappingNode):
            return None
        result: dict[str, tuple[Node, Node]] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, ScalarNode) else None
            if constructed and key == MERGE_KEY:
                continue
            if not isinstance(key, str):
                self.problem(key_node, f"{what} keys must be strings")
                continue
            if key in result and not constructed:
                self.problem(key_node, f"duplicate key {key!r}")
                continue
            if key not in allowed:
                known = ", ".join(sorted(allowed))
                self.problem(key_node, f"unknown key {key!r} in {what} (allowed: {known})")
                continue
            result[key] = (key_node, value_node)
        return result

    def mapping(self, node: Node, allowed: Collection[str], what: str) -> dict[str, tuple[Node, Node]] | None:
        """`fields`, and a problem when the node is not a mapping."""
        if not isinstance(node, MappingNode):
            self.problem(node, f"{what} must be a mapping")
            return None
        return self.fields(node, allowed, what)

    def sequence(self, node: Node, what: str) -> list[Node] | None:
        if not isinstance(node, SequenceNode):
            self.problem(node, f"{what} must be a list")
            return None
        return list(node.value)

    def scalar(self, node: Node, what: str) -> str | None:
        if not isinstance(node, ScalarNode):
            self.problem(node, f"{what} must be a scalar")
            return None
        return str(node.value)

    def integer(self, node: Node, what: str) -> int | None:
        value = self.scalar(node, what)
        if value is None:
            return None
        try:
            return int(value)
        except ValueError:
            self.problem(node, f"{what} must be an integer")
            return None
