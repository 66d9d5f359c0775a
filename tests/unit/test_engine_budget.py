"""Budget settlements the engine emits: every step that may hold a reservation or that cost
anything is settled, once per cost it reached; the store releases the hold and charges the
cumulative cost (tests/integration/test_budget_store.py)."""

from __future__ import annotations

from typing import Any

import pytest

from services.planner import wire
from services.planner.domain import engine as real
from services.planner.domain.state import CheckPolicy, Dispatch, SettleBudget, StepOutcome, Verdict
from services.planner.domain.workflow import build
from tests.unit.engine_driver import allow, engine
from tests.unit.planner_twins import mesh
from tests.unit.test_planner_handlers import PAY, result, start

pytestmark = pytest.mark.timeout(10)


UNESTIMATED = build({"name": "t", "version": 1, "steps": [{"id": "ask", "tool": "llm.reply"}]})
TWO = build({"name": "t", "version": 1, "steps": [
    {"id": "a", "tool": "x", "retry": {"max_attempts": 3}},
    {"id": "b", "tool": "y", "depends_on": ["a"], "cost_estimate": 1.0}]})


def settles(cmds: list[Any]) -> list[SettleBudget]:
    return [c for c in cmds if isinstance(c, SettleBudget)]


def test_a_step_without_an_estimate_is_still_metered() -> None:
    """Old code settled only steps with a cost estimate: a model call without one was never charged."""
    run, _ = engine.start("r", "t", UNESTIMATED, {}, 0, allow)
    cmds = engine.on_result(run, UNESTIMATED, StepOutcome("ask", 1, True, output={}, cost=0.7), 10, allow)
    assert settles(cmds) == [SettleBudget("ask", 0.7)]


def test_a_free_step_without_an_estimate_settles_nothing() -> None:
    run, _ = engine.start("r", "t", UNESTIMATED, {}, 0, allow)
    assert settles(engine.on_result(run, UNESTIMATED, StepOutcome("ask", 1, True, output={}), 10, allow)) == []


def test_a_late_cost_is_settled_again_at_the_new_total() -> None:
    run, _ = engine.start("r", "t", UNESTIMATED, {}, 0, allow)
    timeout = StepOutcome("ask", 1, False, error_type="StepTimeout", error_message="slow", retryable=False)
    assert settles(engine.on_result(run, UNESTIMATED, timeout, 10, allow)) == []
    late = engine.on_result(run, UNESTIMATED, StepOutcome("ask", 1, True, output={}, cost=0.3), 20, allow)
    assert settles(late) == [SettleBudget("ask", 0.3)]
    again = engine.on_result(run, UNESTIMATED, StepOutcome("ask", 1, True, output={}, cost=0.3), 30, allow)
    assert settles(again) == []


def test_a_costed_step_that_never_got_its_verdict_recorded_is_released_when_the_run_ends() -> None:
    """A planner that reserved for step b and died before committing leaves b pending in the stored
    run, while policy holds b's reservation. Old code released only steps with a recorded decision,
    so a cancel now left that hold in place until its window ended."""
    run, _ = real.start("r", "t", TWO, {}, 0)
    real.apply_verdicts(run, TWO, [c for c in real.advance(run, TWO, 0)], {"a": allow()}, 1)
    assert run.steps["b"].status == "pending" and not run.steps["b"].decision
    cmds = real.on_cancel(run, TWO, "ann", "stop", 2)
    assert SettleBudget("b", 0.0) in settles(cmds)


def test_a_failure_and_a_late_success_in_one_batch_are_both_settled() -> None:
    """Old code settled a step once per batch: the late success's cost, in the same batch as the
    failure, was never reconciled."""
    m = mesh(PAY)
    start(m)
    m.planner.handle([result(m, "check")])
    m.planner.handle([result(m, "charge", ok=False, offset=1), result(m, "charge", ok=True, offset=2, late=True)])
    assert m.policy.reconciled == [("run-1", "check", 0.25), ("run-1", "charge", 0.0), ("run-1", "charge", 0.25)]


