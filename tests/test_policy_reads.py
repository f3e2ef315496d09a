"""What an expression reads (gateway/policy/reads.py), found on its syntax tree.

That analysis decides which fields an activation holds and what the verdict memo keys on:
a field it misses is an error at best and, with the memo, a stale verdict at worst.

1. The property: for policies generated from a small CEL grammar (every variable, selects,
   literal and computed indexes, `in`, `has()`, macros, `size()`, string methods, ternaries,
   comments, and string literals of every form holding code-like text), the loaded set's
   trimmed activation and verdict memo judge exactly as the full activation without memo.
2. The blind spots of the regex analysis it replaced, as fixed cases, on both engines.
3. What the tree walk reports for each form, header names, literal values, and the fallback
   (every variable whole) where cel-python's parser cannot be trusted to read as the engine.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import cache, partial
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.policy.activation import Activations
from gateway.policy.engines import VARIABLES, Engine, EvaluationError, make_engine
from gateway.policy.evaluate import PolicyFailure, applies, judge
from gateway.policy.loader import PolicyLoadError, load_policy_set
from gateway.policy.model import Policy, PolicySet
from gateway.policy.reads import analyze, string_value

ENGINES = ("cel", "celpy")
MAPS = ("request", "mcp", "claims", "auth", "session", "context", "source")
FIELDS = ("a", "name", "body")
HEADERS = ("x", "a")
NOW = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)

# ---------------------------------------------------------------------------------------------
# Evaluating a loaded set both ways


def _outcome(evaluate: Callable[[], Any]) -> tuple[str, Any]:
    try:
        value = evaluate()
    except EvaluationError as exc:
        return ("error", str(exc))
    except PolicyFailure as failure:
        return ("failure", failure.denial)
    return ("value", (type(value), value))


def _expressions(policy: Policy) -> Iterable[Any]:
    if policy.when is not None:
        yield policy.when
    for rule in policy.rules:
        if rule.when is not None:
            yield rule.when
        yield rule.allow
        yield from (expr for _, expr in rule.deny.headers)


def assert_judged_alike(policy_set: PolicySet, environments: list[dict[str, Any]]) -> None:
    """Each environment judged twice (the second time from the memo, when it remembers),
    trimmed and remembered, against full and fresh: the same values, errors and verdicts."""
    engine = policy_set.engine
    activations = Activations(policy_set)
    for variables in environments + environments:
        full = engine.activation(variables)
        trimmed = activations.activation(variables)
        for policy in policy_set.policies:
            for expr in _expressions(policy):
                fresh_outcome = _outcome(partial(expr.evaluate, full))
                assert _outcome(partial(expr.evaluate, trimmed)) == fresh_outcome, (expr.source, variables)
            assert _outcome(partial(applies, policy, trimmed)) == _outcome(partial(applies, policy, full))
            fresh = judge(policy, partial(_same, full), variables)
            remembered = judge(policy, partial(_same, trimmed), variables, memo=policy_set.memo)
            assert remembered == fresh, (policy.rules, variables, dict(policy_set.reads))


def _same(value: Any) -> Any:
    return value


def _block(expression: str, indent: int) -> list[str]:
    return [" " * indent + line for line in expression.split("\n")]


def policy_text(when: str | None, rules: list[tuple[str | None, str]], header: str | None) -> str:
    lines = ["name: p"]
    if when is not None:
        lines += ["when: |-", *_block(when, 2)]
    lines.append("rules:")
    for index, (rule_when, allow) in enumerate(rules):
        lines.append(f"  - name: r{index}")
        if rule_when is not None:
            lines += ["    when: |-", *_block(rule_when, 6)]
        lines += ["    allow: |-", *_block(allow, 6)]
        lines += ["    deny:", "      status: 403", f"      reason: r{index}"]
        if header is not None:
            lines += ["      headers:", "        x-why: |-", *_block(header, 10)]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# A small CEL grammar

# Pieces of string literals: code-like text, comment markers, quotes and escapes.
_CODE_TEXT = ("mcp", "mcp.name", "claims.a", ".request.body", "//", "has(auth.a)", " ", "a")
_DOUBLE = (*_CODE_TEXT, "'", '\\"', "\\\\", "\\n", "\\x61", "\\u00e9", "\\141")
_SINGLE = (*_CODE_TEXT, '"', "\\'", "\\\\", "\\t")
_RAW_DOUBLE = (*_CODE_TEXT, "\\", "\\d", "'", "\\'")
_RAW_SINGLE = (*_CODE_TEXT, "\\", "\\d", '"', '\\"')
_TRIPLE_DOUBLE = (*_CODE_TEXT, '"a', '\\"', "'", "\\\\", "'''")
_TRIPLE_SINGLE = (*_CODE_TEXT, "'a", "\\'", '"', '"""')
_RAW_TRIPLE = (*_CODE_TEXT, "\\d", '"a', "'", "\\")


