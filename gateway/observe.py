"""What a step reports while it works: an operation around its I/O, and counts of outcomes.

Steps never import telemetry: they are handed an Observer. gateway/telemetry/observer.py
implements it over OpenTelemetry; NO_OBSERVER records nothing, for tests and tools.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any, Protocol


class Operation(Protocol):
    def failed(self, error: BaseException) -> None:
        """The operation failed with `error` (its type is recorded, never its message)."""


class Observer(Protocol):
    def operation(
        self, name: str, attributes: Mapping[str, Any], *, within_check: bool = False
    ) -> AbstractContextManager[Operation]:
        """A client operation (a span). `within_check`: record it only inside a recorded check,
        so that a store round trip costs nothing when the check itself is not traced."""

    def count(self, counter: str, attributes: Mapping[str, str]) -> None:
        """Adds one to the named counter (telemetry's metric names, without `_total`)."""


class _Nothing:
    __slots__ = ()

    def __enter__(self) -> _Nothing:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None

    def failed(self, error: BaseException) -> None:
        return None


NOTHING = _Nothing()


class _NoObserver:
    def operation(
        self, name: str, attributes: Mapping[str, Any], *, within_check: bool = False
    ) -> AbstractContextManager[Operation]:
        return NOTHING

    def count(self, counter: str, attributes: Mapping[str, str]) -> None:
        return None


NO_OBSERVER: Observer = _NoObserver()
