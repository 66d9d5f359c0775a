"""Budget settlement in the run state machine: what an attempt cost, and which steps tell policy
their cost (which releases their hold and charges what was not charged yet). Pure, like the engine."""

from __future__ import annotations

import math

from services.planner.domain.state import (
    STEP_ACTIVE,
    STEP_DONE,
    Command,
    RunState,
    SettleBudget,
    StepOutcome,
    StepState,
)
from services.planner.domain.workflow import WorkflowDef

MAX_COST = 2**53 // 1_000_000  # the largest cost a budget counts exactly (services.policy.domain.decide.MAX_AMOUNT)


def attempt_cost(wf: WorkflowDef, res: StepOutcome) -> float:
    """What an attempt cost: a cost that is not an amount (NaN, infinite, negative, beyond what a
    budget counts: a broken plug-in) counts as the step's estimate, what its budget held. Carried as
    it came, it poisoned the run's cost and its settlement, which policy refuses for good."""
    cost = res.cost
    if math.isfinite(cost) and 0 <= cost <= MAX_COST:
        return cost
    return wf.step(res.step_id).cost_estimate


def maybe_asked(run: RunState, wf: WorkflowDef, step_id: str) -> bool:
    """Whether a pending step may hold a reservation all the same: a planner that asked policy for
    it and died before its commit left it pending, but only once its dependencies were done or one
    event from it. A step behind a pending, failed or cancelled dependency never asked: releasing it
    would cost a call, an audit record and a reservation hash for nothing."""
    return all(run.steps[d].status in STEP_DONE | STEP_ACTIVE for d in wf.step(step_id).depends_on)


def settle(wf: WorkflowDef, state: StepState) -> list[Command]:
    """A step settled (succeeded, failed, was cancelled or rejected, or reported a late cost): tell
    policy its cumulative cost, which releases its hold and charges what was not charged yet.

    A step with an estimate is settled even when no verdict is recorded: a planner that reserved
    and died before its commit left a hold the stored run does not know of (settling an unknown
    reservation at 0 costs nothing). A step without an estimate is settled once it cost anything:
    it is metered all the same. Each cost is settled once; a later, higher total again."""
    if state.settled_cost == state.cost or (state.cost <= 0 and wf.step(state.id).cost_estimate <= 0):
        return []
    state.settled_cost = state.cost
    return [SettleBudget(state.id, state.cost)]