_BOOLEANS = st.booleans()
_T = TypeVar("_T")


@cache
def _below(count: int) -> st.SearchStrategy[int]:
    return st.integers(0, count - 1)


def pick(draw: st.DrawFn, options: Sequence[_T]) -> _T:
    """One of `options` (strategies built once: building one per draw is most of the cost)."""
    return options[draw(_below(len(options)))]


def _content(pieces: tuple[str, ...]) -> st.SearchStrategy[str]:
    return st.lists(st.sampled_from(pieces), max_size=4).map("".join)


def _raw(content: str) -> str:
    # The native engine refuses a raw literal that ends in a backslash.
    return content + "a" if content.endswith("\\") else content


string_literals = st.one_of(
    _content(_DOUBLE).map(lambda c: f'"{c}"'),
    _content(_SINGLE).map(lambda c: f"'{c}'"),
    _content(_RAW_DOUBLE).map(lambda c: f'r"{_raw(c)}"'),
    _content(_RAW_SINGLE).map(lambda c: f"R'{_raw(c)}'"),
    _content(_TRIPLE_DOUBLE).map(lambda c: f'"""{c}"""'),
    _content(_TRIPLE_SINGLE).map(lambda c: f"'''{c}'''"),
    # Ending in an escaped quote: the regex analysis ended these one quote early.
    _content(_TRIPLE_DOUBLE).map(lambda c: f'"""{c}\\""""'),
    _content(_TRIPLE_SINGLE).map(lambda c: f"'''{c}\\''''"),
    _content(_RAW_TRIPLE).map(lambda c: f'r"""{_raw(c)}"""'),
)
comments = _content((*_CODE_TEXT, '"', "'", "'''", '"""', "\\")).map(lambda c: f" // {c}\n")


def _key_literal(field: str, form: int) -> str:
    """A string literal whose value is `field`, in one of several spellings."""
    return (
        f'"{field}"',
        f"'{field}'",
        f'r"{field}"',
        f'"""{field}"""',
        f'"\\x{ord(field[0]):02x}{field[1:]}"',
        f"'\\{ord(field[0]):03o}{field[1:]}'",
    )[form]


