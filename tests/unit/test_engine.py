"""The run state machine, event by event, without any I/O."""

from __future__ import annotations

from typing import Any

import pytest

from services.planner.domain.state import (
    AskApproval,
    CancelTimer,
    Dispatch,
    ParkDeadLetter,
    RunEnded,
    RunState,
    StartTimer,
    StepOutcome,
    Verdict,
)
from services.planner.domain.workflow import build
from tests.unit.engine_driver import ALLOW, allow, engine

pytestmark = pytest.mark.timeout(10)

def wf(steps: list[dict[str, Any]], **extra: Any) -> Any:
    return build({"name": "t", "version": 1, "steps": steps, **extra})


ORDER = wf([
    {"id": "check", "tool": "commerce.check_inventory", "inputs": {"sku": "${input.sku}"}},
    {"id": "notify", "tool": "commerce.notify", "depends_on": ["check"],
     "compensate": {"tool": "commerce.notify", "inputs": {"body": "sorry"}}},
    {"id": "refund", "tool": "commerce.refund", "depends_on": ["notify"], "amount": "${input.amount}",
     "retry": {"max_attempts": 2, "initial_interval_ms": 100},
     "compensate": {"tool": "commerce.void", "inputs": {"id": "${steps.refund.output.id}"}}},
    {"id": "close", "tool": "cases.close", "depends_on": ["refund"],
     "retry": {"max_attempts": 1}},
], output={"refund": "${steps.refund.output.id}"})


def dispatches(cmds: list[Any]) -> list[Dispatch]:
    return [c for c in cmds if isinstance(c, Dispatch)]


def ok(step: str, attempt: int = 1, output: Any = None, comp: bool = False) -> StepOutcome:
    return StepOutcome(step, attempt, True, output=output or {}, compensation=comp)


def err(step: str, attempt: int = 1, retryable: bool = True, kind: str = "Boom", comp: bool = False) -> StepOutcome:
    return StepOutcome(step, attempt, False, error_type=kind, error_message="x", retryable=retryable,
                       compensation=comp)


def test_linear_run_completes_with_rendered_inputs_and_output() -> None:
    run, cmds = engine.start("r1", "t1", ORDER, {"sku": "A", "amount": 5}, 0, allow)
    [d] = dispatches(cmds)
    assert (d.step_id, d.inputs, d.idempotency_key) == ("check", {"sku": "A"}, "r1:check")
    assert not any(isinstance(c, StartTimer) for c in cmds)  # start-to-close is the executor's to enforce
    assert [d.step_id for d in dispatches(engine.on_result(run, ORDER, ok("check"), 1, allow))] == ["notify"]
    assert [d.step_id for d in dispatches(engine.on_result(run, ORDER, ok("notify"), 2, allow))] == ["refund"]
    engine.on_result(run, ORDER, ok("refund", output={"id": "rf-1"}), 3, allow)
    cmds = engine.on_result(run, ORDER, ok("close"), 4, allow)
    assert run.status == "completed" and run.output == {"refund": "rf-1"}
    assert any(isinstance(c, RunEnded) and c.status == "completed" for c in cmds)


def test_parallel_branches_dispatch_together_and_when_skips() -> None:
    flow = wf([{"id": "a", "tool": "noop"}, {"id": "b", "tool": "noop"},
               {"id": "c", "tool": "noop", "depends_on": ["a", "b"], "when": "input.n > 10"},
               {"id": "d", "tool": "noop", "depends_on": ["c"]}])
    run, cmds = engine.start("r", "t", flow, {"n": 1}, 0, allow)
    assert sorted(d.step_id for d in dispatches(cmds)) == ["a", "b"]
    assert dispatches(engine.on_result(run, flow, ok("a"), 1, allow)) == []
    cmds = engine.on_result(run, flow, ok("b"), 2, allow)
    assert run.steps["c"].status == "skipped"
    assert [d.step_id for d in dispatches(cmds)] == ["d"]


def test_transient_error_retries_with_backoff_then_fails_and_compensates_in_reverse() -> None:
    run, _ = engine.start("r2", "t", ORDER, {"sku": "A", "amount": 5}, 0, allow)
    engine.on_result(run, ORDER, ok("check"), 1, allow)
    engine.on_result(run, ORDER, ok("notify"), 2, allow)
    engine.on_result(run, ORDER, ok("refund", output={"id": "rf"}), 3, allow)
    cmds = engine.on_result(run, ORDER, err("close", retryable=True), 4, allow)  # max_attempts 1
    assert run.status == "compensating"
    [d] = dispatches(cmds)
    assert (d.step_id, d.tool, d.compensation, d.inputs) == ("refund", "commerce.void", True, {"id": "rf"})
    [d] = dispatches(engine.on_result(run, ORDER, ok("refund", comp=True), 5, allow))
    assert (d.step_id, d.tool) == ("notify", "commerce.notify")
    cmds = engine.on_result(run, ORDER, ok("notify", comp=True), 6, allow)
    assert run.status == "failed" and "close" in (run.error or "")
    assert [s.compensation for s in run.steps.values()] == ["", "compensated", "compensated", ""]


