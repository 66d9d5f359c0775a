"""Fail closed: an amount or cost a rule needs that is missing or unreadable makes the rule
apply when it restricts (require_approval, deny) and never when it allows; and the amount the
policy judges is the field the connector pays, in its declared unit (services/common/amounts.py).

The wire tests go the way a step goes: the planner's request to policy (ports._step_request), the
policy's gRPC adapter (grpc_api.request_from_pb) and the rules of the shipped default policy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from services.common.amounts import AmountField, load_amount_fields, parse_amount_fields
from services.common.errors import ConfigError
from services.planner.domain import expressions
from services.planner.domain.state import CheckPolicy, RunState
from services.planner.domain.workflow import build
from services.planner.ports import _step_request
from services.policy.adapters.grpc_api import request_from_pb
from services.policy.adapters.policy_files import load_policy_dir
from services.policy.domain.decide import build_request, decide, evaluate_rules
from services.policy.domain.model import BudgetCheck, BudgetState, PolicySet
from services.policy.domain.parse import combine, parse_policy_file

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(20)
CONNECTORS = REPO / "services/executor/connectors.yaml"


def policy(rules: list[dict[str, Any]], **extra: Any) -> PolicySet:
    return combine([parse_policy_file({"id": "p", "version": 1, "rules": rules, **extra}, "p.yaml")])


PAY = [{"id": "big-pay", "match": {"tool": "x.pay"}, "when": {"amount_gt": 100}, "effect": "require_approval",
        "role": "finance"}]


# -- the domain: unknown values ----------------------------------------------------------------
def test_a_missing_amount_makes_a_restrictive_rule_apply() -> None:
    """Old code: a request without an amount was judged as amount 0 and allowed."""
    out = evaluate_rules(policy(PAY), build_request(tenant="t", action="run_step", tool="x.pay"))
    assert (out.effect, out.approval_role) == ("require_approval", "finance")
    assert "amount is missing" in out.reasons[0] and "fail closed" in out.reasons[0]


def test_an_unreadable_amount_makes_a_restrictive_rule_apply() -> None:
    """Old code: NaN was refused as an invalid argument; the planner sent 0 instead and it passed."""
    out = evaluate_rules(policy(PAY), build_request(tenant="t", action="run_step", tool="x.pay",
                                                    amount=float("nan")))
    assert out.effect == "require_approval" and "unreadable" in out.reasons[0]


def test_an_allow_rule_never_applies_on_an_unknown_amount() -> None:
    small_ok = [{"id": "small-ok", "match": {"tool": "x.pay"}, "when": {"amount_lt": 10}, "effect": "allow"}]
    p = policy(small_ok, default_effect="deny")
    assert evaluate_rules(p, build_request(tenant="t", action="run_step", tool="x.pay", amount=5)).effect == "allow"
    assert evaluate_rules(p, build_request(tenant="t", action="run_step", tool="x.pay")).effect == "deny"


def test_an_unknown_cost_makes_a_cost_rule_apply() -> None:
    pricey = [{"id": "pricey", "match": {}, "when": {"cost_gt": 5}, "effect": "deny"}]
    out = evaluate_rules(policy(pricey), build_request(tenant="t", action="run_step", tool="x.y",
                                                       cost_estimate=float("nan")))
    assert out.effect == "deny" and "cost_estimate" in out.reasons[0]


def test_a_budget_cannot_hold_an_unknown_cost() -> None:
    p = policy([], budgets={"*": {"limit": 10.0, "window": "day"}})
    r = build_request(tenant="t", action="run_step", tool="x.y", cost_estimate=float("nan"))
    state = BudgetState(tenant="t", limit=10.0, spent=0.0, reserved=0.0)
    out = decide(p, r, evaluate_rules(p, r), BudgetCheck(state=state, policy_ref="p@v1"), "")
    assert (out.effect, out.policy_id) == ("deny", "p@v1:budget") and "fail closed" in out.reasons[-1]


def test_rules_without_thresholds_do_not_care() -> None:
    out = evaluate_rules(policy([{"id": "ok", "match": {"tool": "x.*"}, "effect": "allow"}]),
                         build_request(tenant="t", action="run_step", tool="x.pay"))
    assert out.effect == "allow"


# -- the wire: what the planner sends ----------------------------------------------------------
def _through_the_wire(tool: str, amount: Any, inputs: dict[str, Any], fields: dict[str, AmountField],
                      p: PolicySet) -> Any:
    run = RunState(run_id="r1", tenant="shop", workflow="w", version=1, input={}, created_at=0, updated_at=0)
    pb = _step_request(run, CheckPolicy("s", tool, inputs, amount, 0.0))
    return evaluate_rules(p, request_from_pb(pb, "shop", fields))


@pytest.mark.parametrize("amount", ["12O", "", "1e999", True, {"v": 1}, -3])
def test_an_amount_the_planner_cannot_read_is_not_allowed(amount: Any) -> None:
    """Old code: the planner turned an amount it could not parse into 0.0, which passed every rule."""
    assert _through_the_wire("x.pay", amount, {}, {}, policy(PAY)).effect == "require_approval"


def test_a_step_without_an_amount_is_missing_not_zero() -> None:
    assert _through_the_wire("x.pay", None, {}, {}, policy(PAY)).effect == "require_approval"
    assert _through_the_wire("x.pay", "99.5", {}, {}, policy(PAY)).effect == "allow"


# -- one declared amount field, used by both sides ----------------------------------------------
def _refund(amount_cents: Any, amount: Any = 1) -> Any:
    """The shipped order-recovery refund step, rendered as the engine renders it, judged by the shipped
    default policy with the shipped amount declarations."""
    wf = build(__import__("yaml").safe_load((REPO / "workflows/order-recovery.yaml").read_text()))
    step = wf.step("refund")
    order = {"order_id": "o-1", "amount": amount, "amount_cents": amount_cents}
    ctx = {"input": order, "steps": {}, "run": {}}
    inputs = expressions.render(step.inputs, ctx)
    step_amount = expressions.render(step.amount, ctx) if step.amount is not None else None
    return _through_the_wire(step.tool, step_amount, inputs, load_amount_fields(CONNECTORS),
                             load_policy_dir(REPO / "policies"))


def test_a_refund_is_judged_on_the_cents_the_connector_pays() -> None:
    """Old code judged the step's separate `amount` (here 1) and allowed a refund of 150.00."""
    out = _refund(15000)
    assert out.effect == "require_approval" and out.policy_id == "default@v1:refunds-over-100-need-approval"
    assert "amount 150" in out.reasons[0]
    assert _refund(10000, amount=99999).effect == "allow"    # 100.00 is not over 100, whatever `amount` says
    assert _refund(500001).effect == "deny"                  # 5000.01 goes to the refunds desk
    assert _refund(None).effect == "deny"                    # a null amount: both refund rules apply
    assert _refund("15k").effect == "deny"
    assert _refund(150.5).effect == "deny"                   # no connector pays half a cent