class Grammar:
    """Expressions of the grammar; `native` adds what only the cel engine has (`.?`, ext_strings).
    Without `headers`, no request.headers: a map value, which the memo never keys on."""

    def __init__(self, native: bool, headers: bool) -> None:
        self.native = native
        self.headers = headers

    def _headers(self, variables: tuple[str, ...]) -> bool:
        return self.headers and "request" in variables

    def field_read(self, draw: st.DrawFn, variables: tuple[str, ...]) -> str:
        variable = pick(draw, variables)
        field = pick(draw, FIELDS)
        forms = [
            f"{variable}.{field}",
            f".{variable}.{field}",
            f"({variable}).{field}",
            f"{variable}[{_key_literal(field, draw(_below(6)))}]",
            f"{variable} . {field}",
        ]
        if self.native:
            forms += [f'{variable}.?{field}.orValue("")', f'{variable}[?"{field}"].orValue("")']
        return pick(draw, forms)

    def header_read(self, draw: st.DrawFn) -> str:
        name = pick(draw, HEADERS)
        return pick(
            draw, [f"request.headers.{name}", f'request.headers["{name}"]', f'request["headers"].{name}']
        )

    def map_value(self, draw: st.DrawFn, variables: tuple[str, ...]) -> str:
        variable = pick(draw, variables)
        headers = ["request.headers"] if self._headers(variables) else []
        return pick(draw, [variable, f".{variable}", f"({variable})", *headers])

    def string(self, draw: st.DrawFn, depth: int, variables: tuple[str, ...] = MAPS) -> str:
        options = ["literal", "field", "field"] + (["header"] if self._headers(variables) else [])
        if depth > 0:
            options += ["concat", "ternary", "computed", "computed_constant"]
            options += ["computed_header"] if self._headers(variables) else []
            if self.native:
                options.append("method")
        choice = pick(draw, options)
        if choice == "literal":
            return draw(string_literals)
        if choice == "field":
            return self.field_read(draw, variables)
        if choice == "header":
            return self.header_read(draw)
        if choice == "concat":
            return f"{self.string(draw, depth - 1, variables)} + {self.string(draw, depth - 1, variables)}"
        if choice == "ternary":
            condition = self.boolean(draw, depth - 1, variables)
            then, otherwise = self.string(draw, depth - 1, variables), self.string(draw, 0, variables)
            return f"({condition} ? {then} : {otherwise})"
        if choice == "computed":
            variable = pick(draw, variables)
            return f"{variable}[{self.string(draw, depth - 1, variables)}]"
        if choice == "computed_header":
            return f"request.headers[{self.string(draw, depth - 1, variables)}]"
        if choice == "computed_constant":
            variable, field = pick(draw, variables), pick(draw, FIELDS)
            return f'{variable}["{field[:1]}" + "{field[1:]}"]'
        method = pick(draw, ["lowerAscii()", "upperAscii()", "trim()"])
        return f"({self.string(draw, depth - 1, variables)}).{method}"

    def boolean(self, draw: st.DrawFn, depth: int, variables: tuple[str, ...] = MAPS) -> str:
        options = ["compare", "has", "in_literal_list"]
        if depth > 0:
            options += [
                "and",
                "or",
                "not",
                "ternary",
                "string_test",
                "in_map",
                "macro",
                "size",
                "binder",
                "comment",
            ]
        choice = pick(draw, options)
        inner = depth - 1

        def text() -> str:
            return self.string(draw, max(inner, 0), variables)

        if choice == "compare":
            operator = pick(draw, ["==", "!=", "<", ">="])
            return f"{text()} {operator} {text()}"
        if choice == "has":
            variable, field = pick(draw, variables), pick(draw, FIELDS)
            header = pick(draw, HEADERS)
            headers = [f"has(request.headers.{header})"] if self._headers(variables) else []
            return pick(draw, [f"has({variable}.{field})", f"has(.{variable}.{field})", *headers])
        if choice == "in_literal_list":
            return f"{text()} in [{text()}, {draw(string_literals)}]"
        if choice in ("and", "or"):
            operator = "&&" if choice == "and" else "||"
            return f"{self.boolean(draw, inner, variables)} {operator} {self.boolean(draw, inner, variables)}"
        if choice == "not":
            return f"!({self.boolean(draw, inner, variables)})"
        if choice == "ternary":
            parts = [self.boolean(draw, inner, variables) for _ in range(3)]
            return f"({parts[0]} ? {parts[1]} : {parts[2]})"
        if choice == "string_test":
            method = pick(draw, ["startsWith", "endsWith", "contains"])
            return f"({text()}).{method}({text()})"
        if choice == "in_map":
            return f"{text()} in {self.map_value(draw, variables)}"
        if choice == "macro":
            macro = pick(draw, ["exists", "all", "exists_one"])
            return f"{self.map_value(draw, variables)}.{macro}(k, k == {text()} || k.startsWith({text()}))"
        if choice == "size":
            sized = pick(draw, [text(), self.map_value(draw, variables)])
            return f"size({sized}) > {draw(_below(3))}"
        if choice == "binder":
            # A macro's name may be a variable's: inside, it is the element, except `.name`.
            name = pick(draw, ["k", "mcp", "claims", "request"])
            others = tuple(v for v in variables if v != name) or ("auth",)
            elements = f"[{self.string(draw, 0, others)}, {draw(string_literals)}]"
            bodies = [
                f"{name} == {self.string(draw, 0, others)}",
                f"{name}.startsWith({draw(string_literals)})",
            ]
            if name in MAPS:
                bodies.append(f"has(.{name}.a) || {name} == 'a'")
            body = pick(draw, bodies)
            return f"{elements}.{pick(draw, ['exists', 'all'])}({name}, {body})"
        # comment
        return (
            f"{self.boolean(draw, inner, variables)}{draw(comments)}&& {self.boolean(draw, inner, variables)}"
        )