GATED = build({"name": "g", "version": 1, "steps": [
    {"id": "block", "tool": "bank.block_card", "cost_estimate": 0.6, "inputs": {"card": "${input.card}"},
     "approval": {"role": "fraud-ops"}}]})


def _gated_run() -> Any:
    run, cmds = real.start("r", "t", GATED, {"card": "c-1"}, 0)
    real.apply_verdicts(run, GATED, cmds, {"block": Verdict("require_approval", ("human",), "p", "fraud-ops",
                                                            inputs={"card": "tok-1"}, masked=True)}, 1)
    assert run.steps["block"].status == "waiting_approval"
    return run


def test_an_approved_step_has_its_budget_checked_again_before_it_runs() -> None:
    """Old code dispatched an approved step at once: approved after its hold expired (the next
    morning), it ran with nothing held while other steps had used the freed headroom."""
    run = _gated_run()
    cmds = real.on_decision(run, GATED, "block", True, "ana", "ok", 3_600_001)
    assert not [c for c in cmds if isinstance(c, Dispatch)]
    [check] = [c for c in cmds if isinstance(c, CheckPolicy)]
    assert check.recheck and check.cost_estimate == 0.6 and run.steps["block"].decided_by == "ana"
    # The budget no longer fits: denied by the budget, as any step is; the hold (if any) is released.
    denied = real.apply_verdicts(run, GATED, cmds, {"block": Verdict("deny", ("budget exhausted: ...",),
                                                                     "p:budget")}, 3_600_002)
    assert not [c for c in denied if isinstance(c, Dispatch)] and SettleBudget("block", 0.0) in settles(denied)
    assert run.status == "failed" and run.steps["block"].error_type == "PolicyDenied"
    assert "budget exhausted" in (run.error or "")


def test_an_approved_step_that_still_fits_runs_with_the_inputs_the_person_approved() -> None:
    run = _gated_run()
    cmds = real.on_decision(run, GATED, "block", True, "ana", "ok", 10)
    # The policy's masked answer to a re-check is not applied again: what was approved is what runs.
    out = real.apply_verdicts(run, GATED, cmds, {"block": Verdict("allow", ("budget ok",), "p",
                                                                  inputs={"card": "tok-2"}, masked=True)}, 11)
    [dispatch] = [c for c in out if isinstance(c, Dispatch)]
    assert dispatch.inputs == {"card": "tok-1"} and run.steps["block"].decision == "approved"


def test_steps_that_never_reserved_are_not_settled_when_the_run_fails() -> None:
    """Old code released every costed step of a failing run, also pending ones that never asked
    policy: a call, an audit record and a 30-day reservation hash each, for nothing."""
    flow = build({"name": "t", "version": 1, "steps": [
        {"id": "a", "tool": "x", "cost_estimate": 0.1},
        {"id": "b", "tool": "y", "depends_on": ["a"], "cost_estimate": 1.0},
        {"id": "c", "tool": "y", "depends_on": ["b"], "cost_estimate": 1.0}]})
    run, cmds = real.start("r", "t", flow, {}, 0)
    real.apply_verdicts(run, flow, cmds, {"a": allow()}, 1)
    cmds = real.on_result(run, flow, StepOutcome("a", 1, False, error_type="E", error_message="no"), 2)
    assert settles(cmds) == [SettleBudget("a", 0.0)] and run.status == "failed"


@pytest.mark.parametrize("cost", [float("nan"), float("inf"), -1.0, 1e300])
def test_a_cost_that_is_not_an_amount_is_charged_as_the_estimate(cost: float) -> None:
    """A NaN, infinite, negative or absurd cost (a broken plug-in) is charged as what the step held:
    old code carried it into the run's cost and the settlement, which policy refused for good."""
    flow = build({"name": "t", "version": 1, "steps": [{"id": "a", "tool": "x", "cost_estimate": 0.2}]})
    run, cmds = real.start("r", "t", flow, {}, 0)
    real.apply_verdicts(run, flow, cmds, {"a": allow()}, 1)
    cmds = real.on_result(run, flow, StepOutcome("a", 1, True, output={}, cost=cost), 2)
    assert settles(cmds) == [SettleBudget("a", 0.2)] and run.cost == 0.2 and run.status == "completed"


