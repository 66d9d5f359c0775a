"""A small, safe expression language for workflow inputs and conditions.

Templates: a string that is exactly ``${expr}`` evaluates to the expression's
value (keeping its type); ``${...}`` inside other text is interpolated as text.
Expressions: paths into the context (``input.amount``, ``steps.check.output.sku``,
``memory.kb``), literals (numbers, 'strings', true, false, null), comparisons
(== != < <= > >=), ``in``, ``and``/``or``/``not``, parentheses and a few pure
functions (len, lower, upper, default, coalesce). No Python ``eval``: the parser
only builds the grammar below, so a workflow file cannot run code.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

_TOKEN = re.compile(r"""\s*(?:(?P<num>-?\d+(?:\.\d+)?)|(?P<str>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")|
    (?P<op>==|!=|<=|>=|<|>|\(|\)|,|\[|\])|(?P<name>[A-Za-z_][A-Za-z0-9_\-]*(?:\.[A-Za-z_0-9][A-Za-z0-9_\-]*)*))""",
                    re.VERBOSE)
_TEMPLATE = re.compile(r"\$\{([^}]*)\}")
_MISSING = object()

FUNCTIONS: dict[str, Callable[..., Any]] = {
    "len": lambda x: len(x) if x is not None else 0,
    "lower": lambda x: str(x).lower(),
    "upper": lambda x: str(x).upper(),
    "default": lambda x, d: d if x is None else x,
    "coalesce": lambda *xs: next((x for x in xs if x is not None), None),
    "number": lambda x: float(x),
}


class ExpressionError(ValueError):
    """The expression is malformed; the message says where."""


def _tokenize(text: str) -> list[tuple[str, str]]:
    tokens, pos = [], 0
    text = text.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise ExpressionError(f"unexpected character {text[pos]!r} at {pos} in {text!r}")
        kind = m.lastgroup or ""
        tokens.append((kind, m.group(kind)))
        pos = m.end()
    return tokens


class _Parser:
    """Recursive descent: or > and > not > comparison > call/atom."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokenize(text)
        self.i = 0

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self, value: str | None = None) -> tuple[str, str]:
        tok = self.peek()
        if tok is None or (value is not None and tok[1] != value):
            raise ExpressionError(f"expected {value or 'a value'} in {self.text!r}")
        self.i += 1
        return tok

    def parse(self) -> Any:
        node = self.or_()
        if self.peek() is not None:
            raise ExpressionError(f"unexpected {self.peek()[1]!r} in {self.text!r}")  # type: ignore[index]
        return node

    def or_(self) -> Any:
        node = self.and_()
        while self.peek() == ("name", "or"):
            self.take()
            node = ("or", node, self.and_())
        return node

    def and_(self) -> Any:
        node = self.not_()
        while self.peek() == ("name", "and"):
            self.take()
            node = ("and", node, self.not_())
        return node

    def not_(self) -> Any:
        if self.peek() == ("name", "not"):
            self.take()
            return ("not", self.not_())
        return self.comparison()

    def comparison(self) -> Any:
        node = self.atom()
        tok = self.peek()
        if tok and (tok[0] == "op" and tok[1] in ("==", "!=", "<", "<=", ">", ">=") or tok == ("name", "in")):
            self.take()
            return ("cmp", tok[1], node, self.atom())
        return node

    def atom(self) -> Any:
        kind, value = self.take()
        if kind == "num":
            return ("lit", float(value) if "." in value else int(value))
        if kind == "str":
            return ("lit", bytes(value[1:-1], "utf-8").decode("unicode_escape"))
        if value == "(":
            node = self.or_()
            self.take(")")
            return node
        if value == "[":
            items = []
            while self.peek() != ("op", "]"):
                items.append(self.or_())
                if self.peek() == ("op", ","):
                    self.take()
            self.take("]")
            return ("list", items)
        if kind == "name":
            if value in ("true", "false", "null"):
                return ("lit", {"true": True, "false": False, "null": None}[value])
            if self.peek() == ("op", "("):
                if value not in FUNCTIONS:
                    raise ExpressionError(f"unknown function {value!r}; known: {sorted(FUNCTIONS)}")
                self.take("(")
                args = []
                while self.peek() != ("op", ")"):
                    args.append(self.or_())
                    if self.peek() == ("op", ","):
                        self.take()
                self.take(")")
                return ("call", value, args)
            return ("path", value.split("."))
        raise ExpressionError(f"unexpected {value!r} in {self.text!r}")


def parse(text: str) -> Any:
    return _Parser(text).parse()


def _resolve(path: list[str], context: Mapping[str, Any]) -> Any:
    value: Any = context
    for part in path:
        if isinstance(value, Mapping):
            value = value.get(part, _MISSING)
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            value = _MISSING
        if value is _MISSING:
            return None
    return value


def _compare(op: str, left: Any, right: Any) -> bool:
    if op == "==":
        return bool(left == right)
    if op == "!=":
        return bool(left != right)
    if op == "in":
        return right is not None and left in right
    if left is None or right is None:
        return False  # ordering with a missing value is false, never an error
    try:
        return bool({"<": left < right, "<=": left <= right, ">": left > right, ">=": left >= right}[op])
    except TypeError as exc:
        raise ExpressionError(f"cannot compare {left!r} {op} {right!r}") from exc


def evaluate_node(node: Any, context: Mapping[str, Any]) -> Any:
    kind = node[0]
    if kind == "lit":
        return node[1]
    if kind == "path":
        return _resolve(node[1], context)
    if kind == "list":
        return [evaluate_node(n, context) for n in node[1]]
    if kind == "not":
        return not evaluate_node(node[1], context)
    if kind == "and":
        return bool(evaluate_node(node[1], context)) and bool(evaluate_node(node[2], context))
    if kind == "or":
        return bool(evaluate_node(node[1], context)) or bool(evaluate_node(node[2], context))
    if kind == "cmp":
        return _compare(node[1], evaluate_node(node[2], context), evaluate_node(node[3], context))
    if kind == "call":
        return FUNCTIONS[node[1]](*[evaluate_node(n, context) for n in node[2]])
    raise ExpressionError(f"bad node {kind}")


def evaluate(text: str, context: Mapping[str, Any]) -> Any:
    return evaluate_node(parse(text), context)


def render(value: Any, context: Mapping[str, Any]) -> Any:
    """Render templates inside any JSON-like value (dicts and lists recursively)."""
    if isinstance(value, str):
        whole = _TEMPLATE.fullmatch(value.strip())
        if whole:
            return evaluate(whole.group(1), context)
        return _TEMPLATE.sub(lambda m: _text(evaluate(m.group(1), context)), value)
    if isinstance(value, dict):
        return {k: render(v, context) for k, v in value.items()}
    if isinstance(value, list):
        return [render(v, context) for v in value]
    return value


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def check(value: Any) -> list[str]:
    """Every syntax error in the templates inside ``value`` (for validation)."""
    errors: list[str] = []
    if isinstance(value, str):
        for m in _TEMPLATE.finditer(value):
            try:
                parse(m.group(1))
            except ExpressionError as exc:
                errors.append(str(exc))
    elif isinstance(value, dict):
        for v in value.values():
            errors.extend(check(v))
    elif isinstance(value, list):
        for v in value:
            errors.extend(check(v))
    return errors