_TEXTS = ("", "a", "mcp", "A")
_DYN = (*_TEXTS, 1, True)


def _value(draw: st.DrawFn, native: bool, variable: str) -> Any:
    dyn = native and variable in ("claims", "auth", "session")  # map(string, dyn)
    return pick(draw, _DYN if dyn else _TEXTS)


def _map(draw: st.DrawFn, native: bool, variable: str, keys: tuple[str, ...] = FIELDS) -> dict[str, Any]:
    # Mostly every field present (a field left out of the trimmed activation then shows),
    # some absent for has() and missing-key errors.
    return {key: _value(draw, native, variable) for key in keys if draw(_below(5))}


@st.composite
def environment_variations(draw: st.DrawFn, native: bool) -> list[dict[str, Any]]:
    """A base environment and variations of it that each change one field: a memo keyed on
    too few fields, or an activation missing one, then judges some variation as another."""
    base: dict[str, Any] = {name: _map(draw, native, name) for name in MAPS}
    base["request"]["headers"] = _map(draw, native, "request", HEADERS)
    base["now"] = NOW
    variations = [base]
    for _ in range(1 + draw(_below(4))):
        variable = pick(draw, MAPS)
        changed = {name: dict(value) if isinstance(value, dict) else value for name, value in base.items()}
        target = changed[variable]
        if variable == "request" and draw(_BOOLEANS):
            target = target["headers"] = dict(target["headers"])
            field = pick(draw, HEADERS)
        else:
            field = pick(draw, FIELDS)
        if draw(_below(4)) == 0:
            target.pop(field, None)
        else:
            target[field] = _value(draw, native, variable)
        variations.append(changed)
    return variations


@st.composite
def generated_policies(draw: st.DrawFn, native: bool) -> str:
    grammar = Grammar(native, headers=draw(_BOOLEANS))
    when = grammar.boolean(draw, 1) if draw(_BOOLEANS) else None
    rules = [
        (
            grammar.boolean(draw, 1) if draw(_BOOLEANS) else None,
            grammar.boolean(draw, 1 + draw(_below(3))),
        )
        for _ in range(1 + draw(_below(3)))
    ]
    header = grammar.string(draw, 1) if draw(_BOOLEANS) else None
    return policy_text(when, rules, header)


_ENGINES: dict[str, Engine] = {}


def _engine(name: str) -> Engine:
    if name not in _ENGINES:
        _ENGINES[name] = make_engine(name)
    return _ENGINES[name]


def _load(text: str, engine: str) -> PolicySet:
    return load_policy_set([("p.yaml", text)], _engine(engine))


_SLOW_IS_FINE = [HealthCheck.too_slow, HealthCheck.data_too_large]
# cel-python raises the recursion limit on its first compile: not inside a hypothesis test.
_engine("celpy").compile("true", "bool")


