"""The documentation says what the code does: README.md is the front door, docs/ the reference.

- every reason code of gateway/decision.py is in docs/reference.md's table, with its status from
  STATUS_OF and its body from gateway/response.py, and the table lists nothing else;
- every span attribute key, event name and span name the code sets, and every metric it creates,
  is named in docs/reference.md;
- every relative link in README.md and docs/*.md points to a file that exists, and an anchor to a
  heading that exists;
- README.md stays a front door (at most 320 lines);
- every `$ authz-gateway policy …` shown with its output prints that output today.
"""

from __future__ import annotations

import ast
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from gateway import decision
from gateway.config import AuthConfig, ResponsesConfig
from gateway.response import ResponseBuilder

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
DOCS = REPO / "docs"
REFERENCE = DOCS / "reference.md"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
# Generated code: no attribute of ours is set there.
GENERATED = ("adminpb", "envoy_api")

_REASON = re.compile(r"[a-z][a-z0-9]*(?:_[a-z0-9]+)*")
_FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
_INLINE_CODE = re.compile(r"`[^`\n]*`")


def gateway_sources() -> list[Path]:
    return [
        path
        for path in sorted((REPO / "gateway").rglob("*.py"))
        if not any(part in GENERATED for part in path.relative_to(REPO / "gateway").parts)
    ]


def without_code_blocks(text: str) -> str:
    """The text with fenced code blocks blanked (their lines kept, so line numbers stay)."""
    return _FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)


# ---------------------------------------------------------------------------------------------
# 1. Reason codes
# ---------------------------------------------------------------------------------------------


def reason_codes_in_code() -> dict[str, str]:
    """gateway/decision.py's UPPER_CASE str constants whose value is a reason code: name -> code."""
    return {
        name: value
        for name, value in vars(decision).items()
        if name.isupper() and isinstance(value, str) and _REASON.fullmatch(value)
    }


def section(text: str, heading: str) -> str:
    """From the heading line to the next heading of the same or a higher level."""
    match = re.search(rf"^(#+) {re.escape(heading)}[ \t]*$", text, re.M)
    assert match is not None, f"no heading {heading!r}"
    level = len(match.group(1))
    rest = text[match.end() :]
    end = re.search(rf"^#{{1,{level}}} ", without_code_blocks(rest), re.M)
    return rest[: end.start()] if end else rest


def reason_table() -> dict[str, list[str]]:
    """docs/reference.md's reason-code table: code -> the row's cells. A row whose first cell is
    not one code in backticks (a rule's own reason is described in prose) is not a contract row."""
    rows: dict[str, list[str]] = {}
    for line in section(REFERENCE.read_text(), "Reason codes").splitlines():
        if not line.startswith("|"):
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        code = re.fullmatch(r"`([a-z0-9_]+)`", cells[0])
        if code is None:
            continue
        assert code.group(1) not in rows, f"{code.group(1)} is listed twice"
        rows[code.group(1)] = cells
    return rows


def test_every_reason_code_is_in_the_reference_with_its_status() -> None:
    codes = reason_codes_in_code()
    assert {"ALLOWED", "TOKEN_MISSING", "SUBJECT_MISMATCH", "REQUEST_UNPARSEABLE"} <= set(codes)
    assert set(decision.STATUS_OF) <= set(codes.values()), "STATUS_OF names a code without a constant"
    table = reason_table()
    missing = sorted(set(codes.values()) - set(table))
    assert not missing, f"reason codes missing from docs/reference.md: {missing}"
    for code in codes.values():
        status = table[code][1]
        if code in decision.STATUS_OF:
            assert status == str(decision.STATUS_OF[code]), f"{code}: documented {status}"
        else:
            assert code == decision.ALLOWED and status.startswith("—"), f"{code}: documented {status}"


def test_the_reference_lists_no_reason_code_the_code_cannot_produce() -> None:
    extra = sorted(set(reason_table()) - set(reason_codes_in_code().values()))
    assert not extra, f"docs/reference.md lists codes gateway/decision.py does not define: {extra}"


