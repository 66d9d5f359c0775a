"""Run and step state, and the commands a transition produces.

State is plain data (JSON round-trip) so it can be stored, replayed and shown.
Commands are orders for the adapters: dispatch a step, ask a person, emit an
event, set or clear a durable timer, park a dead letter."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

RUN_TERMINAL = frozenset({"completed", "failed", "cancelled", "compensation_failed"})
STEP_DONE = frozenset({"succeeded", "skipped"})
STEP_TERMINAL = frozenset({"succeeded", "skipped", "failed", "cancelled"})
STEP_ACTIVE = frozenset({"checking", "dispatched", "retrying", "waiting_approval"})


@dataclass
class StepState:
    id: str
    tool: str
    status: str = "pending"  # pending|checking|dispatched|retrying|waiting_approval|succeeded|failed|skipped|cancelled
    attempt: int = 0
    idempotency_key: str = ""
    output: Any = None
    error: str | None = None
    error_type: str | None = None
    started_at: float = 0.0
    finished_at: float = 0.0
    cost: float = 0.0
    decision: str = ""
    policy_id: str = ""
    decided_by: str = ""
    approval_role: str = ""
    escalated: bool = False
    timer_id: str | None = None
    compensation: str = ""  # ""|pending|dispatched|retrying|compensated|failed
    comp_attempt: int = 0
    inputs: Any = None
    amount: Any = None
    gated: bool = False  # the workflow's own approval gate applies (its `when` held)
    late: bool = False  # succeeded after the planner had given up on it: compensated, not used
    schedule_timer: str | None = None  # schedule-to-close bound of the whole step, when the workflow sets one
    settled_cost: float | None = None  # the cumulative cost last settled with policy (None: never settled)
    trace_id: str = ""  # the trace its (latest) dispatch was recorded in: where to look for its spans


@dataclass
class RunState:
    run_id: str
    tenant: str
    workflow: str
    version: int
    input: dict[str, Any]
    status: str = "running"
    created_at: float = 0.0
    updated_at: float = 0.0
    finished_at: float = 0.0
    output: Any = None
    error: str | None = None
    steps: dict[str, StepState] = field(default_factory=dict)
    finish_order: list[str] = field(default_factory=list)
    compensation_queue: list[str] = field(default_factory=list)
    ending: str = ""  # the final status once compensation settles: failed | cancelled
    deadline_timer: str | None = None
    cost: float = 0.0
    trigger: str | None = None  # the upstream event type that started the run, if one did
    trace: dict[str, str] | None = None  # W3C trace context of what started the run: one trace per run
    actor: str = ""  # who started it (a principal, or source:<system>): ListRuns filters on it

    @property
    def terminal(self) -> bool:
        return self.status in RUN_TERMINAL

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON. Shallow on purpose (``dataclasses.asdict`` deep-copies every value,
        which cost more than the rest of a transition); callers serialise at once."""
        out = dict(vars(self))
        out["steps"] = {k: dict(vars(v)) for k, v in self.steps.items()}
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunState:
        raw = dict(raw)
        raw.pop("seen", None)  # v1 states kept recent event ids inline; dedupe markers replace them
        raw["steps"] = {k: StepState(**v) for k, v in raw.get("steps", {}).items()}
        return cls(**raw)


@dataclass(frozen=True)
class Dispatch:
    step_id: str
    tool: str
    attempt: int
    idempotency_key: str
    inputs: Any
    timeout_ms: int
    latency_class: str
    cost_estimate: float
    compensation: bool = False
    deadline_ms: int | None = None  # schedule-to-close: the whole step must settle by then


@dataclass(frozen=True)
class AskApproval:
    step_id: str
    tool: str
    role: str
    reason: str
    inputs: Any
    deadline_ms: int | None


@dataclass(frozen=True)
class Emit:
    type: str
    step_id: str | None = None
    status: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    duration_ms: float | None = None


@dataclass(frozen=True)
class StartTimer:
    timer_id: str
    due_ms: int
    kind: str  # retry | step_timeout | run_deadline | approval_deadline | comp_retry | comp_timeout
    step_id: str | None = None


@dataclass(frozen=True)
class CancelTimer:
    timer_id: str


@dataclass(frozen=True)
class ParkDeadLetter:
    step_id: str
    reason: str


@dataclass(frozen=True)
class RunEnded:
    status: str
    error: str | None


@dataclass(frozen=True)
class CheckPolicy:
    """Ask policy whether the step may run (and reserve its cost). The handler asks outside the
    commit and feeds the verdict back with ``engine.on_verdict``; the engine never calls out."""

    step_id: str
    tool: str
    inputs: Any
    amount: Any
    cost_estimate: float
    # The step was approved by a person: only its budget is checked again (its hold may have expired
    # while the gate was open), and the inputs the person approved are what runs.
    recheck: bool = False


@dataclass(frozen=True)
class SettleBudget:
    """The step settled: turn its reservation into spend (0 releases the hold). Idempotent per step."""

    step_id: str
    cost: float


@dataclass(frozen=True)
class Audited:
    """A decision for the audit trail (who, why), recorded with the transition it caused."""

    action: str
    step_id: str | None
    actor: str
    reason: str
    decision: str | None
    detail: dict[str, Any] = field(default_factory=dict)


Command = (Dispatch | AskApproval | Emit | StartTimer | CancelTimer | ParkDeadLetter | RunEnded | Audited | CheckPolicy
           | SettleBudget)


@dataclass(frozen=True)
class Verdict:
    """What the policy service said about running a step."""

    effect: str  # allow | deny | require_approval
    reasons: tuple[str, ...] = ()
    policy_id: str = ""
    role: str = ""
    model_tier: str = ""
    # The step's inputs as policy masked them (PII masked, connector values as tenant tokens):
    # what is dispatched and kept, in place of what the step rendered. ``masked`` says policy sent them.
    inputs: Any = None
    masked: bool = False


@dataclass(frozen=True)
class StepOutcome:
    """A step attempt's result, as the executor reported it."""

    step_id: str
    attempt: int
    ok: bool
    output: Any = None
    error_type: str | None = None
    error_message: str | None = None
    retryable: bool = False
    cost: float = 0.0
    duration_ms: float = 0.0
    compensation: bool = False
    late: bool = False
