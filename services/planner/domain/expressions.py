"""Workflow expressions in CEL, the Common Expression Language (decision 13 in docs/DECISIONS.md).

Templates: a string that is exactly ``${expr}`` (blanks around it allowed) evaluates to the
expression's value, keeping its type; ``${...}`` inside other text is interpolated as text (null as
nothing, booleans as ``true``/``false``, lists and maps as JSON). Braces and quotes nest inside
``${...}``, so ``${{'a': 1}.a}`` and ``${x == '}'}`` are single expressions.

Expressions are CEL over the variables ``engine.context`` provides: ``input`` (the run's input),
``steps`` (``steps.<id>.output``, ``.status``, ``.error``) and ``run`` (``id``, ``tenant``,
``workflow``, ``version``). CEL has no side effects and always terminates, so a workflow file cannot
run code. Idioms: ``has(input.coupon)`` for an optional key, ``cond ? a : b``, ``size(list)``,
``x in list``, ``list.exists(v, v > 1)``.

Every failure, at compile or at evaluation (missing key, null where a map was expected, type
mismatch, division by zero, overflow, anything the library raises), is an ``ExpressionError`` whose
message names the expression: the engine turns it into a failed step with a reason, whereas any
other exception would dead-letter the event and stall the run.

Known deviation of the library (common-expression-language 0.10.0): ``size()`` of a string counts
UTF-8 bytes, not code points (``size('café') == 5``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any, NamedTuple

import cel

VARIABLES = frozenset({"input", "steps", "run"})
# The functions the library implements natively (macros such as has() and exists() are syntax, not
# functions). A name outside this set compiles but fails every evaluation: validation refuses it.
FUNCTIONS = frozenset({
    "size", "contains", "startsWith", "endsWith", "matches",
    "int", "uint", "double", "string", "bytes", "timestamp", "duration", "type", "dyn",
    "getFullYear", "getMonth", "getDayOfYear", "getDayOfMonth", "getDate", "getDayOfWeek",
    "getHours", "getMinutes", "getSeconds", "getMilliseconds"})
# What the home-made language's functions became (workflow files written before CEL).
_REPLACEMENTS = {"len": "size(x)", "coalesce": "has(a.b) && a.b != null ? a.b : fallback",
                 "default": "has(a.b) && a.b != null ? a.b : fallback", "number": "double(x)",
                 "lower": "no CEL equivalent here", "upper": "no CEL equivalent here"}
_NAMED = re.compile(r"[A-Za-z][A-Za-z0-9_]*")  # a name, not an operator such as _+_ or @in
# Identifiers CEL resolves by itself (``type(x) == string``): not unknown variables.
_TYPE_NAMES = frozenset({"bool", "bytes", "double", "dyn", "int", "list", "map", "null_type", "string", "type",
                         "uint"})
# A comprehension macro binds its first argument (``tags.exists(t, t == 'vip')``); the library lists
# such names among the expression's variables.
_BOUND = re.compile(r"\.\s*(?:all|exists|exists_one|map|filter)\s*\(\s*([A-Za-z_][A-Za-z0-9_]*)\s*,")
_SYNTAX = re.compile(r"ERROR: <input>:(\d+):(\d+): (.*)")
_CEL_TYPE_NAMES = {bytes: "bytes", datetime: "timestamp", timedelta: "duration"}
_CACHE_SIZE = 4096  # distinct expressions and templates kept compiled; a deployment has a few hundred


class ExpressionError(ValueError):
    """An expression is malformed or failed to evaluate; the message names it and says why."""


class _Part(NamedTuple):
    text: str
    is_expression: bool


@lru_cache(maxsize=_CACHE_SIZE)
def parse(text: str) -> cel.Program:
    """Compile one expression; each distinct text compiles once."""
    if not text.strip():
        raise ExpressionError("${}: empty expression")
    try:
        return cel.compile(text)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # a Rust panic reaches Python as pyo3's PanicException, a BaseException
        raise ExpressionError(f"${{{text}}}: {_syntax_reason(str(exc))}") from None


def evaluate(text: str, context: Mapping[str, Any]) -> Any:
    """The value of one expression (no ``${}``) over ``context``, as plain JSON-like Python."""
    program = parse(text)
    return _run(program, text, _activation(context, program.variables()))


def render(value: Any, context: Mapping[str, Any]) -> Any:
    """Render the templates inside any JSON-like value (dicts and lists recursively)."""
    programs = [parse(text) for text in _expressions(value)]
    # Converting the context to CEL values costs more than evaluating (step outputs can be large):
    # convert once per call, and only the variables the templates use.
    env = _activation(context, (name for program in programs for name in program.variables()))
    return _render(value, env)


def check(value: Any) -> list[str]:
    """Every problem of the templates inside ``value`` (for validation at deploy time)."""
    if isinstance(value, str):
        try:
            parts = _split(value)
        except ExpressionError as exc:
            return [str(exc)]
        return [error for part in parts if part.is_expression for error in check_expression(part.text)]
    if isinstance(value, dict):
        return [error for item in value.values() for error in check(item)]
    if isinstance(value, list):
        return [error for item in value for error in check(item)]
    return []


def check_expression(text: str) -> list[str]:
    """Problems of one bare expression (a ``when``): syntax, unknown variables and functions."""
    try:
        program = parse(text)
    except ExpressionError as exc:
        return [str(exc)]
    errors = []
    unknown = set(program.variables()) - VARIABLES - _TYPE_NAMES - set(_BOUND.findall(text))
    if unknown:
        errors.append(f"${{{text}}}: unknown variable {', '.join(sorted(unknown))}; "
                      f"expressions see {', '.join(sorted(VARIABLES))}")
    for name in sorted(set(program.functions()) - FUNCTIONS):
        if _NAMED.fullmatch(name):
            hint = f"use {_REPLACEMENTS[name]}" if name in _REPLACEMENTS else f"known: {', '.join(sorted(FUNCTIONS))}"
            errors.append(f"${{{text}}}: unknown function {name}(); {hint}")
    return errors


# -- templates ----------------------------------------------------------------------------------------
@lru_cache(maxsize=_CACHE_SIZE)
def _split(template: str) -> tuple[_Part, ...]:
    """Literal text and ``${...}`` expressions, in order."""
    parts: list[_Part] = []
    pos = 0
    while (start := template.find("${", pos)) >= 0:
        end = _closing_brace(template, start + 2)
        if start > pos:
            parts.append(_Part(template[pos:start], False))
        parts.append(_Part(template[start + 2:end], True))
        pos = end + 1
    if pos < len(template) or not parts:
        parts.append(_Part(template[pos:], False))
    return tuple(parts)


def _closing_brace(template: str, pos: int) -> int:
    """Index of the ``}`` closing the expression starting at ``pos``, skipping nested braces and strings."""
    depth, quote, raw, i = 0, "", False, pos
    while i < len(template):
        if quote:
            if template[i] == "\\" and not raw:
                i += 1  # an escaped character never closes the string
            elif template.startswith(quote, i):
                i, quote = i + len(quote) - 1, ""
        elif template[i] in "'\"":
            quote = template[i] * 3 if template.startswith(template[i] * 3, i) else template[i]
            raw = template[i - 1] in "rR"
            i += len(quote) - 1
        elif template[i] == "{":
            depth += 1
        elif template[i] == "}":
            if depth == 0:
                return i
            depth -= 1
        i += 1
    raise ExpressionError(f"unterminated ${{ in {template!r}: no closing }}")


def _expressions(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield from (part.text for part in _split(value) if part.is_expression)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _expressions(item)
    elif isinstance(value, list):
        for item in value:
            yield from _expressions(item)


def _render(value: Any, env: cel.Context) -> Any:
    if isinstance(value, str):
        whole = _split(value.strip())
        if len(whole) == 1 and whole[0].is_expression:
            return _run(parse(whole[0].text), whole[0].text, env)
        return "".join(_text(_run(parse(part.text), part.text, env)) if part.is_expression else part.text
                       for part in _split(value))
    if isinstance(value, dict):
        return {key: _render(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [_render(item, env) for item in value]
    return value


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | dict):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


# -- evaluation -----------------------------------------------------------------------------------------
def _activation(context: Mapping[str, Any], names: Iterable[str]) -> cel.Context:
    """The CEL variables for ``names`` (those of them the context has; CEL reports the others)."""
    env = cel.Context()
    for name in sorted(set(names)):
        if name not in context:
            continue
        try:
            env.add_variable(name, context[name])
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:
            raise ExpressionError(f"variable {name!r} holds a value CEL cannot represent: {exc}") from exc
    return env


def _run(program: cel.Program, text: str, env: cel.Context) -> Any:
    try:
        value = program.execute(env)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # a Rust panic reaches Python as pyo3's PanicException, a BaseException
        raise ExpressionError(f"${{{text}}}: {_evaluation_reason(exc)}") from exc
    return _plain(value, text)


def _plain(value: Any, text: str) -> Any:
    """The value as JSON-like Python: step inputs and run outputs travel as JSON."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [_plain(item, text) for item in value]
    if isinstance(value, dict):
        if any(not isinstance(key, str) for key in value):
            raise ExpressionError(f"${{{text}}}: a map with non-string keys is not a JSON object")
        return {key: _plain(item, text) for key, item in value.items()}
    kind = next((name for t, name in _CEL_TYPE_NAMES.items() if isinstance(value, t)), type(value).__name__)
    raise ExpressionError(f"${{{text}}}: a {kind} is not a JSON value; convert it, e.g. with string()")


def _evaluation_reason(exc: BaseException) -> str:
    if isinstance(exc, KeyError):  # the library raises KeyError(key) for a missing map key
        return f"no such key {exc.args[0]!r}" if exc.args else "no such key"
    return str(exc) or type(exc).__name__


def _syntax_reason(message: str) -> str:
    """``column 19: Syntax error: ...`` out of the library's multi-line report."""
    found = [(int(line), column, reason) for line, column, reason in _SYNTAX.findall(message)]
    if not found:
        return message
    return "; ".join(f"{'' if line == 1 else f'line {line} '}column {column}: {reason}"
                     for line, column, reason in found)


__all__ = ["FUNCTIONS", "VARIABLES", "ExpressionError", "check", "check_expression", "evaluate", "parse", "render"]
