"""Engine core v2: the engine never calls out, and an effect that happened is
never dropped. Each test here names the defect of the v1 engine it pins."""

from __future__ import annotations

import pytest

from services.planner.domain import engine as real
from services.planner.domain.state import (
    AskApproval,
    Audited,
    CheckPolicy,
    Dispatch,
    Emit,
    SettleBudget,
    StartTimer,
    StepOutcome,
    Verdict,
)
from services.planner.domain.workflow import build
from tests.unit.engine_driver import ALLOW, allow, engine

pytestmark = pytest.mark.timeout(10)
FLOW = build({"name": "t", "version": 1, "steps": [
    {"id": "pay", "tool": "bank.pay", "timeout_ms": 50, "cost_estimate": 0.5, "retry": {"max_attempts": 2},
     "compensate": {"tool": "bank.refund", "inputs": {"why": "late"}}},
]})
NO_UNDO = build({"name": "t", "version": 1, "steps": [{"id": "mail", "tool": "mail.send", "retry": {"max_attempts": 1}}]})


def timeout(step: str, attempt: int) -> StepOutcome:
    return StepOutcome(step, attempt, False, error_type="StepTimeout", error_message="slow", retryable=True)


def ok(step: str, attempt: int) -> StepOutcome:
    return StepOutcome(step, attempt, True, output={"id": "p-1"}, cost=0.4)


def test_the_engine_asks_policy_through_a_command_and_never_calls_out() -> None:
    run, cmds = real.start("r", "t", FLOW, {}, 0)
    [check] = [c for c in cmds if isinstance(c, CheckPolicy)]
    assert (check.step_id, check.cost_estimate) == ("pay", 0.5) and run.steps["pay"].status == "checking"
    assert not [c for c in cmds if isinstance(c, Dispatch)]
    [d] = [c for c in real.on_verdict(run, FLOW, "pay", ALLOW, 1) if isinstance(c, Dispatch)]
    assert d.attempt == 1 and run.steps["pay"].decision == "allow"


def test_a_success_after_the_last_attempt_timed_out_is_recorded_and_compensated() -> None:
    """v1 returned [] for a result of a step that was no longer dispatched: the payment stood, unrecorded."""
    run, _ = engine.start("r", "t", FLOW, {}, 0, allow)
    engine.on_result(run, FLOW, timeout("pay", 1), 10, allow)
    engine.on_timer(run, FLOW, run.steps["pay"].timer_id, "retry", "pay", 200, allow)
    engine.on_result(run, FLOW, timeout("pay", 2), 300, allow)
    assert run.status == "failed"
    cmds = engine.on_result(run, FLOW, ok("pay", 2), 400, allow)
    [undo] = [c for c in cmds if isinstance(c, Dispatch)]
    assert undo.compensation and undo.tool == "bank.refund"
    assert run.steps["pay"].late and run.steps["pay"].output == {"id": "p-1"}
    assert any(isinstance(c, Emit) and c.type == "StepCompleted" and c.detail.get("late") for c in cmds)
    assert any(isinstance(c, SettleBudget) and c.cost == pytest.approx(0.4) for c in cmds)
    engine.on_result(run, FLOW, StepOutcome("pay", 1, True, compensation=True), 500, allow)
    assert run.steps["pay"].compensation == "compensated" and run.status == "failed"
    assert engine.on_result(run, FLOW, ok("pay", 2), 600, allow) == []  # redelivered: once only


def test_a_success_after_a_cancel_while_retrying_is_compensated() -> None:
    run, _ = engine.start("r", "t", FLOW, {}, 0, allow)
    engine.on_result(run, FLOW, timeout("pay", 1), 10, allow)
    assert run.steps["pay"].status == "retrying"
    engine.on_cancel(run, FLOW, "ann", "wrong customer", 20, allow)
    assert run.status == "cancelled" and run.steps["pay"].status == "cancelled"
    cmds = engine.on_result(run, FLOW, ok("pay", 1), 30, allow)
    assert [c.tool for c in cmds if isinstance(c, Dispatch)] == ["bank.refund"]


def test_a_late_success_without_compensation_asks_a_person() -> None:
    run, _ = engine.start("r", "t", NO_UNDO, {}, 0, allow)
    engine.on_result(run, NO_UNDO, timeout("mail", 1), 10, allow)
    assert run.status == "failed"
    cmds = engine.on_result(run, NO_UNDO, ok("mail", 1), 20, allow)
    assert any(isinstance(c, AskApproval) and c.role == "operations" for c in cmds)
    assert any(isinstance(c, Audited) and c.action == "step.late_success" for c in cmds)


def test_a_step_failed_for_good_emits_its_settlement() -> None:
    run, _ = engine.start("r", "t", FLOW, {}, 0, allow)
    cmds = engine.on_result(run, FLOW, StepOutcome("pay", 1, False, error_type="PermanentError",
                                                   error_message="no"), 10, allow)
    assert [c for c in cmds if isinstance(c, SettleBudget)] == [SettleBudget("pay", 0.0)]


def test_a_verdict_for_a_step_cancelled_meanwhile_still_settles() -> None:
    two = build({"name": "t", "version": 1, "steps": [
        {"id": "a", "tool": "x", "cost_estimate": 1.0}, {"id": "b", "tool": "y", "cost_estimate": 1.0}]})
    run, cmds = real.start("r", "t", two, {}, 0)
    deny = Verdict("deny", ("no",), "p")
    out = real.apply_verdicts(run, two, cmds, {"a": deny, "b": ALLOW}, 1)
    assert run.status == "failed" and run.steps["b"].status == "cancelled"
    assert SettleBudget("b", 0.0) in out and not [c for c in out if isinstance(c, Dispatch)]


def test_schedule_to_close_bounds_the_whole_step() -> None:
    flow = build({"name": "t", "version": 1, "steps": [
        {"id": "a", "tool": "x", "schedule_to_close_ms": 1000, "retry": {"max_attempts": 5}}]})
    run, cmds = engine.start("r", "t", flow, {}, 0, allow)
    [timer] = [c for c in cmds if isinstance(c, StartTimer)]
    [d] = [c for c in cmds if isinstance(c, Dispatch)]
    assert timer.kind == "schedule_to_close" and timer.due_ms == 1000 and d.deadline_ms == 1000
    engine.on_result(run, flow, timeout("a", 1), 10, allow)
    engine.on_timer(run, flow, timer.timer_id, "schedule_to_close", "a", 1000, allow)
    assert run.status == "failed" and run.steps["a"].error_type == "ScheduleToCloseTimeout"