@settings(max_examples=500, deadline=None, suppress_health_check=_SLOW_IS_FINE)
@given(text=generated_policies(native=True), environments=environment_variations(True))
def test_trimmed_and_remembered_judge_as_full_and_fresh_cel(
    text: str, environments: list[dict[str, Any]]
) -> None:
    assert_judged_alike(_load(text, "cel"), environments)


@settings(max_examples=40, deadline=None, suppress_health_check=_SLOW_IS_FINE)
@given(text=generated_policies(native=False), environments=environment_variations(False))
def test_trimmed_and_remembered_judge_as_full_and_fresh_celpy(
    text: str, environments: list[dict[str, Any]]
) -> None:
    assert_judged_alike(_load(text, "celpy"), environments)


# ---------------------------------------------------------------------------------------------
# The regex analysis's blind spots, as fixed cases: those fixed before (root-qualified names,
# comments), those it still had (triple-quoted literals), and the forms it read coarsely

RULE = """
name: p
rules:
  - name: r
    allow: |-
      {allow}
    deny: {{ status: 403, reason: nope }}
"""


def _env(**overrides: Mapping[str, Any]) -> dict[str, Any]:
    variables: dict[str, Any] = {
        "request": {"method": "GET", "body": "{}", "headers": {"x": "1", "mcp-session-id": "s"}},
        "mcp": {"method": "tools/call", "name": "echo", "protocol_version": ""},
        "claims": {"iss": "a", "sub": "alice"},
        "auth": {"authenticated": True},
        "session": {"id": "", "exists": False, "anonymous": False},
        "context": {"route": "mcp"},
        "source": {"address": "127.0.0.1", "principal": ""},
        "now": NOW,
    }
    for name, value in overrides.items():
        variables[name] = dict(value)
    return variables


# The regex analysis ended the triple-quoted literal one quote early, then took
# `" || !has(claims.blocked) || claims.sub == "` for a literal: it read `claims.iss` only.
BYPASS = 'claims.iss == "a" && ("""x\\"""" == "x" || !has(claims.blocked) || claims.sub == "")'

# (allow expression, what it reads (None: whole), whether it reads the body)
BLIND_SPOTS = [
    # Root-qualified names are the same variables.
    ('.mcp.name == "echo"', {"mcp": {"name"}}, True),
    ("!has(.claims.blocked)", {"claims": {"blocked"}}, False),
    # A comment hides nothing, and nothing in it is read.
    ('claims.iss == "a" // mcp.name, request.body', {"claims": {"iss"}}, False),
    ("claims.iss == 'a' // '''\n && !has(claims.blocked) // '''", {"claims": {"iss", "blocked"}}, False),
    # A triple-quoted literal ending in an escaped quote: the regex ended it one quote early,
    # then took the code after it for a literal (test_the_triple_quote_blind_spot_was_a_bypass).
    (BYPASS, {"claims": {"iss", "blocked", "sub"}}, False),
    (
        "'''a\\'''' + claims.sub == '' || !has(claims.blocked) || claims.iss == ''",
        {"claims": {"sub", "blocked", "iss"}},
        False,
    ),
    ('"""a\\"""" == mcp.name || "x" == "y"', {"mcp": {"name"}}, True),
    # Raw literals: a backslash escapes nothing, and text inside is not code.
    ('r"\\d+ mcp.name" != claims.sub && r"\\\\" != claims.iss', {"claims": {"sub", "iss"}}, False),
    (r"""R'\" + mcp.name + \"' != claims.sub""", {"claims": {"sub"}}, False),
    ('r"""\\"a // claims.blocked""" != claims.sub', {"claims": {"sub"}}, False),
    # Variable names inside literals are not reads.
    ("'request.method == \"claims.sub mcp\"' != request.method", {"request": {"method"}}, False),
    # Indexes: a literal key is one field, a computed one the whole map.
    ('request["body"] == "{}"', {"request": {"body"}}, True),
    ('request.headers["x"] == "1"', {"request": {"headers"}}, False),
    ('request.headers[claims.sub] == "1" || true', {"request": {"headers"}, "claims": {"sub"}}, False),
    ("claims[request.method] == 1 || true", {"claims": None, "request": {"method"}}, False),
    ('claims["s\\x75b"] == "alice"', {"claims": {"sub"}}, False),
    # Whole maps: macros, functions, `in`, a method on the map itself.
    ('claims.exists(k, k == "admin") || true', {"claims": None}, False),
    ("size(claims) > 0", {"claims": None}, False),
    ('"iss" in claims', {"claims": None}, False),
    ("request.exists(k, k == 'x') || true", {"request": None}, True),
    # A field's value passed on reads that field only.
    (
        'claims.sub.startsWith("a") && size(request.headers) > 0',
        {"claims": {"sub"}, "request": {"headers"}},
        False,
    ),
    ("(claims).sub == 'alice'", {"claims": {"sub"}}, False),
    # A macro's name shadows the variable of that name; `.name` still is the variable.
    ('["a"].exists(mcp, mcp == "a")', {}, False),
    ('["a"].exists(claims, .claims.sub == "alice" && claims == "a")', {"claims": {"sub"}}, False),
]


