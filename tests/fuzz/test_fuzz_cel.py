"""CEL expressions and templates as workflow files carry them: token soup, well-formed expressions
over random run contexts, and templates mixing both. Checking answers a list of problems; evaluating
answers a JSON value or raises ExpressionError naming the expression. Nothing else escapes."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.planner.domain import expressions
from services.planner.domain.expressions import ExpressionError
from tests.fuzz.conftest import EXAMPLES, examples

pytestmark = pytest.mark.timeout(300)
FUZZ = settings(max_examples=examples(300), deadline=1000, suppress_health_check=[HealthCheck.too_slow])

TOKENS = ["input", "steps", "run", "x", ".", "a", "output", "status", "(", ")", "[", "]", "{", "}", ",", ":", "?",
          "+", "-", "*", "/", "%", "==", "!=", "<", ">=", "&&", "||", "!", "in", "has", "size", "matches", "int",
          "double", "string", "timestamp", "duration", "exists", "map", "filter", "all", "'s'", '"q"', "'''", "r'",
          "b'x'", "1", "0", "-9223372036854775808", "9223372036854775807", "18446744073709551615u", "1e308", "0.0",
          "null", "true", "dyn", "type", "\\", "${", "'(a+)+$'", " "]
LEAVES = st.sampled_from(["input", "input.a", "input.items", "steps.s.output", "steps.s.status", "run.tenant",
                          "1", "0", "-1", "2.5", "'x'", "'(a|aa)*$'", "null", "true", "[]", "{}", "[1, 2]",
                          "{'a': 1}", "9223372036854775807", "-9223372036854775808", "18446744073709551615u",
                          "b'\\xff'", "timestamp('2026-01-01T00:00:00Z')", "duration('1s')"])


def _binary(a: str, op: str, b: str) -> str:
    return f"({a} {op} {b})"


EXPRS = st.recursive(LEAVES, lambda inner: st.one_of(
    st.builds(_binary, inner, st.sampled_from(["+", "-", "*", "/", "%", "==", "<", "&&", "||", "in"]), inner),
    st.builds(lambda a, f: f"{f}({a})", inner, st.sampled_from(["size", "int", "double", "string", "type", "has",
                                                                "timestamp", "duration", "bytes", "dyn"])),
    st.builds(lambda a, b: f"{a}.matches({b})", inner, inner),
    st.builds(lambda a, b: f"{a}[{b}]", inner, inner),
    st.builds(lambda a, b, c: f"({a} ? {b} : {c})", inner, inner, inner),
    st.builds(lambda a, m, b: f"{a}.{m}(v, {b})", inner, st.sampled_from(["exists", "all", "map", "filter"]), inner),
    st.builds(lambda a: f"-{a}", inner), st.builds(lambda a: f"!{a}", inner)), max_leaves=6)
JSON = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), st.text(max_size=20)),
                    lambda inner: st.one_of(st.lists(inner, max_size=3),
                                            st.dictionaries(st.text(max_size=6), inner, max_size=3)), max_leaves=10)


@st.composite
def contexts(draw: st.DrawFn) -> dict[str, Any]:
    return {"input": draw(st.dictionaries(st.sampled_from(["a", "items", "coupon", "x"]), JSON, max_size=4)),
            "steps": {"s": {"output": draw(JSON), "status": draw(st.sampled_from(["succeeded", "failed"])),
                            "error": None}},
            "run": {"id": "r", "tenant": draw(st.text(max_size=8)), "workflow": "w", "version": 1}}


def _evaluates_or_refuses(text: str, ctx: dict[str, Any]) -> None:
    EXAMPLES["cel expressions"] += 1
    problems = expressions.check_expression(text)
    assert all(isinstance(p, str) and p for p in problems)
    try:
        value = expressions.evaluate(text, ctx)
    except ExpressionError as exc:
        assert str(exc)
        return
    json.dumps(value, allow_nan=True)  # what a step input or run output can carry


@FUZZ
@given(st.lists(st.sampled_from(TOKENS), min_size=1, max_size=12).map(" ".join), contexts())
def test_token_soup(text: str, ctx: dict[str, Any]) -> None:
    _evaluates_or_refuses(text, ctx)


@FUZZ
@given(EXPRS, contexts())
def test_well_formed_expressions_over_random_runs(text: str, ctx: dict[str, Any]) -> None:
    _evaluates_or_refuses(text, ctx)


@FUZZ
@given(st.text(max_size=60), contexts())
def test_random_text(text: str, ctx: dict[str, Any]) -> None:
    _evaluates_or_refuses(text, ctx)


@FUZZ
@given(st.lists(st.one_of(st.text(max_size=10), EXPRS.map(lambda e: "${" + e + "}"),
                          st.sampled_from(["${", "}", "${'}'}", "${{'a': 1}.a}"])), max_size=4).map("".join),
       contexts())
def test_templates(template: str, ctx: dict[str, Any]) -> None:
    EXAMPLES["cel expressions"] += 1
    assert all(isinstance(p, str) and p for p in expressions.check(template))
    try:
        value = expressions.render({"t": [template]}, ctx)
    except ExpressionError as exc:
        assert str(exc)
        return
    json.dumps(value, allow_nan=True)
