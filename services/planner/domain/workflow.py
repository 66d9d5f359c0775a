"""Workflow definitions: parsed from YAML files, validated with their paths.

A definition is immutable once loaded; runs keep the (name, version) they
started with, so deploying version 2 leaves version-1 runs on version 1."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from services.planner.domain import expressions

DEFAULT_TIMEOUT_MS = 30_000


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 3
    initial_interval_ms: int = 200
    backoff_coefficient: float = 2.0
    max_interval_ms: int = 10_000
    jitter: float = 0.2
    non_retryable: tuple[str, ...] = ()

    def delay_ms(self, attempt: int, rand: float) -> int:
        """Backoff before attempt ``attempt + 1``; ``rand`` in [0, 1) spreads retries (jitter)."""
        base = min(self.max_interval_ms, self.initial_interval_ms * self.backoff_coefficient ** (attempt - 1))
        return max(1, int(base * (1 - self.jitter * rand)))

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> RetryPolicy:
        raw = dict(raw or {})
        raw["non_retryable"] = tuple(raw.get("non_retryable", ()))
        return cls(**raw)


@dataclass(frozen=True)
class Approval:
    role: str
    reason: str = ""
    timeout_ms: int | None = None
    on_timeout: str = "reject"
    escalate_to: str | None = None
    when: str | None = None


@dataclass(frozen=True)
class Call:
    tool: str
    inputs: dict[str, Any] = field(default_factory=dict)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    timeout_ms: int = DEFAULT_TIMEOUT_MS


@dataclass(frozen=True)
class StepDef:
    id: str
    tool: str
    inputs: dict[str, Any] = field(default_factory=dict)
    depends_on: tuple[str, ...] = ()
    when: str | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    # start-to-close: the bound of one running attempt (the executor enforces it)
    timeout_ms: int = DEFAULT_TIMEOUT_MS
    # schedule-to-close: the bound of the whole step, queued time and every retry included;
    # None leaves it unbounded, so the run deadline bounds it
    schedule_to_close_ms: int | None = None
    latency_class: str = "interactive"
    cost_estimate: float = 0.0
    amount: Any = None
    approval: Approval | None = None
    compensate: Call | None = None


@dataclass(frozen=True)
class WorkflowDef:
    name: str
    version: int
    steps: tuple[StepDef, ...]
    description: str = ""
    trigger: dict[str, Any] = field(default_factory=dict)
    deadline_ms: int | None = None
    output: Any = None
    source: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def ref(self) -> str:
        return f"{self.name}@v{self.version}"

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.source, sort_keys=True).encode()).hexdigest()[:16]

    def step(self, step_id: str) -> StepDef:
        for step in self.steps:
            if step.id == step_id:
                return step
        raise KeyError(step_id)


def semantic_errors(raw: dict[str, Any]) -> list[str]:
    """Errors JSON Schema cannot see: duplicate ids, unknown or cyclic dependencies,
    malformed expressions (inputs, amount, conditions, compensation inputs, the run's
    output). Each names its path in the file."""
    errors: list[str] = []
    steps = raw.get("steps") or []
    ids = [s.get("id") for s in steps if isinstance(s, dict)]
    seen: set[str] = set()
    for i, step in enumerate(steps):
        if not isinstance(step, dict):
            continue
        sid = str(step.get("id"))
        if sid in seen:
            errors.append(f"steps[{i}].id: duplicate step id {sid!r}")
        seen.add(sid)
        for j, dep in enumerate(step.get("depends_on") or []):
            if dep not in ids:
                errors.append(f"steps[{i}].depends_on[{j}]: unknown step {dep!r}; known: {ids}")
            elif dep == sid:
                errors.append(f"steps[{i}].depends_on[{j}]: a step cannot depend on itself")
        approval = step.get("approval") or {}
        templates = {"inputs": step.get("inputs"), "amount": step.get("amount"),
                     "compensate.inputs": (step.get("compensate") or {}).get("inputs")}
        errors += [f"steps[{i}].{key}: {err}" for key, value in templates.items()
                   for err in expressions.check(value)]
        for key, text in (("when", step.get("when")), ("approval.when", approval.get("when"))):
            if isinstance(text, str):
                errors += [f"steps[{i}].{key}: {err}" for err in expressions.check_expression(text)]
        if approval.get("on_timeout") == "escalate" and not approval.get("escalate_to"):
            errors.append(f"steps[{i}].approval.escalate_to: required when on_timeout is escalate")
    errors += [f"output: {err}" for err in expressions.check(raw.get("output"))]
    if not errors:
        cycle = _find_cycle({s["id"]: list(s.get("depends_on") or []) for s in steps if isinstance(s, dict)})
        if cycle:
            errors.append(f"steps: dependency cycle {' -> '.join(cycle)}")
    return errors


def _find_cycle(graph: dict[str, list[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in graph.get(node, []):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in graph:
        if node not in state and (found := visit(node)):
            return found
    return None


def build(raw: dict[str, Any]) -> WorkflowDef:
    """Build a definition from an already validated mapping."""
    steps = []
    for s in raw["steps"]:
        approval = Approval(**s["approval"]) if s.get("approval") else None
        comp = s.get("compensate")
        compensate = Call(tool=comp["tool"], inputs=comp.get("inputs", {}),
                          retry=RetryPolicy.from_dict(comp.get("retry") or {"max_attempts": 5}),
                          timeout_ms=comp.get("timeout_ms", DEFAULT_TIMEOUT_MS)) if comp else None
        steps.append(StepDef(
            id=s["id"], tool=s["tool"], inputs=s.get("inputs", {}), depends_on=tuple(s.get("depends_on", ())),
            when=s.get("when"), retry=RetryPolicy.from_dict(s.get("retry")),
            timeout_ms=s.get("timeout_ms", DEFAULT_TIMEOUT_MS), schedule_to_close_ms=s.get("schedule_to_close_ms"),
            latency_class=s.get("latency_class", "interactive"),
            cost_estimate=float(s.get("cost_estimate", 0.0)), amount=s.get("amount"), approval=approval,
            compensate=compensate))
    return WorkflowDef(name=raw["name"], version=int(raw["version"]), steps=tuple(steps),
                       description=raw.get("description", ""), trigger=raw.get("trigger") or {},
                       deadline_ms=raw.get("deadline_ms"), output=raw.get("output"), source=raw)
