"""What a CEL expression reads of the policy variables, found on its syntax tree.

This decides which fields an activation holds and what the verdict memo keys on, so it is
security-relevant: a field left out of the activation turns a valid expression into an
error or, worse with the memo, a stale verdict. It must never under-approximate.

The tree is cel-python's (`celpy.celparser.CELParser`, a lark tree), whatever the engine:
both engines read the same language. Where they could differ, the analysis gives up and
reads every variable whole, which is always safe:

- the source is first scanned with CEL's own lexical rules (strings, raw strings, triple
  quotes, bytes, `//` comments), and the tree is used only when celpy's lexer found exactly
  the same string literals; it is known to end some raw strings elsewhere, e.g. `r'\\'`;
- an expression celpy cannot parse (backquoted field names, syntax added to CEL later)
  reads every variable whole. The optional syntax of the cel engine (`a.?b`, `a[?b]`,
  `[?x]`, `{?k: v}`) is read as the plain select, index or element: it reads the same.

For each variable the result is the set of fields read, or None when it is read whole:
a macro over it or a method on it (`claims.exists(…)`), an index that is not a string
literal (`claims[k]`), the variable passed to a function (`size(claims)`), compared,
put in a list. `v.f`, `v["f"]`, `.v.f` and `has(v.f)` read the field `f` only.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from gateway.policy.engines import VARIABLES
from gateway.text import CREDENTIAL_HEADERS

_VARIABLES = frozenset(VARIABLES)
# Not a map: any use of it reads it whole.
_SCALAR_VARIABLES = frozenset({"now"})

_IDENT = re.compile(r"[_a-zA-Z][_a-zA-Z0-9]*")
_NUMBER = re.compile(r"0[xX][0-9a-fA-F]+[uU]?|[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?[uU]?")
# CEL's string prefixes: raw (r), bytes (b), raw bytes (br); `rb` is an identifier.
_STRING_PREFIXES = frozenset({"r", "R", "b", "B", "br", "bR", "Br", "BR"})
_LITERAL_TOKENS = frozenset({"STRING_LIT", "MLSTRING_LIT", "BYTES_LIT"})
# Nodes that only pass their one child on (precedence levels of the grammar).
_CHAIN = frozenset(
    {
        "expr",
        "conditionalor",
        "conditionaland",
        "relation",
        "addition",
        "multiplication",
        "unary",
        "member",
        "primary",
        "paren_expr",
    }
)
# Macros that bind their first argument, a name, in the other arguments: name -> argument counts.
_BINDING_MACROS: Mapping[str, tuple[int, ...]] = {
    "all": (2,),
    "exists": (2,),
    "exists_one": (2,),
    "filter": (2,),
    "map": (2, 3),
    "optMap": (2,),
    "optFlatMap": (2,),
}
# Escapes whose value both engines agree on (cel-python keeps `\?` and `` \` `` as they are).
_SIMPLE_ESCAPES = {
    "a": "\a",
    "b": "\b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "t": "\t",
    "v": "\v",
    "\\": "\\",
    "'": "'",
    '"': '"',
}
_HEX_ESCAPES = {"x": 2, "u": 4, "U": 8}


@dataclass(frozen=True, slots=True)
class Reads:
    """What one expression reads."""

    # Each variable read, with the fields read of it (None: the whole value).
    variables: Mapping[str, frozenset[str] | None]
    # Header names looked up in request.headers by a string literal, as written.
    header_names: tuple[str, ...] = ()
    # False when the expression could not be analyzed: then every variable is read whole.
    analyzed: bool = True

    @property
    def uses_body(self) -> bool:
        """Whether the body is read: `mcp`, `request.body`, or the whole `request`."""
        if "mcp" in self.variables:
            return True
        if "request" not in self.variables:
            return False
        request = self.variables["request"]
        return request is None or "body" in request


EVERYTHING = Reads(MappingProxyType(dict.fromkeys(VARIABLES)), (), analyzed=False)


_HEADER_LOOKUP = re.compile(
    r'^\s*"([a-z0-9-]+)"\s+in\s+request\.headers\s*\?\s*request\.headers\s*\[\s*"([a-z0-9-]+)"\s*\]\s*:\s*""\s*$'
)


def header_lookup(source: str) -> str | None:
    """The header an expression of the form `"h" in request.headers ? request.headers["h"] : ""`
    reads, so that the gateway can read it without CEL; None for any other form, and for a
    credential header, which CEL never sees (its value there is "")."""
    found = _HEADER_LOOKUP.match(source)
    if found is None or found.group(1) != found.group(2) or found.group(1) in CREDENTIAL_HEADERS:
        return None
    return found.group(1)


@functools.lru_cache(maxsize=2048)
def analyze(source: str) -> Reads:
    """What `source` reads; every variable whole when that cannot be known for sure."""
    scanned = _scan(source)
    if scanned is None:
        return EVERYTHING
    spans, text = scanned
    tree = _parse(text)
    if tree is None or _literal_spans(tree) != spans:
        return EVERYTHING
    walk = _Walk()
    walk.run(tree)
    variables = {
        name: (frozenset(fields) if fields is not None else None) for name, fields in walk.fields.items()
    }
    return Reads(MappingProxyType(variables), tuple(name for _, name in sorted(walk.headers)))


def _parse(text: str) -> Any:
    from celpy.celparser import CELParser

    try:
        return CELParser().parse(text)
    except Exception:  # noqa: BLE001 - any failure only means: not analyzed
        return None


def _scan(source: str) -> tuple[list[tuple[int, int]], str] | None:
    """The spans of the string and bytes literals, found by CEL's lexical rules, and the
    source with the optional-syntax markers (`.?f`, `[?k]`, `[?x]`, `{?k: v}`) blanked.
    None when a literal does not end (the engine would refuse the expression anyway)."""
    spans: list[tuple[int, int]] = []
    text = list(source)
    previous = ""  # the last character of code, comments and blanks aside
    index, length = 0, len(source)
    while index < length:
        char = source[index]
        if source.startswith("//", index):
            newline = source.find("\n", index)
            index = length if newline < 0 else newline
            continue
        if char == "_" or (char.isascii() and char.isalpha()):
            match = _IDENT.match(source, index)
            assert match is not None
            end = match.end()
            if match.group() in _STRING_PREFIXES and end < length and source[end] in "\"'":
                raw = "r" in match.group().lower()
                literal_end = _string_end(source, end, raw)
                if literal_end is None:
                    return None
                spans.append((index, literal_end))
                index, previous = literal_end, '"'
                continue
            index, previous = end, "a"
            continue
        if char.isascii() and char.isdigit():
            match = _NUMBER.match(source, index)
            assert match is not None
            index, previous = match.end(), "0"
            continue
        if char in "\"'":
            literal_end = _string_end(source, index, raw=False)
            if literal_end is None:
                return None
            spans.append((index, literal_end))
            index, previous = literal_end, '"'
            continue
        if char == "?" and previous in (".", "[", "{", ","):
            text[index] = " "  # an optional select, index, element or entry: reads the same
        elif not char.isspace():
            previous = char
        index += 1
    return spans, "".join(text)


def _string_end(source: str, quote_at: int, raw: bool) -> int | None:
    """Where the literal whose quote is at `quote_at` ends (past its closing quote).

    A raw literal ends at the first closing quote; in any other, a backslash escapes the
    character after it. Only a triple-quoted literal may hold a line break."""
    quote = source[quote_at]
    length = len(source)
    if source.startswith(quote * 3, quote_at):
        closing, index = quote * 3, quote_at + 3
        while index < length:
            if not raw and source[index] == "\\":
                index += 2
            elif source.startswith(closing, index):
                return index + 3
            else:
                index += 1
        return None
    index = quote_at + 1
    while index < length:
        char = source[index]
        if char in "\r\n":
            return None
        if not raw and char == "\\":
            index += 2
        elif char == quote:
            return index + 1
        else:
            index += 1
    return None


def _literal_spans(tree: Any) -> list[tuple[int, int]]:
    tokens = tree.scan_values(lambda value: getattr(value, "type", None) in _LITERAL_TOKENS)
    return sorted((token.start_pos, token.end_pos) for token in tokens)


def string_value(literal: str) -> str | None:
    """The value of a string literal as written in CEL, when both engines agree on it;
    None for bytes, for escapes they read differently, and for literals over several lines."""
    raw = literal[:1] in ("r", "R")
    body = literal[1:] if raw else literal
    if body[:1] not in ('"', "'"):
        return None  # bytes
    width = 3 if len(body) >= 6 and body[:3] in ('"""', "'''") else 1
    content = body[width:-width]
    if "\n" in content or "\r" in content:
        return None
    if raw or "\\" not in content:
        return content
    return _unescape(content)