def test_retry_timer_redispatches_same_key_next_attempt_and_fires_once() -> None:
    run, _ = engine.start("r3", "t", ORDER, {"sku": "A", "amount": 5}, 0, allow)
    engine.on_result(run, ORDER, ok("check"), 1, allow)
    engine.on_result(run, ORDER, ok("notify"), 2, allow)
    cmds = engine.on_result(run, ORDER, err("refund"), 3, allow)
    [timer] = [c for c in cmds if isinstance(c, StartTimer)]
    assert timer.kind == "retry" and 3 + 80 <= timer.due_ms <= 3 + 100
    [d] = dispatches(engine.on_timer(run, ORDER, timer.timer_id, "retry", "refund", 200, allow))
    assert (d.attempt, d.idempotency_key) == (2, "r3:refund")
    assert engine.on_timer(run, ORDER, timer.timer_id, "retry", "refund", 201, allow) == []


def test_non_retryable_error_class_fails_at_once() -> None:
    flow = wf([{"id": "a", "tool": "x", "retry": {"max_attempts": 5, "non_retryable": ["Declined"]}}])
    run, _ = engine.start("r", "t", flow, {}, 0, allow)
    engine.on_result(run, flow, err("a", kind="Declined"), 1, allow)
    assert run.status == "failed" and run.steps["a"].attempt == 1


def test_executor_timeout_retries_and_a_late_success_of_the_old_attempt_counts() -> None:
    flow = wf([{"id": "a", "tool": "x", "timeout_ms": 50, "retry": {"max_attempts": 3}}])
    run, cmds = engine.start("r", "t", flow, {}, 0, allow)
    cmds = engine.on_result(run, flow, err("a", attempt=1, kind="StepTimeout"), 60, allow)
    assert run.steps["a"].status == "retrying" and run.steps["a"].error_type == "StepTimeout"
    cmds = engine.on_result(run, flow, ok("a", attempt=1), 70, allow)
    assert run.status == "completed"
    assert any(isinstance(c, CancelTimer) for c in cmds)


def test_time_queued_before_a_result_burns_no_attempt() -> None:
    """No planner timer bounds a running attempt: a result an hour later (a backlog after a
    restart) still completes the step on its first attempt."""
    flow = wf([{"id": "a", "tool": "x", "timeout_ms": 50, "retry": {"max_attempts": 2}}])
    run, cmds = engine.start("r", "t", flow, {}, 0, allow)
    assert not [c for c in cmds if isinstance(c, StartTimer)]
    engine.on_result(run, flow, ok("a", attempt=1), 3_600_000, allow)
    assert run.status == "completed" and run.steps["a"].attempt == 1


def test_approval_gate_then_approve_dispatches() -> None:
    flow = wf([{"id": "block", "tool": "bank.block_card", "approval": {"role": "fraud-ops", "timeout_ms": 1000}}])
    run, cmds = engine.start("r", "t", flow, {}, 0, allow)
    [ask] = [c for c in cmds if isinstance(c, AskApproval)]
    assert ask.role == "fraud-ops" and ask.deadline_ms == 1000 and run.status == "waiting_approval"
    assert dispatches(cmds) == []
    cmds = engine.on_decision(run, flow, "block", True, "ana", "verified by phone", 10, allow)
    assert [d.step_id for d in dispatches(cmds)] == ["block"] and run.status == "running"
    assert run.steps["block"].decided_by == "ana"
    with pytest.raises(engine.TransitionError):
        engine.on_decision(run, flow, "block", True, "bob", "again", 11, allow)


def test_policy_require_approval_gates_and_reject_fails_the_run() -> None:
    flow = wf([{"id": "a", "tool": "noop"}, {"id": "b", "tool": "bank.block_card", "depends_on": ["a"],
                                             "compensate": {"tool": "noop"}}])

    def gate(run: RunState, step: Any, inputs: Any, amount: Any) -> Verdict:
        return Verdict("require_approval", ("human",), "p", "fraud") if step.id == "b" else ALLOW

    run, _ = engine.start("r", "t", flow, {}, 0, gate)
    cmds = engine.on_result(run, flow, ok("a"), 1, gate)
    assert [c.role for c in cmds if isinstance(c, AskApproval)] == ["fraud"]
    engine.on_decision(run, flow, "b", False, "ana", "not the customer", 2, gate)
    assert run.status == "failed" and run.steps["b"].error_type == "ApprovalRejected"


def test_approval_timeout_escalates_once_then_rejects() -> None:
    flow = wf([{"id": "a", "tool": "x", "approval": {"role": "ops", "timeout_ms": 100, "on_timeout": "escalate",
                                                     "escalate_to": "lead"}}])
    run, cmds = engine.start("r", "t", flow, {}, 0, allow)
    t1 = [c for c in cmds if isinstance(c, StartTimer)][0]
    cmds = engine.on_timer(run, flow, t1.timer_id, "approval_deadline", "a", 100, allow)
    assert [c.role for c in cmds if isinstance(c, AskApproval)] == ["lead"]
    t2 = [c for c in cmds if isinstance(c, StartTimer)][0]
    engine.on_timer(run, flow, t2.timer_id, "approval_deadline", "a", 200, allow)
    assert run.status == "failed" and run.steps["a"].error_type == "ApprovalTimeout"


