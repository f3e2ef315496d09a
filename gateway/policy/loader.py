"""Policy files (YAML) to a compiled PolicySet, or a precise list of problems.

Every problem is reported as `file:line:col: message`, CEL errors located inside the
file. A set with any problem is rejected whole, so a half-right directory never serves.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from yaml.nodes import MappingNode, Node, ScalarNode

from gateway.policy.engines import (
    RESPONSE_ONLY,
    CompiledExpression,
    CompileError,
    Engine,
    Expect,
    make_engine,
)
from gateway.policy.handles import kind_expressions, read_handle_kinds
from gateway.policy.memo import FusedMemo
from gateway.policy.model import (
    ALL_ALLOW,
    ALL_ALLOW_TERMINATE,
    DenySpec,
    Location,
    Policy,
    PolicySet,
    Rule,
    SessionSpec,
)
from gateway.policy.reads import analyze, header_lookup
from gateway.yaml_reader import NodeReader, Position, YamlError, compose_all, offset_in

POLICY_SUFFIXES = (".yaml", ".yml")
TEST_SUFFIXES = ("_test.yaml", "_test.yml")
_REASON = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*\Z")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*\Z")
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+\Z")


POLICY_KEYS = {"name", "description", "mode", "when", "session", "rules", "handles"}
SESSION_KEYS = {"key", "bind", "terminate"}
SESSION_RESERVED_NAMES = frozenset({"id", "exists", "anonymous", "created_at"})
RULE_KEYS = {"name", "when", "allow", "deny"}
DENY_KEYS = {"status", "reason", "claim", "headers"}


@dataclass(frozen=True, slots=True)
class Problem:
    location: Location
    message: str

    def __str__(self) -> str:
        return f"{self.location}: {self.message}"


class PolicyLoadError(Exception):
    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


def policy_files(directory: Path) -> list[Path]:
    """The policy files of a directory, in name order; test files are not policies."""
    return sorted(
        p
        for p in directory.iterdir()
        if p.is_file() and p.name.endswith(POLICY_SUFFIXES) and not p.name.endswith(TEST_SUFFIXES)
        and not p.name.startswith(".")
    )


class _FileLoader(NodeReader):
    """One policy file's documents to policies; problems go to the set's list."""

    def __init__(self, path: str, text: str, engine: Engine, problems: list[Problem]) -> None:
        super().__init__(path, text)
        self.engine = engine
        self.problems = problems

    def report(self, position: Position, message: str) -> None:
        self.problems.append(Problem(Location(*position), message))

    def at(self, node: Node) -> Location:
        return Location(*self.where(node))

    def bind_map(
        self, node: Node, what: str, reserved: Collection[str]
    ) -> tuple[list[tuple[str, CompiledExpression]], bool] | None:
        """A `bind:` map of names to CEL expressions, and whether every entry compiled; None
        when it is not a map. Each problem is reported at its own line."""
        if not isinstance(node, MappingNode):
            self.problem(node, f"{what} must map names to CEL expressions")
            return None
        bind: list[tuple[str, CompiledExpression]] = []
        ok = True
        for key_node, value_node in node.value:
            name = self.scalar(key_node, "a bind name")
            if name is None or name in reserved:
                self.problem(key_node, f"{what} cannot use the reserved name {name!r}")
                ok = False
                continue
            compiled = self.expression(value_node, "any", f"{what}.{name}")
            if compiled is None:
                ok = False
            else:
                bind.append((name, compiled))
        return bind, ok

    def expression(
        self, node: Node, expect: Expect, what: str, *, response: bool = False
    ) -> CompiledExpression | None:
        if not isinstance(node, ScalarNode):
            self.problem(node, f"{what} must be a CEL expression (a string)")
            return None
        source = str(node.value)
        if node.tag == "tag:yaml.org,2002:bool":
            source = source.lower()  # a bare YAML `true` is the CEL literal true
        if not source.strip():
            self.problem(node, f"{what} is empty")
            return None
        try:
            compiled = self.engine.compile(source, expect, response=response)
        except CompileError as exc:
            where = self.where_in(node, offset_in(source, exc.line, exc.column))
            self.report(where, f"{what}: {exc.message}")
            return None
        reads = analyze(source)
        if not response and reads.analyzed and RESPONSE_ONLY & reads.variables.keys():
            # The cel engine refuses it at compile time; celpy would only fail at run time.
            found = re.search(r"\bresponse\b", source)
            where = self.where_in(node, found.start() if found else 0)
            self.report(where, f"{what}: `response` is known only to handles.<kind>.minted")
            return None
        for name in reads.header_names:
            if name != name.lower():
                # Header names arrive lower-case: this lookup could never match, and a session
                # key built on it would silently bind nothing.
                where = self.where_in(node, _header_offset(source, name))
                self.report(where, f"{what}: header names are lower-case in request.headers: {name!r}")
                return None
        return compiled

    def deny(self, node: Node) -> DenySpec | None:
        fields = self.mapping(node, DENY_KEYS, "deny")
        if fields is None:
            return None
        status = 403
        if "status" in fields:
            parsed = self.integer(fields["status"][1], "deny.status")
            if parsed is not None and not 400 <= parsed <= 599:
                self.problem(fields["status"][1], f"deny.status {parsed} is outside 400-599")
                parsed = None
            if parsed is None:
                return None
            status = parsed
        if "reason" not in fields:
            self.problem(node, "deny.reason is required")
            return None
        reason = self.scalar(fields["reason"][1], "deny.reason")
        if reason is None:
            return None
        if not _REASON.match(reason):
            self.problem(fields["reason"][1], f"deny.reason {reason!r} is not lower_snake_case")
            return None
        claim = self.scalar(fields["claim"][1], "deny.claim") if "claim" in fields else None
        headers: list[tuple[str, CompiledExpression]] = []
        if "headers" in fields:
            header_node = fields["headers"][1]
            if not isinstance(header_node, MappingNode):
                self.problem(header_node, "deny.headers must map header names to CEL string expressions")
                return None
            for key_node, value_node in header_node.value:
                name = self.scalar(key_node, "a header name")
                if name is None or not _HEADER_NAME.match(name):
                    self.problem(key_node, f"invalid header name {name!r}")
                    continue
                compiled = self.expression(value_node, "string", f"deny.headers[{name}]")
                if compiled is not None:
                    headers.append((name, compiled))
        return DenySpec(status, reason, claim, tuple(headers))

    def rule(self, node: Node, index: int) -> Rule | None:
        fields = self.mapping(node, RULE_KEYS, "a rule")
        if fields is None:
            return None
        missing = [k for k in ("name", "allow", "deny") if k not in fields]
        if missing:
            self.problem(node, f"rule {index + 1} is missing {', '.join(missing)}")
            return None
        name = self.scalar(fields["name"][1], "rule name")
        if name is not None and not _NAME.match(name):
            self.problem(fields["name"][1], f"rule name {name!r} must be letters, digits, '-', '_' or '.'")
            name = None
        when = self.expression(fields["when"][1], "bool", "when") if "when" in fields else None
        allow = self.expression(fields["allow"][1], "bool", "allow")
        deny = self.deny(fields["deny"][1])
        if name is None or allow is None or deny is None or ("when" in fields and when is None):
            return None
        return Rule(name, when, allow, deny, self.at(node))

    def session(self, node: Node) -> SessionSpec | None:
        fields = self.mapping(node, SESSION_KEYS, "session")
        if fields is None:
            return None
        if "key" not in fields:
            self.problem(node, "session.key is required")
            return None
        key = self.expression(fields["key"][1], "string", "session.key")
        bind: list[tuple[str, CompiledExpression]] = []
        ok = key is not None
        if "bind" in fields:
            read = self.bind_map(fields["bind"][1], "session.bind", SESSION_RESERVED_NAMES)
            if read is None:
                return None
            bind, bind_ok = read
            ok = ok and bind_ok
        terminate = None
        if "terminate" in fields:
            terminate = self.expression(fields["terminate"][1], "bool", "session.terminate")
            ok = ok and terminate is not None
        if not ok or key is None:
            return None
        return SessionSpec(key, tuple(bind), terminate, header_lookup(key.source))

    def policy(self, node: Node) -> Policy | None:
        fields = self.mapping(node, POLICY_KEYS, "a policy")
        if fields is None:
            return None
        if "name" not in fields:
            self.problem(node, "a policy needs a name")
            return None
        name = self.scalar(fields["name"][1], "name")
        if name is not None and not _NAME.match(name):
            self.problem(fields["name"][1], f"policy name {name!r} must be letters, digits, '-', '_' or '.'")
            name = None
        description = self.scalar(fields["description"][1], "description") if "description" in fields else ""
        mode = "enforce"
        if "mode" in fields:
            mode = self.scalar(fields["mode"][1], "mode") or "enforce"
            if mode not in ("enforce", "audit"):
                self.problem(fields["mode"][1], f"mode must be enforce or audit, not {mode!r}")
        when = self.expression(fields["when"][1], "bool", "when") if "when" in fields else None
        if when is not None and when.source.strip() == "true":
            when = None  # always applies: skip the evaluation per request
        session = self.session(fields["session"][1]) if "session" in fields else None
        handles = read_handle_kinds(self, fields["handles"][1]) if "handles" in fields else ()
        rules: list[Rule] = []
        rules_ok = True
        if "rules" in fields:
            rule_nodes = self.sequence(fields["rules"][1], "rules")
            rules_ok = rule_nodes is not None
            seen: set[str] = set()
            for index, rule_node in enumerate(rule_nodes or ()):
                rule = self.rule(rule_node, index)
                if rule is None:
                    rules_ok = False
                    continue
                if rule.name in seen:
                    self.problem(rule_node, f"duplicate rule name {rule.name!r} in policy {name!r}")
                    rules_ok = False
                seen.add(rule.name)
                rules.append(rule)
        broken = (
            name is None
            or not rules_ok
            or ("when" in fields and when is None and not _is_true(fields["when"][1]))
            or ("session" in fields and session is None)
            or handles is None
        )
        if broken or name is None or handles is None:
            return None
        return Policy(
            name=name,
            description=description or "",
            mode=mode,
            when=when,
            session=session,
            rules=tuple(rules),
            location=self.at(node),
            uses_body=any(
                analyze(e.source).uses_body
                for e in (*_expressions(when, session, rules), *kind_expressions(handles))
            ),
            fused=self._fuse(rules, session),
            handles=handles,
        )

    def _fuse(self, rules: list[Rule], session: SessionSpec | None) -> CompiledExpression | None:
        """One expression for all rules: `(when ? allow : true) ? <next rule> : <index>`.

        A conditional propagates an error in its condition, so the fused form fails exactly
        when rule-by-rule evaluation would; the caller then replays rule by rule.
        """
        if session is not None and session.terminate is not None:
            tail = f"(({session.terminate.source}) ? {ALL_ALLOW_TERMINATE} : {ALL_ALLOW})"
        else:
            tail = str(ALL_ALLOW)
        for index in range(len(rules) - 1, -1, -1):
            rule = rules[index]
            passes = f"({rule.allow.source})"
            if rule.when is not None:
                passes = f"(({rule.when.source}) ? {passes} : true)"
            tail = f"({passes} ? {tail} : {index})"
        try:
            return self.engine.compile(tail, "any")
        except CompileError:
            return None  # rule-by-rule still works; only the shortcut is lost


# `request.headers`, `.request.headers`, `request["headers"]`
_HEADERS = r"""\.?request\s*(?:\.\s*headers|\[\s*[rR]?["']headers["']\s*\])"""


def _header_offset(source: str, name: str) -> int:
    """Where `source` looks up the header `name` (gateway.policy.reads finds the lookups but
    keeps no position): the first lookup; else where the name is first quoted; else 0."""
    escaped = re.escape(name)
    lookups = (
        # request.headers["Name"], request["headers"]['Name'], request.headers.Name
        _HEADERS + r"""\s*(?:\.\s*|\[\s*[rR]?["']{1,3})(""" + escaped + r")(?![\w-])",
        # "Name" in request.headers
        r"""["'](""" + escaped + r""")["']{1,3}\s+in\s+""" + _HEADERS,
        # quoted anywhere
        r"""["'](""" + escaped + r""")["']""",
    )
    for patterns in (lookups[:2], lookups[2:]):
        found = [match.start(1) for pattern in patterns if (match := re.search(pattern, source))]
        if found:
            return min(found)
    return 0


def _is_true(node: Node) -> bool:
    return isinstance(node, ScalarNode) and str(node.value).strip().lower() == "true"


def _expressions(
    when: CompiledExpression | None, session: SessionSpec | None, rules: Iterable[Rule]
) -> Iterable[CompiledExpression]:
    if when is not None:
        yield when
    if session is not None:
        yield session.key
        yield from (expr for _, expr in session.bind)
        if session.terminate is not None:
            yield session.terminate
    for rule in rules:
        if rule.when is not None:
            yield rule.when
        yield rule.allow
        yield from (expr for _, expr in rule.deny.headers)


def _memo_fields(reads: Mapping[str, frozenset[str] | None]) -> tuple[tuple[str, str], ...] | None:
    """The (variable, field) pairs that make up every input of the rules; None when some
    input is read whole (a map walked by a macro, `now`), and results cannot be remembered."""
    if any(fields is None for fields in reads.values()):
        return None
    return tuple((name, field) for name in sorted(reads) for field in sorted(reads[name] or ()))


def _reads(policies: Iterable[Policy], handles: bool = True) -> dict[str, frozenset[str] | None]:
    """Each variable any expression may read, with the fields read of it (None: all of it).

    Found on each expression's syntax tree (gateway.policy.reads), which over-approximates
    when in doubt, never under: a variable or field left out of the activation would turn a
    valid expression into an error, or a remembered verdict into a stale one.
    """
    fields: dict[str, set[str] | None] = {}

    def add(variable: str, field: str | None) -> None:
        known = fields.setdefault(variable, set())
        if known is None:
            return
        if field is None:
            fields[variable] = None
        else:
            known.add(field)

    for policy in policies:
        # A kind's expressions run outside the fused one: what only they read is no part of the
        # memo's key (`handles=False`), though the activation and the body reading need it.
        handle_expressions = kind_expressions(policy.handles) if handles else ()
        for expr in (*_expressions(policy.when, policy.session, policy.rules), *handle_expressions):
            if policy.session is not None and policy.session.header and expr is policy.session.key:
                continue  # read straight from the headers, not through CEL
            for variable, read in analyze(expr.source).variables.items():
                if read is None:
                    add(variable, None)
                for field in read or ():
                    add(variable, field)
        for rule in policy.rules:
            if rule.deny.claim:
                # The mismatch event reports the bound and the presented value of this claim.
                add("claims", rule.deny.claim)
                add("session", rule.deny.claim)
    # `response` exists only for `minted`, which is evaluated apart (gateway.pipeline.minting.mint).
    return {
        name: frozenset(known) if known is not None else None
        for name, known in fields.items()
        if name not in RESPONSE_ONLY
    }


def load_documents(path: str, text: str, engine: Engine, problems: list[Problem]) -> list[Policy]:
    loader = _FileLoader(path, text, engine, problems)
    try:
        documents = compose_all(path, text)
    except YamlError as exc:
        problems.append(Problem(Location(*exc.position), f"invalid YAML: {exc.problem}"))
        return []
    return [policy for policy in map(loader.policy, documents) if policy is not None]


def load_policy_set(
    sources: Iterable[tuple[str, str]], engine: Engine | str = "cel"
) -> PolicySet:
    """Compile (file name, text) pairs, in the order given; raise PolicyLoadError on any problem."""
    engine = make_engine(engine) if isinstance(engine, str) else engine
    problems: list[Problem] = []
    policies: list[Policy] = []
    files: list[str] = []
    seen: dict[str, Location] = {}
    kinds: dict[str, Location] = {}
    for path, text in sources:
        files.append(path)
        for policy in load_documents(path, text, engine, problems):
            if policy.name in seen:
                first = seen[policy.name]
                message = f"duplicate policy name {policy.name!r} (first at {first})"
                problems.append(Problem(policy.location, message))
                continue
            seen[policy.name] = policy.location
            policies.append(policy)
            for kind in policy.handles:
                # One kind is one key space in the store: two declarations would share handles.
                if kind.name in kinds:
                    message = f"duplicate handle kind {kind.name!r} (first at {kinds[kind.name]})"
                    problems.append(Problem(kind.location, message))
                kinds.setdefault(kind.name, kind.location)
    if problems:
        raise PolicyLoadError(problems)
    reads = _reads(policies)
    return PolicySet(
        tuple(policies),
        engine,
        tuple(files),
        reads,
        FusedMemo(_memo_fields(_reads(policies, handles=False))),
        uses_body=any(policy.uses_body for policy in policies),
    )


def read_policy_dir(directory: Path) -> list[tuple[str, str]]:
    """The (path, text) of every policy file, read in one pass so the set is one snapshot."""
    if not directory.is_dir():
        raise PolicyLoadError([Problem(Location(str(directory), 1, 1), "not a directory")])
    sources = []
    for path in policy_files(directory):
        try:
            sources.append((str(path), path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError) as exc:
            raise PolicyLoadError([Problem(Location(str(path), 1, 1), f"cannot read: {exc}")]) from None
    return sources


def load_policy_dir(
    directory: Path, engine: Engine | str = "cel", *, allow_unprotected: bool = False
) -> PolicySet:
    """The directory's policy set. One without a single enforcing policy (empty, a mistyped
    path to another folder, only test files, only audit policies) would protect nothing: it
    is refused unless `allow_unprotected` (the config's allow_no_enforcing_policy) says so."""
    policy_set = load_policy_set(read_policy_dir(directory), engine)
    if not allow_unprotected and not any(not policy.audit for policy in policy_set.policies):
        found = f"{len(policy_set.files)} policy file(s), {len(policy_set.policies)} audit-only"
        message = (
            f"no enforcing policy ({found}): the gateway would protect nothing; "
            "set allow_no_enforcing_policy: true in the config to serve so anyway"
        )
        raise PolicyLoadError([Problem(Location(str(directory), 1, 1), message)])
    return policy_set


def default_policy_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "default_policies"


def resolve_policy_dir(configured: Path | None) -> Path:
    """The configured directory; else ./policies; else the default policy shipped in the package."""
    if configured is not None:
        return configured
    local = Path("policies")
    if local.is_dir() and policy_files(local):
        return local.resolve()
    return default_policy_dir()
