"""What the executor works with: one attempt of one step, the result of an
attempt, and the idempotency record that keeps every result of a step."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["AttemptResult", "LeaseGrant", "StepAttempt", "StepRecord"]


@dataclass(frozen=True)
class StepAttempt:
    """RunStep: run attempt ``attempt`` of a step once.

    ``idempotency_key`` is the step's key (the planner's ``<run id>:<step id>``,
    or ``...:compensate``): the same for every attempt of the step, so every
    attempt's effect at a third party deduplicates to one."""

    tenant: str
    run_id: str
    step_id: str
    attempt: int
    idempotency_key: str
    tool: str
    inputs: Any
    latency_class: str
    timeout_ms: int
    cost_estimate: float = 0.0
    kind: str = "action"  # action | compensation
    inputs_error: str | None = None  # the inputs could not be decoded; the attempt fails without running

    @property
    def timeout_s(self) -> float:
        """The start-to-close bound of one running attempt, in seconds."""
        return max(0.001, self.timeout_ms / 1000)


@dataclass(frozen=True)
class AttemptResult:
    """How one attempt ended. ``started`` is False when the tool call never ran
    (it expired in the queue, or a newer attempt had started): no usage."""

    attempt: int
    status: str  # ok | error
    output: Any = None
    error_type: str | None = None
    error_message: str | None = None
    retryable: bool = False
    duration_ms: float = 0.0
    cost: float = 0.0
    model: str | None = None
    started: bool = True

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> AttemptResult:
        return cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})


@dataclass(frozen=True)
class StepRecord:
    """The idempotency record of one step (one idempotency key).

    ``results`` holds the first result recorded for each attempt: the one that
    was published. ``late`` holds a success that arrived after its attempt's
    result (a StepTimeout) had been published: the effect happened, so it is
    recorded and published too, never dropped."""

    results: dict[int, AttemptResult] = field(default_factory=dict)
    late: dict[int, AttemptResult] = field(default_factory=dict)

    def own(self, attempt: int) -> tuple[AttemptResult, ...]:
        """This attempt's published results, first publication first."""
        return tuple(r for r in (self.results.get(attempt), self.late.get(attempt)) if r is not None)

    def success(self) -> AttemptResult | None:
        """The first success of any attempt, on time or late."""
        for attempt in sorted({*self.results, *self.late}):
            for result in self.own(attempt):
                if result.ok:
                    return result
        return None

    def newest_attempt(self) -> int:
        return max((*self.results, *self.late), default=0)

    def to_json(self) -> str:
        return json.dumps({"v": 1, "results": {str(a): r.to_dict() for a, r in self.results.items()},
                           "late": {str(a): r.to_dict() for a, r in self.late.items()}}, default=str)

    @classmethod
    def from_json(cls, text: str | None) -> StepRecord:
        if not text:
            return cls()
        raw = json.loads(text)
        return cls(results={int(a): AttemptResult.from_dict(r) for a, r in raw.get("results", {}).items()},
                   late={int(a): AttemptResult.from_dict(r) for a, r in raw.get("late", {}).items()})


@dataclass(frozen=True)
class LeaseGrant:
    """What the lease store answered: ``granted`` (``holder`` is our attempt),
    ``busy`` (attempt ``holder``'s call still runs) or ``superseded`` (attempt
    ``holder``, newer than ours, has started)."""

    status: str
    holder: int