@pytest.mark.parametrize(("allow", "expected", "body"), BLIND_SPOTS)
def test_what_each_form_reads(allow: str, expected: dict[str, set[str] | None], body: bool) -> None:
    reads = analyze(allow)
    assert reads.analyzed
    assert dict(reads.variables) == {k: frozenset(v) if v is not None else None for k, v in expected.items()}
    assert reads.uses_body is body


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(("allow", "expected", "body"), BLIND_SPOTS)
def test_blind_spots_judge_alike(engine: str, allow: str, expected: object, body: bool) -> None:
    text = RULE.format(allow=allow.replace("\n", "\n      "))
    policy_set = _load(text, engine)
    assert policy_set.policies[0].uses_body is body
    environments = [
        _env(),
        _env(claims={"iss": "a", "sub": "alice", "blocked": True}),
        _env(claims={"iss": "b", "sub": ""}),
        _env(claims={"iss": "a", "sub": "alice", "blocked": False}),
    ]
    assert_judged_alike(policy_set, environments)


@pytest.mark.parametrize("engine", ENGINES)
def test_the_triple_quote_blind_spot_was_a_bypass(engine: str) -> None:
    # With the regex's reads, `blocked` and `sub` were trimmed away and a blocked caller
    # passed; read on the tree, the same caller is denied.
    policy_set = _load(RULE.format(allow=BYPASS), engine)
    assert policy_set.reads == {"claims": frozenset({"iss", "blocked", "sub"})}
    allow = policy_set.policies[0].rules[0].allow
    assert allow.evaluate(policy_set.engine.activation({"claims": {"iss": "a"}})) is True  # the regex's
    blocked = _env(claims={"iss": "a", "sub": "alice", "blocked": True})
    verdict = judge(policy_set.policies[0], partial(Activations(policy_set).activation, blocked), blocked)
    assert verdict.enforced is not None and verdict.enforced.reason == "nope"


# ---------------------------------------------------------------------------------------------
# When cel-python's parser cannot be trusted: every variable whole

# `response` is known only to `minted`; the set never reads it on the request side.
EVERY_VARIABLE_WHOLE = dict.fromkeys(v for v in VARIABLES if v != "response")


@pytest.mark.parametrize(
    "source",
    [
        # The cel engine accepts a backquoted field; cel-python does not parse it.
        "request.`method` == 'GET'",
        # Both engines refuse these; by CEL's rules `mcp.name` is code, so never read less.
        'r"\\" + mcp.name + "x"',
        # cel-python reads one literal where CEL's rules read code: its tree is not used.
        'r"""\\""" + mcp.name + " """',
        # Not CEL at all.
        '"unterminated',
        "claims.sub ==",
    ],
)
def test_an_expression_celpy_cannot_read_as_cel_reads_everything(source: str) -> None:
    reads = analyze(source)
    assert not reads.analyzed
    assert dict(reads.variables) == dict.fromkeys(VARIABLES)
    assert reads.uses_body