def test_the_documented_bodies_are_the_bodies_sent() -> None:
    builder = ResponseBuilder(AuthConfig())
    not_found = ResponsesConfig().session_not_found.body
    for code, cells in reason_table().items():
        if code == decision.ALLOWED:
            continue
        sent = builder.body(code, decision.STATUS_OF[code])
        documented = cells[2]
        if documented == "`responses.session_not_found`":
            assert sent == not_found, code
        else:
            assert documented == f"`{sent}`", f"{code}: documented {documented}, sent {sent}"


# ---------------------------------------------------------------------------------------------
# 2. Span attributes, events, span names and metrics
# ---------------------------------------------------------------------------------------------

_ATTRIBUTE_KEY = re.compile(r"(?:authz|mcp|gen_ai|http|url|db|server|exception)\.[a-z0-9_.]+")
_INSTRUMENTS = {
    "create_counter",
    "create_up_down_counter",
    "create_histogram",
    "create_gauge",
    "create_observable_counter",
    "create_observable_up_down_counter",
    "create_observable_gauge",
    "LocalCounter",
    "LocalHistogram",
}


def _called(node: ast.Call) -> str:
    func = node.func
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""


def _string(node: ast.expr | None) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _first_string(node: ast.Call) -> str | None:
    return _string(node.args[0]) if node.args else None


def _assigns(node: ast.Assign, name: str) -> bool:
    return [getattr(target, "id", "") for target in node.targets] == [name]


def telemetry_names() -> dict[str, set[str]]:
    """What the code sets, by kind, found on the syntax trees of gateway/**/*.py:

    - attributes: string keys of a dict literal, of an item assignment (`attributes["k"] = …`) or
      of set_attribute("k", …) that look like attribute keys (authz.*, http.*, url.*, …);
    - events: Event("name", …) and add_event("name", …);
    - spans: the Check span's name, and operation("name", …) (a step's client span);
    - metrics: the names instruments are created with.
    """
    found: dict[str, set[str]] = {"attributes": set(), "events": set(), "spans": set(), "metrics": set()}
    for path in gateway_sources():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            keys: list[ast.expr | None] = []
            if isinstance(node, ast.Dict):
                keys = list(node.keys)
            elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Store):
                keys = [node.slice]
            elif isinstance(node, ast.Call):
                called, name = _called(node), _first_string(node)
                if called == "set_attribute":
                    keys = list(node.args[:1])
                elif name is not None and called in ("Event", "add_event"):
                    found["events"].add(name)
                elif name is not None and called in ("operation", "start_span", "start_as_current_span"):
                    found["spans"].add(name)
                elif name is not None and called in _INSTRUMENTS:
                    found["metrics"].add(name)
            elif (
                isinstance(node, ast.Assign)
                and (_assigns(node, "SPAN_NAME") or _assigns(node, "PROCESS_SPAN_NAME"))
                and _string(node.value)
            ):
                found["spans"].add(str(_string(node.value)))
            for key in map(_string, keys):
                if key is not None and _ATTRIBUTE_KEY.fullmatch(key):
                    found["attributes"].add(key)
    return found


def test_the_scan_finds_what_the_code_is_known_to_set() -> None:
    found = telemetry_names()
    assert {"authz.decision", "authz.reason", "gen_ai.tool.name", "db.system.name"} <= found["attributes"]
    assert {"authz.binding_mismatch", "authz.audit_deny", "exception"} <= found["events"]
    assert {
        "envoy.service.auth.v3.Authorization/Check",
        "envoy.service.ext_proc.v3.ExternalProcessor/Process",
        "jwks.fetch",
    } <= found["spans"]
    assert {"authz.session.bound_at", "authz.stream.cancelled"} <= found["attributes"]
    assert {"authz_checks", "authz_check_duration", "authz_policy_reloads"} <= found["metrics"]


@pytest.mark.parametrize("kind", ["attributes", "events", "spans", "metrics"])
def test_every_span_attribute_event_span_and_metric_is_in_the_reference(kind: str) -> None:
    reference = REFERENCE.read_text()
    missing = sorted(name for name in telemetry_names()[kind] if f"`{name}`" not in reference)
    assert not missing, f"{kind} set by the code but not in docs/reference.md: {missing}"


