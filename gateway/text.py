"""Which strings may reach a CEL engine.

The native engine (cel-expr-python) cuts a string at its first NUL, so `"alice\\x00mallory"`
would compare equal to `"alice"` inside a policy. A lone surrogate has no UTF-8 form at all.
Every value that can reach an engine (claims, request data, the MCP view, stored bindings)
is checked with these before it gets there.
"""

from __future__ import annotations

from typing import Any

_SURROGATES = range(0xD800, 0xE000)

# Request headers that carry credentials: never shown to CEL (`request.headers`), so never a
# session id or a handle either.
CREDENTIAL_HEADERS = frozenset({"authorization", "dpop"})


def safe_text(text: str) -> bool:
    """No NUL and no lone surrogate."""
    if "\x00" in text:
        return False
    return text.isascii() or not any(ord(c) in _SURROGATES for c in text)


def safe_value(value: Any) -> bool:
    """Every string in a JSON-like value (map keys included) is safe_text."""
    if type(value) is dict:
        try:
            # The common case, a map of strings (a session's bound iss and sub): one check.
            joined = "".join(value) + "".join(value.values())
        except TypeError:
            pass  # a value that is not a string: walk it
        else:
            return "\x00" not in joined and (joined.isascii() or safe_text(joined))
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if not safe_text(item):
                return False
        elif isinstance(item, dict):
            for key, nested in item.items():
                if isinstance(key, str) and not safe_text(key):
                    return False
                stack.append(nested)
        elif isinstance(item, list | tuple):
            stack.extend(item)
    return True