def _unescape(content: str) -> str | None:
    out: list[str] = []
    index, length = 0, len(content)
    while index < length:
        char = content[index]
        if char != "\\":
            out.append(char)
            index += 1
            continue
        if index + 1 >= length:
            return None
        kind = content[index + 1]
        if kind in _SIMPLE_ESCAPES:
            out.append(_SIMPLE_ESCAPES[kind])
            index += 2
        elif kind in _HEX_ESCAPES:
            digits = content[index + 2 : index + 2 + _HEX_ESCAPES[kind]]
            if len(digits) != _HEX_ESCAPES[kind] or not all(d in "0123456789abcdefABCDEF" for d in digits):
                return None
            code = int(digits, 16)
            if code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
                return None
            out.append(chr(code))
            index += 2 + len(digits)
        elif kind in "0123" and re.fullmatch("[0-7]{2}", content[index + 2 : index + 4]):
            out.append(chr(int(content[index + 1 : index + 4], 8)))
            index += 4
        else:
            return None
    return "".join(out)


def _core(node: Any) -> Any:
    """The node under the precedence levels and parentheses that only pass it on."""
    while node.data in _CHAIN and len(node.children) == 1 and hasattr(node.children[0], "data"):
        node = node.children[0]
    return node


def _literal(node: Any) -> str | None:
    """The value of `node` when it is a string literal (not bytes, not computed)."""
    node = _core(node)
    if node.data != "literal":
        return None
    token = node.children[0]
    if token.type not in ("STRING_LIT", "MLSTRING_LIT"):
        return None
    return string_value(str(token))


