"""The two CEL runtimes behind one small interface.

`cel` is cel-expr-python (the official runtime, C++ underneath): it type-checks every
expression against the declared variables at load. `celpy` is the pure-Python
cel-python, for platforms without the native wheel; it checks syntax at load and types
at run time. Both compile once per load and evaluate against one activation per request.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Mapping
from typing import Any, Literal, Protocol

from google.protobuf import timestamp_pb2

Expect = Literal["bool", "string", "any"]

VARIABLES = ("request", "mcp", "claims", "auth", "session", "context", "source", "now", "handle", "response")
# Known only to a handle kind's `minted` expression, which reads the upstream's response.
RESPONSE_ONLY = frozenset({"response"})


class CompileError(Exception):
    """A CEL syntax or type error; line and column are 1-based, inside the expression."""

    def __init__(self, message: str, line: int = 1, column: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.line = line
        self.column = column


class EvaluationError(Exception):
    """A CEL expression failed at run time (missing key, bad operand, wrong result type)."""


class CompiledExpression(Protocol):
    source: str

    def evaluate(self, activation: Any) -> Any: ...


class Engine(Protocol):
    name: str

    def compile(self, source: str, expect: Expect, *, response: bool = False) -> CompiledExpression: ...

    def activation(self, variables: Mapping[str, Any]) -> Any: ...


_LOCATED = re.compile(r"<input>:(\d+):(\d+): (.*)")


def _check_result(value: Any, expect: Expect) -> Any:
    if expect == "bool" and value is not True and value is not False:
        raise EvaluationError(f"expected a bool, got {type(value).__name__}")
    if expect == "string" and not isinstance(value, str):
        raise EvaluationError(f"expected a string, got {type(value).__name__}")
    return value


class _NativeExpression:
    __slots__ = ("source", "_program", "_expect")

    def __init__(self, source: str, program: Any, expect: Expect) -> None:
        self.source = source
        self._program = program
        self._expect = expect

    def evaluate(self, activation: Any) -> Any:
        result = self._program.eval(activation)
        value = result.plain_value()
        if self._expect == "bool" and (value is True or value is False):
            return value
        if self._expect == "string" and type(value) is str:
            return value
        if result.type().name() == "ERROR":
            raise EvaluationError(str(result))
        return _check_result(value, self._expect)


class NativeEngine:
    """cel-expr-python, with the policy variables declared so that types are checked at load."""

    name = "cel"

    def __init__(self) -> None:
        from cel_expr_python import cel
        from cel_expr_python.ext import ext_optional, ext_strings

        t = cel.Type
        dyn_map = t.Map(t.STRING, t.DYN)
        string_map = t.Map(t.STRING, t.STRING)
        self._cel = cel
        declared = {
            "request": dyn_map,
            # `mcp.arguments` is a map; the other fields are strings.
            "mcp": dyn_map,
            "claims": dyn_map,
            "auth": dyn_map,
            "session": dyn_map,
            "handle": dyn_map,
            "context": string_map,
            "source": string_map,
            "now": t.TIMESTAMP,
        }
        extensions = [ext_strings.ExtStrings(), ext_optional.ExtOptional()]
        self._env = cel.NewEnv(variables=declared, extensions=extensions)
        # A handle kind's `minted` expression also sees the upstream's response.
        self._response_env = cel.NewEnv(variables={**declared, "response": dyn_map}, extensions=extensions)
        self._allowed = {
            "bool": {t.BOOL.name(), t.DYN.name()},
            "string": {t.STRING.name(), t.DYN.name()},
        }

    def compile(self, source: str, expect: Expect, *, response: bool = False) -> _NativeExpression:
        try:
            program = (self._response_env if response else self._env).compile(source)
        except RuntimeError as exc:
            match = _LOCATED.search(str(exc))
            if match:
                message = match.group(3).split("\n")[0].strip()
                # The native positions are already 1-based.
                raise CompileError(message, int(match.group(1)), int(match.group(2))) from None
            raise CompileError(str(exc).split("\n")[0]) from None
        returned = program.return_type().name()
        if expect != "any" and returned not in self._allowed[expect]:
            raise CompileError(f"must evaluate to a {expect}, not {returned.lower()}")
        return _NativeExpression(source, program, expect)

    def activation(self, variables: Mapping[str, Any]) -> Any:
        env = self._response_env if "response" in variables else self._env
        return env.Activation(variables)


class _CelpyExpression:
    __slots__ = ("source", "_program", "_expect")

    def __init__(self, source: str, program: Any, expect: Expect) -> None:
        self.source = source
        self._program = program
        self._expect = expect

    def evaluate(self, activation: Any) -> Any:
        from celpy.evaluation import CELEvalError

        try:
            result = self._program.evaluate(activation)
        except CELEvalError as exc:
            raise EvaluationError(str(exc.args[0] if exc.args else exc)) from None
        except (TypeError, ValueError, KeyError, ZeroDivisionError) as exc:
            raise EvaluationError(f"{type(exc).__name__}: {exc}") from None
        if isinstance(result, CELEvalError):
            raise EvaluationError(str(result.args[0] if result.args else result))
        return _check_result(_to_python(result), self._expect)


def _to_python(value: Any) -> Any:
    from celpy import celtypes

    if isinstance(value, celtypes.BoolType):
        return bool(value)
    if isinstance(value, celtypes.StringType):
        return str(value)
    if isinstance(value, celtypes.IntType | celtypes.UintType):
        return int(value)
    if isinstance(value, celtypes.DoubleType):
        return float(value)
    if isinstance(value, celtypes.ListType):
        return [_to_python(v) for v in value]
    if isinstance(value, celtypes.MapType):
        return {_to_python(k): _to_python(v) for k, v in value.items()}
    if isinstance(value, celtypes.TimestampType):
        return datetime.datetime.fromtimestamp(value.timestamp(), datetime.UTC)
    return value


def _celpy_syntax_message(exc: Exception) -> str:
    # cel-python's own message is only the source text with a caret; lark's error says what.
    cause = exc.__context__
    character = getattr(cause, "char", None)
    token = getattr(cause, "token", None)
    if character:
        return f"Syntax error: unexpected character {character!r}"
    if token is not None and getattr(token, "type", "") == "$END":
        return "Syntax error: unexpected end of expression"
    if token is not None:
        return f"Syntax error: unexpected {str(token)!r}"
    return "Syntax error"


class CelpyEngine:
    """cel-python: pure Python, slower, syntax-checked at load."""

    name = "celpy"

    def __init__(self) -> None:
        import celpy

        self._celpy = celpy
        self._env = celpy.Environment()

    def compile(self, source: str, expect: Expect, *, response: bool = False) -> _CelpyExpression:
        from celpy.celparser import CELParseError

        try:
            ast = self._env.compile(source)
        except CELParseError as exc:
            line = getattr(exc, "line", None) or 1
            column = getattr(exc, "column", None) or 1
            raise CompileError(_celpy_syntax_message(exc), int(line), int(column)) from None
        return _CelpyExpression(source, self._env.program(ast), expect)

    def activation(self, variables: Mapping[str, Any]) -> Any:
        from celpy import celtypes

        converted: dict[str, Any] = {}
        for name, value in variables.items():
            if isinstance(value, datetime.datetime):
                converted[name] = celtypes.TimestampType(value)
            else:
                converted[name] = _to_cel(value)
        return converted


def _to_cel(value: Any) -> Any:
    from celpy import celtypes

    if isinstance(value, datetime.datetime):
        return celtypes.TimestampType(value)
    if isinstance(value, timestamp_pb2.Timestamp):
        return celtypes.TimestampType(value.ToDatetime(tzinfo=datetime.UTC))
    if isinstance(value, Mapping):
        return celtypes.MapType({celtypes.StringType(k): _to_cel(v) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return celtypes.ListType([_to_cel(v) for v in value])
    from celpy.adapter import json_to_cel

    return json_to_cel(value)


def make_engine(name: str) -> Engine:
    if name == "cel":
        return NativeEngine()
    if name == "celpy":
        return CelpyEngine()
    raise ValueError(f"unknown CEL engine {name!r} (use 'cel' or 'celpy')")
