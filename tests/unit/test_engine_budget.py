"""Budget settlements the engine emits: every step that may hold a reservation or that cost
anything is settled, once per cost it reached; the store releases the hold and charges the
cumulative cost (tests/integration/test_budget_store.py)."""

from __future__ import annotations

from typing import Any

import pytest

from services.planner.domain import engine as real
from services.planner.domain.state import SettleBudget, StepOutcome, Verdict
from services.planner.domain.workflow import build
from tests.unit.engine_driver import engine
from tests.unit.planner_twins import mesh
from tests.unit.test_planner_handlers import PAY, result, start

pytestmark = pytest.mark.timeout(10)


def allow(*_: Any) -> Verdict:
    return Verdict("allow", ("ok",), "test@v1:allow")


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
