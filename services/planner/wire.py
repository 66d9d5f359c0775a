"""Converters between the planner's domain and the typed wire records (Avro
dicts): commands and step results in, step requests, workflow events,
approval requests, episodes, audit records and dead letters out."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from typing import Any

from services.common.amounts import usable_cost
from services.common.audit import audit_record
from services.common.errors import BadRecord
from services.planner.domain.state import (
    AskApproval,
    Audited,
    Command,
    Dispatch,
    Emit,
    ParkDeadLetter,
    RunEnded,
    RunState,
    StepOutcome,
)

NS = "aiosmesh.v1"
log = logging.getLogger(__name__)


# -- in ------------------------------------------------------------------------------
@dataclass(frozen=True)
class CommandIn:
    """A decoded WorkflowCommand: its kind (the record's short name) and body."""

    tenant: str
    run_id: str
    event_id: str
    actor: str
    kind: str  # StartWorkflow | ApproveStep | RejectStep | CancelRun | SignalRun | FireTimer
    body: dict[str, Any]


def command_from(value: dict[str, Any]) -> CommandIn:
    name, body = value["command"]
    return CommandIn(tenant=value["tenant"], run_id=value["run_id"], event_id=value["event_id"],
                     actor=value.get("actor") or "unknown", kind=name.rsplit(".", 1)[-1], body=body)


def outcome_from(value: dict[str, Any]) -> StepOutcome:
    step_id = value["step_id"]
    compensation = value.get("kind") == "compensation" or step_id.endswith(".compensate")
    try:
        output = json.loads(value["output_json"]) if value.get("output_json") else None
    except json.JSONDecodeError as exc:
        raise BadRecord(f"step result output_json is not JSON: {exc}") from exc
    return StepOutcome(step_id=step_id.removesuffix(".compensate"), attempt=int(value["attempt"]),
                       ok=value["status"] == "ok", output=output, error_type=value.get("error_type"),
                       error_message=value.get("error_message"), retryable=bool(value.get("retryable")),
                       cost=_cost(value), duration_ms=float(value.get("duration_ms") or 0.0),
                       compensation=compensation, late=bool(value.get("late")))


def _cost(value: dict[str, Any]) -> float:
    """The reported cost, or NaN when it is not an amount a budget can charge (NaN, infinite, negative,
    absurd: an executor of another version, a broken plug-in): the engine charges the step's estimate
    then. It was taken as sent, and policy refused to settle it for good, so the run never ended."""
    raw = value.get("cost") or 0.0
    cost = usable_cost(raw)
    if cost is None:
        log.warning("step result of %s/%s reports cost %r, which is not an amount; its estimate is charged",
                    value.get("run_id"), value.get("step_id"), raw)
        return math.nan
    return cost


# -- commands out ----------------------------------------------------------------------
def command(tenant: str, run_id: str, actor: str, kind: str, body: dict[str, Any]) -> dict[str, Any]:
    """A WorkflowCommand record (the gRPC API and the timer poller send these)."""
    return {"tenant": tenant, "run_id": run_id, "actor": actor, "command": (f"{NS}.{kind}", body)}


def records_for(run: RunState, cmd: Command) -> list[tuple[str, dict[str, Any]]]:
    """The (topic role, record) pairs a command becomes; timers, checks and settlements are not records."""
    base = {"tenant": run.tenant}
    if isinstance(cmd, Dispatch):
        return [("step_requests", {**base, "run_id": run.run_id, "workflow": run.workflow, "step_id": cmd.step_id,
                                   "attempt": cmd.attempt, "idempotency_key": cmd.idempotency_key,
                                   "tool": cmd.tool, "inputs_json": json.dumps(cmd.inputs, default=str),
                                   "latency_class": cmd.latency_class, "timeout_ms": cmd.timeout_ms,
                                   "cost_estimate": cmd.cost_estimate, "deadline_ms": cmd.deadline_ms,
                                   "kind": "compensation" if cmd.compensation else "action"})]
    if isinstance(cmd, Emit):
        return [("workflow_events", {**base, "run_id": run.run_id, "workflow": run.workflow,
                                     "workflow_version": run.version, "type": cmd.type, "step_id": cmd.step_id,
                                     "status": cmd.status, "duration_ms": cmd.duration_ms,
                                     "body": (f"{NS}.{cmd.type}", event_body(run, cmd))})]
    if isinstance(cmd, AskApproval):
        return [("approvals", {**base, "run_id": run.run_id, "workflow": run.workflow, "step_id": cmd.step_id,
                               "tool": cmd.tool, "role": cmd.role, "reason": cmd.reason,
                               "inputs_json": json.dumps(cmd.inputs, default=str), "deadline_ms": cmd.deadline_ms}),
                ("audit", audit(run, "approval.requested", step_id=cmd.step_id, decision="waiting",
                                reason=cmd.reason, detail={"role": cmd.role, "deadline_ms": cmd.deadline_ms}))]
    if isinstance(cmd, RunEnded):
        return [("memory_writes", {**base, "run_id": run.run_id, "subject": None,
                                   "provenance": {"service": "planner", "run_id": run.run_id, "step_id": None},
                                   "body": (f"{NS}.Episode", episode(run, cmd))}),
                ("audit", audit(run, f"run.{cmd.status}", decision=cmd.status, reason=cmd.error, cost=run.cost,
                                detail={"duration_ms": run.finished_at - run.created_at}))]
    if isinstance(cmd, Audited):
        return [("audit", audit(run, cmd.action, step_id=cmd.step_id, actor=cmd.actor, reason=cmd.reason,
                                decision=cmd.decision, detail=cmd.detail))]
    if isinstance(cmd, ParkDeadLetter):
        body = json.dumps({"run_id": run.run_id, "step_id": cmd.step_id, "reason": cmd.reason}).encode()
        return [("deadletters", {**base, "service": "planner", "group": "planner",
                                 "source_topic": "compensation", "partition": -1, "offset": -1,
                                 "key": run.run_id.encode(), "value": body, "headers_json": "{}",
                                 "error_type": "CompensationFailed", "error_message": cmd.reason,
                                 "retryable": True, "attempts": 0})]
    return []


def failure(error_type: str | None, message: str | None, retryable: bool = False) -> dict[str, Any]:
    return {"type": error_type or "Error", "message": message or "", "retryable": retryable}


def event_body(run: RunState, e: Emit) -> dict[str, Any]:
    """The typed body of a workflow event, from the engine's detail."""
    d = e.detail
    attempt = int(d.get("attempt") or 0)
    bodies: dict[str, Any] = {
        "RunStarted": lambda: {"input_json": json.dumps(d.get("input", {}), default=str),
                               "workflow_digest": str(d.get("workflow_digest", ""))},
        "StepDispatched": lambda: {"attempt": attempt, "tool": str(d.get("tool", ""))},
        "StepCompleted": lambda: {"attempt": attempt, "cost": float(d.get("cost") or 0.0),
                                  "late": bool(d.get("late"))},
        "StepSkipped": lambda: {"condition": str(d.get("when", ""))},
        "StepRetrying": lambda: {"attempt": attempt, "failure": failure(d.get("error_type"), d.get("error"), True),
                                 "delay_ms": int(d.get("delay_ms") or 0)},
        "StepFailed": lambda: {"attempt": attempt, "failure": failure(d.get("error_type"), d.get("error"))},
        "ApprovalRequested": lambda: {"role": str(d.get("role", "")), "reason": str(d.get("reason", "")),
                                      "deadline_ms": d.get("deadline_ms")},
        "ApprovalGranted": lambda: {"actor": str(d.get("actor", "")), "reason": str(d.get("reason", ""))},
        "ApprovalRejected": lambda: {"actor": str(d.get("actor", "")), "reason": str(d.get("reason", ""))},
        "ApprovalEscalated": lambda: {"from_role": str(d.get("from", "")), "to_role": str(d.get("to", ""))},
        "ApprovalTimedOut": lambda: {},
        "CompensationStarted": lambda: {"steps": [str(s) for s in d.get("steps", [])]},
        "CompensationDispatched": lambda: {"attempt": attempt, "tool": str(d.get("tool", ""))},
        "CompensationRetrying": lambda: {"attempt": attempt,
                                         "failure": failure(d.get("error_type"), d.get("error"), True),
                                         "delay_ms": int(d.get("delay_ms") or 0)},
        "StepCompensated": lambda: {"attempt": attempt},
        "CompensationFailed": lambda: {"failure": failure(d.get("error_type"), d.get("error"))},
        "CancelRequested": lambda: {"actor": str(d.get("actor", "")), "reason": str(d.get("reason", ""))},
        "RunCompleted": lambda: {"cost": float(d.get("cost") or 0.0), "output_json": json.dumps(run.output, default=str)},
        "RunFailed": lambda: {"cost": float(d.get("cost") or 0.0), "reason": str(d.get("error") or "")},
        "RunCancelled": lambda: {"cost": float(d.get("cost") or 0.0), "reason": str(d.get("error") or "")},
    }
    if e.type not in bodies:
        raise ValueError(f"no wire body for workflow event {e.type!r}: add it to schemas/WorkflowEvent.avsc and here")
    body: dict[str, Any] = bodies[e.type]()
    return body


def episode(run: RunState, ended: RunEnded) -> dict[str, Any]:
    """What memory keeps of a finished run: outcome, failure reason and steps, never the input."""
    steps = [{"step_id": sid, "status": s.status, "attempts": s.attempt,
              "failure": failure(s.error_type, s.error) if s.error else None, "cost": s.cost}
             for sid, s in run.steps.items()]
    return {"run_id": run.run_id, "workflow": run.workflow, "workflow_version": run.version, "outcome": ended.status,
            "failure": failure("RunFailed" if ended.status != "cancelled" else "Cancelled", ended.error)
            if ended.error else None,
            "steps": steps, "cost": run.cost, "duration_ms": int(run.finished_at - run.created_at),
            "trigger": run.trigger}


def audit(run: RunState, action: str, *, step_id: str | None = None, decision: str | None = None,
          actor: str | None = None, reason: str | None = None, cost: float | None = None,
          detail: dict[str, Any] | None = None, policy_id: str | None = None) -> dict[str, Any]:
    return audit_record("planner", run.tenant, action, run_id=run.run_id, step_id=step_id, decision=decision,
                        actor=actor, reason=reason, cost=cost, detail=detail, policy_id=policy_id)