# ---------------------------------------------------------------------------------------------
# 3. Links
# ---------------------------------------------------------------------------------------------

_LINK_TARGET = re.compile(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"<[^>]+>", "", heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for match in re.finditer(r"^#{1,6} +(.+?)[ \t#]*$", without_code_blocks(page.read_text()), re.M):
        base = slug(match.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(page: Path) -> list[tuple[int, str]]:
    text = without_code_blocks(page.read_text())
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        for match in _LINK_TARGET.finditer(_INLINE_CODE.sub("``", line)):
            found.append((number, match.group(1)))
    return found


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(REPO)) for p in PAGES])
def test_every_relative_link_points_to_something_that_exists(page: Path) -> None:
    broken = []
    for number, target in links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, …
            continue
        path, _, anchor = target.partition("#")
        goal = (page.parent / path).resolve() if path else page
        where = f"{page.relative_to(REPO)}:{number}: {target}"
        if not goal.exists():
            broken.append(f"{where}: no such file")
        elif anchor and goal.suffix == ".md" and anchor not in anchors(goal):
            broken.append(f"{where}: no heading with that anchor in {goal.relative_to(REPO)}")
    assert not broken, "\n".join(broken)


def test_the_docs_are_linked_from_the_readme() -> None:
    linked = {(README.parent / target.partition("#")[0]).resolve() for _, target in links(README)}
    unlinked = [p.name for p in sorted(DOCS.glob("*.md")) if p.resolve() not in linked]
    assert not unlinked, f"docs/ pages the README does not link to: {unlinked}"


def test_the_slugs_are_githubs() -> None:
    assert slug("404 parity: `responses.session_not_found`") == "404-parity-responsessession_not_found"
    assert slug("Several processes: `serve --workers N`") == "several-processes-serve---workers-n"
    assert slug("Where this implementation differs from DESIGN.md") == (
        "where-this-implementation-differs-from-designmd"
    )


# ---------------------------------------------------------------------------------------------
# 4. The front door stays small
# ---------------------------------------------------------------------------------------------


def test_the_readme_is_a_front_door() -> None:
    lines = README.read_text().count("\n")
    assert lines <= 320, f"README.md has {lines} lines: move reference material into docs/"


# ---------------------------------------------------------------------------------------------
# 5. Policy tool output shown in the docs is real
# ---------------------------------------------------------------------------------------------


def shown_policy_commands() -> list[tuple[str, str, str]]:
    """(where, command, output) for each `$ authz-gateway policy …` shown with its output, when
    every directory and file it names exists here (an example of a broken directory does not)."""
    shown = []
    for page in PAGES:
        for block in _FENCE.finditer(page.read_text()):
            body = block.group(0).split("\n", 1)[1].rsplit("\n", 1)[0]
            for part in re.split(r"^(?=\$ )", body, flags=re.M):
                if not part.startswith("$ authz-gateway policy "):
                    continue
                command, _, output = part.partition("\n")
                words = shlex.split(command[2:])
                named = [w for w in words[3:] if not w.startswith("-") and ("/" in w or "." in w)]
                named += [w for w in words[3:4] if not w.startswith("-")]
                if all((REPO / w).exists() for w in named):
                    shown.append((str(page.relative_to(REPO)), command[2:], output.rstrip("\n")))
    return shown


@pytest.mark.timeout(120)
def test_policy_tool_output_in_the_docs_is_what_the_tool_prints() -> None:
    shown = shown_policy_commands()
    assert any("policy explain" in command for _, command, _ in shown)
    command_path = Path(sys.executable).with_name("authz-gateway")
    for where, command, output in shown:
        words = shlex.split(command)
        result = subprocess.run(
            [str(command_path), *words[1:]], cwd=REPO, capture_output=True, text=True, timeout=60
        )
        assert result.stdout.rstrip("\n") == output, f"{where}: {command}\n{result.stdout}{result.stderr}"