def test_policy_deny_fails_without_dispatch() -> None:
    flow = wf([{"id": "a", "tool": "x"}])
    run, cmds = engine.start("r", "t", flow, {}, 0, lambda *a: Verdict("deny", ("budget exhausted",)))
    assert dispatches(cmds) == [] and run.status == "failed" and "budget" in (run.error or "")


def test_cancel_waits_for_in_flight_step_then_compensates_it() -> None:
    flow = wf([{"id": "a", "tool": "x", "compensate": {"tool": "undo"}},
               {"id": "b", "tool": "y", "compensate": {"tool": "undo_b"}}])
    run, _ = engine.start("r", "t", flow, {}, 0, allow)
    engine.on_result(run, flow, ok("a"), 1, allow)
    cmds = engine.on_cancel(run, flow, "ana", "customer called back", 2, allow)
    assert dispatches(cmds) == [] and run.status == "failing"  # b is still in flight
    cmds = engine.on_result(run, flow, ok("b"), 3, allow)
    assert [(d.step_id, d.tool) for d in dispatches(cmds)] == [("b", "undo_b")]
    [d] = dispatches(engine.on_result(run, flow, ok("b", comp=True), 4, allow))
    assert d.tool == "undo"
    engine.on_result(run, flow, ok("a", comp=True), 5, allow)
    assert run.status == "cancelled"


def test_compensation_that_keeps_failing_parks_a_dead_letter_and_asks_a_person() -> None:
    flow = wf([{"id": "a", "tool": "x", "compensate": {"tool": "undo", "retry": {"max_attempts": 2}}},
               {"id": "b", "tool": "y", "depends_on": ["a"], "retry": {"max_attempts": 1}}])
    run, _ = engine.start("r", "t", flow, {}, 0, allow)
    engine.on_result(run, flow, ok("a"), 1, allow)
    engine.on_result(run, flow, err("b", retryable=False), 2, allow)
    cmds = engine.on_result(run, flow, err("a", comp=True), 3, allow)
    [timer] = [c for c in cmds if isinstance(c, StartTimer)]
    engine.on_timer(run, flow, timer.timer_id, "comp_retry", "a", 500, allow)
    cmds = engine.on_result(run, flow, err("a", attempt=2, comp=True), 600, allow)
    assert run.status == "compensation_failed"
    assert any(isinstance(c, ParkDeadLetter) for c in cmds)
    assert [c.role for c in cmds if isinstance(c, AskApproval)] == ["operations"]


def test_run_deadline_fails_the_run() -> None:
    flow = wf([{"id": "a", "tool": "x"}], deadline_ms=1000)
    run, cmds = engine.start("r", "t", flow, {}, 0, allow)
    [deadline] = [c for c in cmds if isinstance(c, StartTimer) and c.kind == "run_deadline"]
    engine.on_timer(run, flow, deadline.timer_id, "run_deadline", None, 1000, allow)
    assert run.status == "failing"  # a is still in flight
    engine.on_result(run, flow, err("a", retryable=False), 1001, allow)
    assert run.status == "failed" and "deadline" in (run.error or "")


def test_duplicate_and_stale_results_are_ignored() -> None:
    flow = wf([{"id": "a", "tool": "x"}, {"id": "b", "tool": "x", "depends_on": ["a"]}])
    run, _ = engine.start("r", "t", flow, {}, 0, allow)
    first = engine.on_result(run, flow, ok("a"), 1, allow)
    assert engine.on_result(run, flow, ok("a"), 2, allow) == []
    assert len(dispatches(first)) == 1


def test_state_round_trips_through_json() -> None:
    run, _ = engine.start("r", "t", ORDER, {"sku": "A"}, 0, allow)
    assert RunState.from_dict(run.to_dict()) == run
    assert engine.advance(run, ORDER, 1, allow) == []  # nothing new is ready: check is in flight


def test_a_legacy_step_timeout_timer_still_retries_and_a_late_executor_timeout_keeps_the_retry() -> None:
    """Runs saved before start-to-close moved to the executor still hold planner step timers."""
    flow = wf([{"id": "a", "tool": "x", "timeout_ms": 50, "retry": {"max_attempts": 3}}])
    run, cmds = engine.start("r", "t", flow, {}, 0, allow)
    run.steps["a"].timer_id = "r:a:timeout:1"
    cmds = engine.on_timer(run, flow, "r:a:timeout:1", "step_timeout", "a", 60, allow)
    [retry] = [c for c in cmds if isinstance(c, StartTimer)]
    assert engine.on_result(run, flow, err("a", attempt=1, kind="StepTimeout"), 70, allow) == []
    assert run.steps["a"].timer_id == retry.timer_id
    [d] = dispatches(engine.on_timer(run, flow, retry.timer_id, "retry", "a", 500, allow))
    assert d.attempt == 2
