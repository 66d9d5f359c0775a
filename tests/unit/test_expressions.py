"""Workflow expressions (CEL): templates, typed results, every failure an ExpressionError."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from services.planner.domain import expressions
from services.planner.domain.expressions import ExpressionError, check, evaluate, parse, render
from services.planner.domain.workflow import semantic_errors

pytestmark = pytest.mark.timeout(10)

CTX: dict[str, Any] = {
    "input": {"sku": "A-1", "amount": 150, "price": 99.5, "quantity": 2, "name": "Zoë", "channel": None,
              "tags": ["vip", "fr"], "count": 3, "nested": {"items": [{"id": "x"}, {"id": "y"}]}},
    "steps": {"check": {"status": "succeeded", "output": {"available": 5}, "error": None},
              "refund": {"status": "pending", "output": None, "error": None}},
    "run": {"id": "r-1", "tenant": "t", "workflow": "w", "version": 1},
}


# -- non-ASCII --------------------------------------------------------------------------------------
def test_non_ascii_string_literal_round_trips() -> None:
    assert evaluate("'café'", CTX) == "café"
    assert evaluate("input.name == 'Zoë'", CTX) is True
    assert render("${'Zürich'}", CTX) == "Zürich"


def test_template_with_non_ascii_text_and_literal() -> None:
    assert render("Reçu, ${input.name}: ${input.name == 'Zoë' ? 'oui' : 'non'}", CTX) == "Reçu, Zoë: oui"
    assert render({"body": ["« ${input.sku} »"]}, CTX) == {"body": ["« A-1 »"]}


# -- the language ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "expected"), [
    ("input.nested.items[1].id", "y"),
    ("input['sku']", "A-1"),
    ("'vip' in input.tags", True),
    ("size(input.tags)", 2),
    ("has(input.sku)", True),
    ("has(input.coupon)", False),
    ("has(input.coupon) ? input.coupon : 'none'", "none"),
    ("input.channel == null", True),
    ("input.channel != null ? input.channel : 'email'", "email"),
    ("steps.refund.output == null", True),
    ("input.amount > 100", True),
    ("input.amount > 100.5", True),  # int against double compares by value
    ("input.price < 100", True),
    ("input.amount == 150.0", True),
    ("steps.check.output.available >= input.quantity", True),
    ("steps.check.status == 'succeeded' && !(input.count < 1)", True),
    ("false && input.missing.deeper", False),  # && and || absorb an error on the side that does not decide
])
def test_cel_evaluates(text: str, expected: Any) -> None:
    got = evaluate(text, CTX)
    assert got == expected and type(got) is type(expected)


def test_whole_template_keeps_the_type_and_results_are_plain_python() -> None:
    assert render("${input.amount}", CTX) == 150
    assert render("  ${input.price}  ", CTX) == 99.5
    assert render("${input.nested}", CTX) == {"items": [{"id": "x"}, {"id": "y"}]}
    assert render("${input.channel}", CTX) is None
    out = render("${{'n': [1, 2.5, true, null, 'é'], 'm': {'k': input.count}}}", CTX)
    assert out == {"n": [1, 2.5, True, None, "é"], "m": {"k": 3}}
    assert [type(v) for v in out["n"]] == [int, float, bool, type(None), str]
    assert type(out) is dict and type(out["n"]) is list


def test_interpolation_writes_text() -> None:
    assert render("n=${input.count} ok=${input.amount > 1} none=[${input.channel}] p=${input.price}", CTX) == \
        "n=3 ok=true none=[] p=99.5"
    assert render("tags ${input.tags}", CTX) == 'tags ["vip", "fr"]'


def test_render_walks_dicts_and_lists_and_leaves_plain_values_alone() -> None:
    template = {"a": ["${input.sku}", 7, None, {"b": "${input.count}"}], "c": "no template", "d": True}
    before = copy.deepcopy(template)
    assert render(template, CTX) == {"a": ["A-1", 7, None, {"b": 3}], "c": "no template", "d": True}
    assert template == before


def test_braces_inside_an_expression_do_not_end_it() -> None:
    assert render("${{'a': input.sku}.a}", CTX) == "A-1"
    assert render("x ${input.sku == '}' ? 'brace' : 'no'} y", CTX) == "x no y"
    assert render("${'${'}", CTX) == "${"


def test_each_distinct_expression_compiles_once() -> None:
    assert parse("input.amount > 1") is parse("input.amount > 1")


# -- every failure is an ExpressionError naming the expression ------------------------------------
@pytest.mark.parametrize("text", [
    "input.missing.deeper > 1",  # missing key
    "input.channel.deeper",      # null is not a map
    "1/0",                       # division by zero
    "1 % 0",
    "'a' < 1",                   # no such overload
    "input.sku + 1",
    "input.tags[5]",             # index out of range
    "int('x')",                  # function error
    "9223372036854775807 + 1",   # overflow
    "nosuch.var",                # unknown variable
    "input.sku.nosuch()",        # unknown function
    "has(input.missing.deeper)",
])
def test_evaluation_errors_are_expression_errors_naming_the_expression(text: str) -> None:
    with pytest.raises(ExpressionError) as caught:
        evaluate(text, CTX)
    assert text in str(caught.value)
    with pytest.raises(ExpressionError) as caught:
        render({"k": [f"before ${{{text}}} after"]}, CTX)
    assert text in str(caught.value)


def test_a_missing_key_says_which_key() -> None:
    with pytest.raises(ExpressionError, match="missing"):
        render("${input.missing}", CTX)


@pytest.mark.parametrize("text", ["b'\\xff'", "timestamp('2024-01-01T00:00:00Z')", "duration('1h')"])
def test_a_value_that_is_not_json_is_an_error(text: str) -> None:
    with pytest.raises(ExpressionError, match="JSON"):
        render(f"${{{text}}}", CTX)


def test_a_context_value_cel_cannot_hold_is_an_error() -> None:
    with pytest.raises(ExpressionError):
        evaluate("input.x", {"input": {"x": object()}})


def test_syntax_errors_are_expression_errors() -> None:
    with pytest.raises(ExpressionError, match="input.order_id == "):
        parse("input.order_id == ")
    with pytest.raises(ExpressionError, match="unterminated"):
        render("${input.sku", CTX)


# -- check: what validation reports ------------------------------------------------------------------
def test_check_reports_every_bad_expression() -> None:
    errors = check({"a": "${input.x ==}", "b": ["ok ${input.y}", "${}"], "c": "${input.z", "d": 5})
    assert len(errors) == 3, errors
    assert check({"a": "${input.x} and ${steps.s.output['k'][0]}", "b": "${run.id}", "c": "plain"}) == []


def test_check_reports_unknown_functions_with_the_cel_replacement() -> None:
    [error] = check("${coalesce(input.channel, 'email')}")
    assert "coalesce" in error and "has(" in error
    [error] = check("${input.sku.lowerAscii()}")
    assert "lowerAscii" in error
    assert check("${size(input.tags) > 0 && input.sku.startsWith('A') && string(input.count) == '3'}") == []


FUNCTION_SAMPLES = {
    "size": "size([1])", "contains": "'ab'.contains('a')", "startsWith": "'ab'.startsWith('a')",
    "endsWith": "'ab'.endsWith('b')", "matches": "'ab'.matches('^a')", "int": "int(1.5)", "uint": "uint(1)",
    "double": "double(1)", "string": "string(1)", "bytes": "size(bytes('a'))",
    "timestamp": "string(timestamp('2024-01-01T00:00:00Z'))", "duration": "string(duration('1s'))",
    "type": "type(1) == int", "dyn": "dyn(1)", "getFullYear": "timestamp('2024-01-01T00:00:00Z').getFullYear()",
    "getMonth": "timestamp('2024-01-01T00:00:00Z').getMonth()",
    "getDayOfYear": "timestamp('2024-01-01T00:00:00Z').getDayOfYear()",
    "getDayOfMonth": "timestamp('2024-01-01T00:00:00Z').getDayOfMonth()",
    "getDate": "timestamp('2024-01-01T00:00:00Z').getDate()",
    "getDayOfWeek": "timestamp('2024-01-01T00:00:00Z').getDayOfWeek()",
    "getHours": "timestamp('2024-01-01T00:00:00Z').getHours()",
    "getMinutes": "timestamp('2024-01-01T00:00:00Z').getMinutes()",
    "getSeconds": "duration('3s').getSeconds()", "getMilliseconds": "duration('3s').getMilliseconds()",
}


def test_every_function_validation_allows_exists_in_the_library() -> None:
    assert set(FUNCTION_SAMPLES) == expressions.FUNCTIONS
    for name, text in FUNCTION_SAMPLES.items():
        assert check(f"${{{text}}}") == [], name
        evaluate(text, CTX)  # raises ExpressionError if the library lacks it


def test_check_reports_unknown_variables_but_not_comprehension_variables() -> None:
    [error] = check("${inputs.sku}")
    assert "inputs" in error
    assert check("${input.tags.exists(t, t == 'vip') && input.tags.all(x, size(x) > 0)}") == []
    assert check("${input.tags.map(t, t + '!')}") == []


# -- deploy-time validation of compensation inputs and the run output --------------------------------
def _workflow(**extra: Any) -> dict[str, Any]:
    step: dict[str, Any] = {"id": "a", "tool": "x.y", "inputs": {"k": "${input.k}"}}
    step.update(extra.pop("step", {}))
    return {"name": "w", "version": 1, "steps": [step], **extra}


def test_malformed_compensation_inputs_are_refused_with_their_path() -> None:
    raw = _workflow(step={"compensate": {"tool": "x.undo", "inputs": {"id": "${steps.a.output.id ==}"}}})
    errors = semantic_errors(raw)
    assert [e.split(":")[0] for e in errors] == ["steps[0].compensate.inputs"], errors


def test_malformed_output_is_refused_with_its_path() -> None:
    errors = semantic_errors(_workflow(output={"id": "${steps.a.output.id)}"}))
    assert [e.split(":")[0] for e in errors] == ["output"], errors


def test_well_formed_workflow_has_no_errors() -> None:
    raw = _workflow(output={"id": "${steps.a.output.id}"}, step={
        "when": "has(input.k)", "compensate": {"tool": "x.undo", "inputs": {"id": "${steps.a.output.id}"}}})
    assert semantic_errors(raw) == []


def test_when_conditions_are_compiled() -> None:
    errors = semantic_errors(_workflow(step={"when": "input.k ==", "approval": {"role": "r", "when": "(("}}))
    assert sorted(e.split(":")[0] for e in errors) == ["steps[0].approval.when", "steps[0].when"], errors

