"""Converters between domain commands and wire records (Avro dicts)."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

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


def _now() -> int:
    return int(time.time() * 1000)


def _meta(run: RunState) -> dict[str, Any]:
    return {"event_id": uuid.uuid4().hex, "tenant": run.tenant, "occurred_at": _now()}


def records_for(run: RunState, cmd: Command) -> list[tuple[str, dict[str, Any]]]:
    """The (topic role, record) pairs a command becomes; timers are not records."""
    if isinstance(cmd, Dispatch):
        return [("step_requests", {**_meta(run), "run_id": run.run_id, "workflow": run.workflow,
                                   "step_id": cmd.step_id + (".compensate" if cmd.compensation else ""),
                                   "attempt": cmd.attempt, "idempotency_key": cmd.idempotency_key,
                                   "tool": cmd.tool, "inputs_json": json.dumps(cmd.inputs, default=str),
                                   "latency_class": cmd.latency_class, "timeout_ms": cmd.timeout_ms,
                                   "cost_estimate": cmd.cost_estimate, "deadline_ms": None})]
    if isinstance(cmd, Emit):
        return [("workflow_events", {**_meta(run), "run_id": run.run_id, "workflow": run.workflow,
                                     "workflow_version": run.version, "type": cmd.type, "step_id": cmd.step_id,
                                     "status": cmd.status, "detail_json": json.dumps(cmd.detail, default=str),
                                     "duration_ms": cmd.duration_ms})]
    if isinstance(cmd, AskApproval):
        return [("approvals", {**_meta(run), "run_id": run.run_id, "workflow": run.workflow, "step_id": cmd.step_id,
                               "tool": cmd.tool, "role": cmd.role, "reason": cmd.reason,
                               "inputs_json": json.dumps(cmd.inputs, default=str), "deadline_ms": cmd.deadline_ms}),
                ("audit", audit(run, "approval.requested", step_id=cmd.step_id, decision="waiting",
                                reason=cmd.reason, detail={"role": cmd.role, "deadline_ms": cmd.deadline_ms}))]
    if isinstance(cmd, RunEnded):
        steps = {sid: {"status": s.status, "attempts": s.attempt, "error": s.error, "cost": s.cost}
                 for sid, s in run.steps.items()}
        episode = {"run_id": run.run_id, "workflow": run.workflow, "version": run.version, "outcome": cmd.status,
                   "error": cmd.error, "steps": steps, "cost": run.cost, "input": run.input,
                   "duration_ms": run.finished_at - run.created_at}
        return [("memory_writes", {**_meta(run), "kind": "episode", "run_id": run.run_id, "key": run.workflow,
                                   "content_json": json.dumps(episode, default=str),
                                   "provenance_json": json.dumps({"service": "planner", "run_id": run.run_id})}),
                ("audit", audit(run, f"run.{cmd.status}", decision=cmd.status, reason=cmd.error,
                                cost=run.cost, detail={"duration_ms": episode["duration_ms"]}))]
    if isinstance(cmd, Audited):
        return [("audit", audit(run, cmd.action, step_id=cmd.step_id, actor=cmd.actor, reason=cmd.reason,
                                decision=cmd.decision))]
    if isinstance(cmd, ParkDeadLetter):
        body = json.dumps({"run_id": run.run_id, "step_id": cmd.step_id, "reason": cmd.reason}).encode()
        return [("deadletters", {**_meta(run), "service": "planner", "group": "planner",
                                 "source_topic": "compensation", "partition": -1, "offset": -1,
                                 "key": run.run_id.encode(), "value": body, "headers_json": "{}",
                                 "error_type": "CompensationFailed", "error_message": cmd.reason,
                                 "retryable": True, "attempts": 0})]
    return []


def audit(run: RunState, action: str, *, step_id: str | None = None, decision: str | None = None,
          actor: str | None = None, reason: str | None = None, cost: float | None = None,
          detail: dict[str, Any] | None = None, policy_id: str | None = None) -> dict[str, Any]:
    return {**_meta(run), "service": "planner", "run_id": run.run_id, "step_id": step_id, "action": action,
            "decision": decision, "actor": actor, "reason": reason, "policy_id": policy_id,
            "model_version": None, "cost": cost, "detail_json": json.dumps(detail or {}, default=str)}


def outcome_from(value: dict[str, Any]) -> StepOutcome:
    step_id = value["step_id"]
    compensation = step_id.endswith(".compensate")
    return StepOutcome(step_id=step_id.removesuffix(".compensate"), attempt=int(value["attempt"]),
                       ok=value["status"] == "ok",
                       output=json.loads(value["output_json"]) if value.get("output_json") else None,
                       error_type=value.get("error_type"), error_message=value.get("error_message"),
                       retryable=bool(value.get("retryable")), cost=float(value.get("cost") or 0.0),
                       duration_ms=float(value.get("duration_ms") or 0.0), compensation=compensation)
