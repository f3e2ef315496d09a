"""Remembered verdicts: the fused expression's result by the values of the fields it read."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

_SCALARS = (str, int, float, bool, type(None))
_MISSING = object()


class FusedMemo:
    """Remembers what each policy's fused expression returned for the fields it read.

    CEL is pure: the same values of the fields read give the same result. When every
    variable read is read field by field (the loader knows), those values are the whole
    input, so steady traffic (the same person, the same session) costs a dict lookup
    instead of an evaluation. Bounded; cleared when full.
    """

    def __init__(self, fields: tuple[tuple[str, str], ...] | None, size: int = 4096) -> None:
        self._fields = fields
        self._size = size
        self._results: dict[tuple[Any, ...], int] = {}

    def key(self, policy: str, variables: Mapping[str, Any]) -> tuple[Any, ...] | None:
        if self._fields is None:
            return None
        values: list[Any] = [policy]
        for name, field in self._fields:
            value = variables[name].get(field, _MISSING) if name in variables else _MISSING
            kind = type(value)
            if value is not _MISSING and kind not in _SCALARS:
                return None  # lists and maps: not worth hashing
            # With its type: Python has True == 1 == 1.0, CEL does not.
            values.append(kind)
            values.append(value)
        return tuple(values)

    def get(self, key: tuple[Any, ...]) -> int | None:
        return self._results.get(key)

    def put(self, key: tuple[Any, ...], outcome: int) -> None:
        if len(self._results) >= self._size:
            self._results.clear()
        self._results[key] = outcome
