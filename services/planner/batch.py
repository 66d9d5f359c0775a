"""What one consumer batch of the planner works with: the batch's memory, the items it applies,
admission limits, and the pure pieces of the transitions the handlers build (a person's decision,
a signal, an event's data), kept apart from ``handlers`` so that module is the load -> decide ->
commit loop alone."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from services.common import tracing
from services.common.errors import BadRecord, PermanentError
from services.common.kafka import Inbound
from services.planner.domain import engine
from services.planner.domain.state import Audited, Command, Dispatch, RunState, Verdict
from services.planner.domain.workflow import WorkflowDef

log = logging.getLogger("services.planner.handlers")
Decide = Callable[[RunState | None], tuple[RunState, list[Command]]]


class UnknownWorkflow(PermanentError):
    """An event or command names a workflow that is not deployed."""


def run_id_for(tenant: str, request_id: str) -> str:
    """Deterministic run id: a redelivered event or a repeated request maps to the same run."""
    return "run-" + hashlib.sha256(f"{tenant}\x00{request_id}".encode()).hexdigest()[:20]


@dataclass(frozen=True)
class Admission:
    """How many runs may be in flight (created, not ended); 0 = no limit."""

    per_tenant: int = 0
    per_workflow: int = 0


class AtCapacity(Exception):
    """This ingress event must wait: its tenant or workflow has the most runs in flight it may."""


@dataclass
class Batch:
    """What one consumer batch remembers while it is handled (never kept on the planner)."""

    produced: set[str] = field(default_factory=set)
    committed: dict[tuple[str, str], str] = field(default_factory=dict)  # (tenant, run) -> version to clear
    verdicts: dict[tuple[str, str], Verdict] = field(default_factory=dict)  # (run, step or "") -> verdict
    settled: set[tuple[str, str, float]] = field(default_factory=set)
    refused: dict[tuple[str, str, float], str] = field(default_factory=dict)  # settlements policy refused: why
    in_flight: dict[tuple[str, str], list[int]] = field(default_factory=dict)  # (tenant, wf) -> [tenant, wf]
    items: list[Item] = field(default_factory=list)  # the transitions to apply, in record order
    headers: Mapping[str, str] = field(default_factory=dict)  # of the record being turned into items


@dataclass
class Item:
    """One event to apply to one run."""

    tenant: str
    run_id: str
    event_id: str
    decide: Decide
    start_check: tuple[str, str, str, str] | None = None  # (tenant, principal, workflow, run id) to admit
    headers: Mapping[str, str] = field(default_factory=dict)  # the record's (its trace context)


def stamp_trace(run: RunState, cmds: list[Command]) -> None:
    """Each dispatched step keeps the trace its dispatch went out in, for `aios workflows show`."""
    trace_id = tracing.current_trace_id()
    if trace_id:
        for cmd in cmds:
            if isinstance(cmd, Dispatch) and cmd.step_id in run.steps and not cmd.compensation:
                run.steps[cmd.step_id].trace_id = trace_id


def decision_commands(run: RunState, wf: WorkflowDef, step_id: str, approved: bool, actor: str, reason: str,
                      now: int) -> list[Command]:
    """A person's approval or rejection of a gate, audited with the transition it caused."""
    try:
        cmds = engine.on_decision(run, wf, step_id, approved, actor, reason, now)
    except engine.TransitionError as exc:
        log.info("decision ignored: %s", exc)
        return [Audited("approval.ignored", step_id, actor, str(exc), None)]
    # Who, when and why, through the outbox with the transition it caused.
    return [Audited("approval.approved" if approved else "approval.rejected", step_id, actor, reason,
                    "approve" if approved else "reject"), *cmds]


def signal_commands(run: RunState, wf: WorkflowDef, name: str, payload_json: str | None, now: int) -> list[Command]:
    """A signal joins the run's input under ``signals.<name>`` and the run advances."""
    try:
        payload = json.loads(payload_json or "null")
    except json.JSONDecodeError as exc:
        raise BadRecord(f"signal {name!r} payload_json is not JSON: {exc}") from exc
    run.input.setdefault("signals", {})[name] = payload
    return engine.advance(run, wf, now)


def event_data(rec: Inbound) -> dict[str, Any]:
    """An upstream event's ``data_json``, which must be a JSON object."""
    try:
        data = json.loads(rec.value.get("data_json") or "{}")
    except json.JSONDecodeError as exc:
        raise BadRecord(f"data_json is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise BadRecord("data_json must be a JSON object")
    return data