GATE = {"name": "gate", "version": 1, "steps": [
    {"id": "check", "tool": "noop"},
    {"id": "block", "tool": "bank.block_card", "depends_on": ["check"], "cost_estimate": 0.5,
     "approval": {"role": "fraud-ops"}}]}


def _decision(m: Any, step: str, offset: int = 0) -> Any:
    return m.publisher.inbound("commands", "run-1", wire.command("t1", "run-1", "user:ana", "ApproveStep",
                                                                 {"step_id": step, "reason": "ok"}), offset)


def test_an_approval_asks_policy_for_the_budget_again_and_a_budget_deny_fails_the_step() -> None:
    m = mesh(GATE)
    m.planner.handle([m.publisher.inbound("commands", "run-1", wire.command(
        "t1", "run-1", "api:ann", "StartWorkflow", {"workflow": "gate", "input_json": "{}"}))])
    m.planner.handle([result(m, "check")])
    assert m.runs.load("t1", "run-1").run.status == "waiting_approval"
    m.policy.verdicts["bank.block_card:recheck"] = Verdict("deny", ("budget exhausted: tenant t1 has 0.2 left",),
                                                          "test@v1:budget")
    m.planner.handle([_decision(m, "block", offset=1)])
    run = m.runs.load("t1", "run-1").run
    assert m.policy.rechecked == [("run-1", "block")]
    assert "block" not in [r["step_id"] for r in m.publisher.decoded("step_requests")]
    assert run.status == "failed" and "budget exhausted" in (run.error or "")


def test_a_settlement_policy_refuses_is_audited_and_the_run_still_ends() -> None:
    """Old code: the refusal (a tenant without a budget, a NaN cost) was an InvalidArgument out of the
    batch, so the step result was dead-lettered and the run stayed dispatched for ever."""
    m = mesh(PAY)
    m.policy.refuse.add("t1")
    start(m)
    m.planner.handle([result(m, "check")])
    m.planner.handle([result(m, "charge", offset=1)])
    assert m.runs.load("t1", "run-1").run.status == "completed"
    refused = [a for a in m.publisher.decoded("audit") if a["action"] == "budget.settle_refused"]
    assert [a["step_id"] for a in refused] == ["check", "charge"] and "no budget" in refused[0]["reason"]


def test_a_nan_cost_from_a_step_result_is_charged_as_the_estimate() -> None:
    m = mesh(PAY)
    start(m)
    m.planner.handle([result(m, "check")])
    m.planner.handle([result(m, "charge", offset=1, cost=float("nan"))])
    run = m.runs.load("t1", "run-1").run
    assert run.status == "completed" and m.policy.reconciled[-1] == ("run-1", "charge", 0.5)


def test_a_batch_settles_every_step_in_one_call() -> None:
    """Old code made one ReconcileBudget call per settled step, one after the other."""
    m = mesh(PAY)
    for n in (1, 2, 3):
        start(m, run_id=f"run-{n}")
    calls = m.policy.settle_calls
    m.planner.handle([result(m, "check", run_id=f"run-{n}", offset=n) for n in (1, 2, 3)])
    assert m.policy.settle_calls == calls + 1 and len(m.policy.reconciled) == 3


def test_a_step_that_fails_before_asking_policy_is_not_settled() -> None:
    """A costed step whose inputs cannot be rendered fails before it asks policy: nothing to release."""
    flow = build({"name": "t", "version": 1, "steps": [
        {"id": "a", "tool": "x", "cost_estimate": 0.5, "inputs": {"n": "${size(input.nope)}"}}]})
    run, cmds = real.start("r", "t", flow, {}, 0)
    assert run.steps["a"].error_type == "ExpressionError" and settles(cmds) == []
