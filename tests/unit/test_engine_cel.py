"""The engine with CEL expressions: evaluation errors fail the step (never raise), shipped workflows run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

try:  # the engine returns CheckPolicy commands; the driver answers them with the test's policy
    from tests.unit.engine_driver import engine
except ImportError:  # the engine that still takes a policy port
    from services.planner.domain import engine  # type: ignore[assignment]
from services.planner.domain import expressions
from services.planner.domain.state import AskApproval, Dispatch, RunState, StepOutcome
from services.planner.domain.workflow import WorkflowDef, build
from services.planner.workflows import SCHEMA, WORKFLOW_DIR, validate
from tests.unit.engine_driver import allow

pytestmark = pytest.mark.timeout(10)

SHIPPED = sorted(WORKFLOW_DIR.glob("*.yaml"))


def wf(steps: list[dict[str, Any]], **extra: Any) -> WorkflowDef:
    return build({"name": "t", "version": 1, "steps": steps, **extra})


def ok(step: str, output: Any = None, comp: bool = False) -> StepOutcome:
    return StepOutcome(step, 1, True, output=output if output is not None else {}, compensation=comp)


def dispatches(cmds: list[Any]) -> list[Dispatch]:
    return [c for c in cmds if isinstance(c, Dispatch)]


# -- evaluation errors at run time -------------------------------------------------------------------
def test_inputs_that_fail_to_evaluate_fail_the_step_and_the_run_compensates() -> None:
    flow = wf([{"id": "a", "tool": "x", "compensate": {"tool": "undo_a", "inputs": {"id": "${steps.a.output.id}"}}},
               {"id": "b", "tool": "y", "depends_on": ["a"], "inputs": {"v": "${steps.a.output.missing.deeper}"}}])
    run, _ = engine.start("r", "t", flow, {}, 0, allow)
    cmds = engine.on_result(run, flow, ok("a", {"id": "a-1"}), 1, allow)
    b = run.steps["b"]
    assert b.status == "failed" and b.error_type == "ExpressionError"
    assert "steps.a.output.missing.deeper" in (b.error or "") and "missing" in (b.error or "")
    assert run.status == "compensating"
    assert (run.error or "").startswith("step b failed: ExpressionError: ")
    [undo] = dispatches(cmds)
    assert (undo.step_id, undo.tool, undo.compensation, undo.inputs) == ("a", "undo_a", True, {"id": "a-1"})
    engine.on_result(run, flow, ok("a", comp=True), 2, allow)
    assert run.status == "failed" and run.steps["a"].compensation == "compensated"


@pytest.mark.parametrize("field", [{"when": "input.amount > 'ten'"}, {"amount": "${input.amount / 0}"},
                                   {"inputs": {"n": "${size(input.amount)}"}},
                                   {"approval": {"role": "ops", "when": "input.nope == 1"}}])
def test_any_evaluation_error_of_a_step_fails_it_with_a_reason(field: dict[str, Any]) -> None:
    flow = wf([{"id": "a", "tool": "x", **field}])
    run, cmds = engine.start("r", "t", flow, {"amount": 10}, 0, allow)
    assert dispatches(cmds) == []
    assert run.status == "failed" and run.steps["a"].error_type == "ExpressionError"
    assert (run.error or "").startswith("step a failed: ExpressionError: ")


def test_compensation_inputs_that_fail_to_evaluate_ask_a_person_instead_of_raising() -> None:
    flow = wf([{"id": "a", "tool": "x", "compensate": {"tool": "undo", "inputs": {"id": "${steps.a.output.id}"}}},
               {"id": "b", "tool": "y", "depends_on": ["a"], "retry": {"max_attempts": 1}}])
    run, _ = engine.start("r", "t", flow, {}, 0, allow)
    engine.on_result(run, flow, ok("a", {"no_id": True}), 1, allow)
    engine.on_result(run, flow, StepOutcome("b", 1, False, error_type="Boom", error_message="x", retryable=False),
                     2, allow)
    assert run.status == "compensation_failed" and "ExpressionError" in (run.error or "")


def test_an_output_that_fails_to_evaluate_fails_the_run() -> None:
    flow = wf([{"id": "a", "tool": "x"}], output={"id": "${steps.a.output.id}"})
    run, _ = engine.start("r", "t", flow, {}, 0, allow)
    engine.on_result(run, flow, ok("a", {"other": 1}), 1, allow)
    assert run.status == "failed" and (run.error or "").startswith("output: ")


# -- shipped workflows ------------------------------------------------------------------------------
def _load(path: Path) -> WorkflowDef:
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert validate(raw, path.name) == []
    return build(raw)


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_workflow_validates(path: Path) -> None:
    _load(path)


def test_order_recovery_runs_on_cel() -> None:
    flow = _load(WORKFLOW_DIR / "order-recovery.yaml")
    order = {"order_id": "o-1", "customer_id": "c-1", "sku": "sku-02", "quantity": 2, "amount": 125.0,
             "amount_cents": 12500}
    run, cmds = engine.start("r", "t", flow, order, 0, allow)
    assert [d.inputs for d in dispatches(cmds)] == [{"sku": "sku-02"}]
    cmds = engine.on_result(run, flow, ok("check_inventory", {"available": 50}), 1, allow)
    sent = {d.step_id: d.inputs for d in dispatches(cmds)}
    assert sent["hold_stock"] == {"sku": "sku-02", "order_id": "o-1", "quantity": 2}
    assert sent["notify"]["body"].startswith("Your order o-1 is delayed") and "125.0" in sent["notify"]["body"]
    engine.on_result(run, flow, ok("hold_stock"), 2, allow)
    [refund] = dispatches(engine.on_result(run, flow, ok("notify"), 3, allow))
    assert refund.inputs["amount"] == 12500
    engine.on_result(run, flow, ok("refund", {"refund_id": "rf-1"}), 4, allow)
    assert run.status == "completed" and run.output == {"refund": {"refund_id": "rf-1"}, "held_stock": True}


def test_order_recovery_skips_the_hold_without_stock() -> None:
    flow = _load(WORKFLOW_DIR / "order-recovery.yaml")
    run, _ = engine.start("r", "t", flow, {"order_id": "o", "customer_id": "c", "sku": "s", "quantity": 2,
                                           "amount": 1.5, "amount_cents": 150}, 0, allow)
    engine.on_result(run, flow, ok("check_inventory", {"available": 0}), 1, allow)
    assert run.steps["hold_stock"].status == "skipped"


FAKE_OUTPUTS = {"open_case": {"case_id": "case-1"}, "recall": {"items": [{"id": "kb-1"}]},
                "draft": {"reply": "Voilà.", "how": "extractive", "sources": ["kb-1"]},
                "block_card": {"card_id": "card-1", "status": "blocked"}}


def _drive(flow: WorkflowDef, run_input: dict[str, Any]) -> tuple[RunState, dict[str, Any]]:
    """Run a workflow to its end: every step succeeds, every approval is granted."""
    run, cmds = engine.start("r", "t", flow, run_input, 0, allow)
    sent: dict[str, Any] = {}
    now = 0
    while cmds:
        cmd, cmds = cmds[0], cmds[1:]
        now += 1
        if isinstance(cmd, AskApproval):
            cmds += engine.on_decision(run, flow, cmd.step_id, True, "ana", "ok", now, allow)
        elif isinstance(cmd, Dispatch) and not cmd.compensation:
            sent[cmd.step_id] = cmd.inputs
            cmds += engine.on_result(run, flow, ok(cmd.step_id, FAKE_OUTPUTS.get(cmd.step_id, {"message_id": "m-1"})),
                                     now, allow)
    return run, sent


@pytest.mark.parametrize("name", ["support-card-block", "support-dispute", "support-reply"])
@pytest.mark.parametrize(("given", "expected"), [({}, "email"), ({"channel": None}, "email"),
                                                 ({"channel": "sms"}, "sms")])
def test_support_workflows_default_the_channel(name: str, given: dict[str, Any], expected: str) -> None:
    flow = _load(WORKFLOW_DIR / f"{name}.yaml")
    run, sent = _drive(flow, {"customer_id": "c-1", "card_id": "card-1", "intent": "request_refund",
                              "text": "où est mon argent ?", **given})
    assert run.status == "completed", run.error
    [message] = [inputs for step, inputs in sent.items() if flow.step(step).tool == "messages.send"]
    assert message["channel"] == expected and message["customer_id"] == "c-1"


def test_support_dispute_renders_text_and_output() -> None:
    run, sent = _drive(_load(WORKFLOW_DIR / "support-dispute.yaml"),
                       {"customer_id": "c-1", "intent": "request_refund", "text": "où est mon argent ?"})
    assert sent["open_case"] == {"customer_id": "c-1", "category": "request_refund", "summary": "où est mon argent ?"}
    assert sent["acknowledge"]["body"].startswith("We opened case case-1 about your payment.")
    assert run.output == {"case_id": "case-1"}


def test_expressions_see_exactly_the_engine_context() -> None:
    run, _ = engine.start("r", "t", wf([{"id": "a", "tool": "x"}]), {}, 0, allow)
    assert set(engine.context(run)) == expressions.VARIABLES


# -- schedule-to-close ----------------------------------------------------------------------------------
def test_schedule_to_close_is_optional_and_read() -> None:
    flow = wf([{"id": "a", "tool": "x"}, {"id": "b", "tool": "x", "timeout_ms": 100, "schedule_to_close_ms": 900}])
    assert flow.step("a").schedule_to_close_ms is None
    assert (flow.step("b").timeout_ms, flow.step("b").schedule_to_close_ms) == (100, 900)


@pytest.mark.parametrize(("value", "valid"), [(1, True), (60_000, True), (0, False), (1.5, False), ("1", False)])
def test_schema_bounds_schedule_to_close(value: Any, valid: bool) -> None:
    raw = {"name": "wf", "version": 1, "steps": [{"id": "a", "tool": "x", "schedule_to_close_ms": value}]}
    errors = list(jsonschema.Draft202012Validator(SCHEMA).iter_errors(raw))
    assert (errors == []) is valid, errors
