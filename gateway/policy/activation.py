"""CEL activations built from plain values, holding only what the policy set reads.

Converting values into CEL is most of what an evaluation costs, so an activation holds
only the variables, and the fields of them, that some expression reads, and is built at
most once per request (`Once`).
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Mapping
from typing import Any

from google.protobuf import timestamp_pb2

from gateway.policy.model import PolicySet

NO_SESSION: Mapping[str, Any] = {"id": "", "exists": False, "anonymous": False}


def timestamp(seconds: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC)


def _timestamp_value(seconds: float) -> timestamp_pb2.Timestamp:
    # Inside a map, the native CEL runtime takes a Timestamp message, not a datetime.
    value = timestamp_pb2.Timestamp()
    value.FromNanoseconds(int(seconds * 1e9))
    return value


def session_variable(
    key: str, data: Mapping[str, Any], existed: bool, fields: frozenset[str] | None
) -> dict[str, Any]:
    """The `session` variable: the bound values, and the id, exists, anonymous, created_at."""
    variable: dict[str, Any] = dict(data.get("bound", {}))
    variable["id"] = key
    variable["exists"] = existed
    variable["anonymous"] = bool(data.get("anonymous", False))
    if fields is None or "created_at" in fields:
        variable["created_at"] = _timestamp_value(float(data.get("created_at", 0.0)))
    return variable


class Once:
    """Calls `make` the first time it is called, and returns that result ever after."""

    __slots__ = ("_make", "_value")

    def __init__(self, make: Callable[[], Any]) -> None:
        self._make: Callable[[], Any] | None = make
        self._value: Any = None

    def __call__(self) -> Any:
        if self._make is not None:
            self._value = self._make()
            self._make = None
        return self._value


class Activations:
    """Activations holding only the variables, and fields, that the policy set reads."""

    __slots__ = ("_engine", "_reads")

    def __init__(self, policy_set: PolicySet) -> None:
        self._engine = policy_set.engine
        self._reads = policy_set.reads

    def activation(self, variables: Mapping[str, Any]) -> Any:
        data: dict[str, Any] = {}
        for name, fields in self._reads.items():
            value = variables.get(name)
            if value is None:
                continue
            if fields is not None and type(value) is dict:
                value = {k: value[k] for k in fields if k in value}
            data[name] = value
        return self._engine.activation(data)