def test_amount_declarations_are_checked_at_load() -> None:
    assert load_amount_fields(CONNECTORS)["commerce.refund"] == AmountField("amount", "cents")
    tool = {"method": "POST", "path": "/v1/pay/{account}", "body": ["sum"]}
    assert parse_amount_fields({"connectors": {"b": {"tools": {"pay": {**tool, "amount": {
        "field": "sum", "unit": "micros"}}}}}}, "f.yaml") == {"b.pay": AmountField("sum", "micros")}
    for spec, message in [({"field": "total"}, "'total' is not an input the tool sends"),
                          ({"field": "sum", "unit": "pennies"}, "unit: expected one of"),
                          ("sum", "expected {field:")]:
        with pytest.raises(ConfigError, match=message):
            parse_amount_fields({"connectors": {"b": {"tools": {"pay": {**tool, "amount": spec}}}}}, "f.yaml")


@pytest.mark.parametrize(("raw", "unit", "value"), [(15000, "cents", 150.0), ("15000", "cents", 150.0),
                                                    (2.5, "units", 2.5), (1_500_000, "micros", 1.5)])
def test_amounts_read_in_their_unit(raw: Any, unit: str, value: float) -> None:
    assert AmountField("a", unit).read({"a": raw}) == (value, "")


@pytest.mark.parametrize("raw", [None, "", "x", -1, float("inf"), float("nan"), True, 1.5, [1]])
def test_unreadable_cents(raw: Any) -> None:
    amount, why = AmountField("a", "cents").read({"a": raw})
    assert amount is None and "'a'" in why


# -- plug-in tools declare their amount input in the same file ----------------------------------
PLUGIN_DOC = {"connectors": {}, "amounts": {"crm.issue_credit": {"field": "credit_cents", "unit": "cents"}}}


def test_a_plug_in_tool_declares_its_amount_beside_the_connectors() -> None:
    fields = parse_amount_fields(PLUGIN_DOC, "f.yaml")
    assert fields == {"crm.issue_credit": AmountField("credit_cents", "cents")}
    out = _through_the_wire("crm.issue_credit", 1, {"credit_cents": 25000}, fields,
                            policy([{"id": "big", "match": {"tool": "crm.*"}, "when": {"amount_gt": 100},
                                     "effect": "require_approval", "role": "finance"}]))
    assert out.effect == "require_approval" and "amount 250" in out.reasons[0]
    tool = {"method": "POST", "path": "/p", "body": ["sum"], "amount": {"field": "sum"}}
    with pytest.raises(ConfigError, match="declared twice"):
        parse_amount_fields({"connectors": {"b": {"tools": {"pay": tool}}}, "amounts": {"b.pay": {"field": "x"}}},
                            "f.yaml")


def test_the_executor_refuses_a_plug_in_call_whose_declared_amount_is_unreadable() -> None:
    from services.common.errors import InvalidArgument
    from services.executor.adapters.toolbox import Call, Toolbox

    paid: list[Any] = []
    box = Toolbox({"crm.issue_credit": lambda inputs, call: paid.append(inputs["credit_cents"])},
                  amounts=parse_amount_fields(PLUGIN_DOC, "f.yaml"))
    call = Call("t", "r", "s", 1, "r:s", "interactive", 5.0)
    box.run("crm.issue_credit", {"credit_cents": 25000}, call)
    with pytest.raises(InvalidArgument, match="credit_cents"):
        box.run("crm.issue_credit", {"credit_cents": "250.50"}, call)
    assert paid == [25000]