def _variable(node: Any, bound: frozenset[str]) -> str | None:
    """The policy variable that `node` is, bare: `claims`, `.claims`, `(claims)`."""
    node = _core(node)
    if node.data == "ident":
        name = str(node.children[0])
        return name if name in _VARIABLES and name not in bound else None
    if node.data == "dot_ident":  # root-qualified: never a macro's bound name
        name = str(node.children[0])
        return name if name in _VARIABLES else None
    return None


def _is_headers(node: Any, bound: frozenset[str]) -> bool:
    """Whether `node` is `request.headers` (or `request["headers"]`)."""
    node = _core(node)
    if node.data == "member_dot":
        target, name = node.children
        return str(name) == "headers" and _variable(target, bound) == "request"
    if node.data == "member_index":
        target, index = node.children
        return _variable(target, bound) == "request" and _literal(index) == "headers"
    return False


def _binder(method: str, arguments: list[Any]) -> str | None:
    """The name a macro binds (`x.exists(k, …)`: k), if this call is such a macro."""
    if len(arguments) not in _BINDING_MACROS.get(method, ()):
        return None
    first = _core(arguments[0])
    return str(first.children[0]) if first.data == "ident" else None


class _Walk:
    def __init__(self) -> None:
        self.fields: dict[str, set[str] | None] = {}
        self.headers: list[tuple[int, str]] = []  # (where in the source, name)

    def header(self, node: Any, name: str) -> None:
        self.headers.append((getattr(node.meta, "start_pos", 0), name))

    def whole(self, variable: str) -> None:
        self.fields[variable] = None

    def field(self, variable: str, name: str) -> None:
        if variable in _SCALAR_VARIABLES:
            self.whole(variable)
            return
        known = self.fields.setdefault(variable, set())
        if known is not None:
            known.add(name)

    def run(self, tree: Any) -> None:
        stack: list[tuple[Any, frozenset[str]]] = [(tree, frozenset())]
        while stack:
            node, bound = stack.pop()
            stack.extend(self._visit(node, bound))

    def _visit(self, node: Any, bound: frozenset[str]) -> Iterator[tuple[Any, frozenset[str]]]:
        """Records what `node` itself reads; yields the nodes still to visit."""
        kind = node.data
        children = node.children
        if kind in ("ident", "dot_ident"):
            variable = _variable(node, bound)
            if variable is not None:
                self.whole(variable)
            return
        if kind == "member_dot":
            target, name = children
            variable = _variable(target, bound)
            if variable is not None:
                self.field(variable, str(name))
                return
            if _is_headers(target, bound):
                self.header(node, str(name))
            yield target, bound
            return
        if kind == "member_index":
            target, index = children
            key = _literal(index)
            variable = _variable(target, bound)
            if variable is not None:
                if key is None:
                    self.whole(variable)
                else:
                    self.field(variable, key)
            else:
                if key is not None and _is_headers(target, bound):
                    self.header(node, key)
                yield target, bound
            yield index, bound
            return
        if kind == "member_dot_arg":
            target, method = children[0], str(children[1])
            arguments = list(children[2].children) if len(children) > 2 else []
            yield target, bound
            binder = _binder(method, arguments)
            if binder is None:
                yield from ((argument, bound) for argument in arguments)
            else:
                scope = bound | {binder}
                yield from ((argument, scope) for argument in arguments[1:])
            return
        if kind == "relation" and len(children) == 2 and getattr(children[0], "data", "") == "relation_in":
            key = _literal(children[0].children[0])
            if key is not None and _is_headers(children[1], bound):
                self.header(node, key)
        # Anything else reads what its parts read; tokens (function and field names) read nothing.
        yield from ((child, bound) for child in children if hasattr(child, "data"))