def test_a_policy_only_the_native_engine_parses_reads_everything_and_is_not_remembered() -> None:
    policy_set = _load(RULE.format(allow="request.`method` == 'GET'"), "cel")
    assert dict(policy_set.reads) == EVERY_VARIABLE_WHOLE
    assert policy_set.memo is not None and policy_set.memo.key("p", _env()) is None
    assert policy_set.uses_body
    assert_judged_alike(policy_set, [_env(), _env(request={"method": "POST"})])


def test_the_optional_syntax_reads_what_the_plain_form_reads() -> None:
    reads = analyze(
        'request.?method.orValue("") == "GET" && claims[?"sub"].hasValue() && [?mcp.?name].size() > 0'
    )
    assert reads.analyzed
    assert dict(reads.variables) == {
        "request": frozenset({"method"}),
        "claims": frozenset({"sub"}),
        "mcp": frozenset({"name"}),
    }


def test_now_is_always_read_whole() -> None:
    assert dict(analyze("now.getHours() >= 0").variables) == {"now": None}
    assert dict(analyze('now > timestamp("2020-01-01T00:00:00Z")').variables) == {"now": None}


# ---------------------------------------------------------------------------------------------
# Header names looked up by a literal (they must be lower case)


@pytest.mark.parametrize(
    ("source", "names"),
    [
        (
            '"mcp-session-id" in request.headers ? request.headers["mcp-session-id"] : ""',
            ["mcp-session-id"] * 2,
        ),
        ("request.headers.Accept == 'x'", ["Accept"]),
        ("has(request.headers.Accept)", ["Accept"]),
        ('request["headers"]["X-Up"] == "1"', ["X-Up"]),
        ("'A' in request.headers && request.headers.B == '' || has(request.headers.C)", ["A", "B", "C"]),
        ("'X-Up' in .request.headers", ["X-Up"]),
        ("request.headers[claims.sub] == '1'", []),
        # Only lookups: a literal that spells one is not.
        ("'request.headers[\"X-Up\"]' == request.method", []),
        ("claims.headers['X-Up'] == '1'", []),
    ],
)
def test_header_names_looked_up_by_literal(source: str, names: list[str]) -> None:
    assert list(analyze(source).header_names) == names  # in the order written


def test_an_upper_case_header_lookup_is_a_load_error_in_any_form() -> None:
    for allow in (
        "has(request.headers.Accept)",
        "request.headers.Accept == 'x'",
        "'X-Up' in request.headers",
    ):
        with pytest.raises(PolicyLoadError, match="lower-case"):
            _load(RULE.format(allow=allow), "cel")
    # A literal that only looks like a lookup is no error.
    _load(RULE.format(allow="'request.headers[\"X-Up\"]' != request.method"), "cel")


# ---------------------------------------------------------------------------------------------
# Literal values: a key is known only where both engines read the literal alike


@pytest.mark.parametrize(
    "literal",
    [
        '"sub"',
        "'sub'",
        'r"s\\ub"',
        'R"\\\\"',
        '"""s"u"b"""',
        "'''s'u'b'''",
        'r"""\\d"""',
        '"\\x73\\u0075\\U00000062"',
        '"\\163ub"',
        '"\\\\\\"\\\'\\n\\t"',
        "'\\a\\b\\f\\v\\r'",
    ],
)
@pytest.mark.parametrize("engine", ENGINES)
def test_literal_values_are_those_of_both_engines(literal: str, engine: str) -> None:
    value = string_value(literal)
    assert value is not None
    compiled = _engine(engine).compile(literal, "any")
    assert compiled.evaluate(_engine(engine).activation({})) == value


@pytest.mark.parametrize("literal", ['"\\?"', '"\\`"', '"\\X41"', 'b"sub"', '"""a\nb"""', '"\\ud800"'])
def test_literals_the_engines_read_differently_are_no_key(literal: str) -> None:
    assert string_value(literal) is None
    assert analyze(f"claims[{literal}] == 'x'").variables["claims"] is None
