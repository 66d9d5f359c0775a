"""Upcasters: how a record of a released schema version that Avro's own
resolution cannot read becomes the next version. One function per breaking
change, keyed by (schema full name, the old version); the codec chains them.

v1 -> v2 (engine core v2): commands, workflow events and memory writes became
one typed record per command, event and kind, in place of a ``command`` /
``type`` / ``kind`` string plus ``*_json`` payloads."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

NS = "aiosmesh.v1"
_ENVELOPE = ("event_id", "tenant", "occurred_at")


def _loads(text: Any, default: Any) -> Any:
    try:
        return json.loads(text) if text else default
    except (TypeError, ValueError):
        return default


def _envelope(v1: dict[str, Any]) -> dict[str, Any]:
    return {k: v1[k] for k in _ENVELOPE}


def workflow_command_v1(v1: dict[str, Any]) -> dict[str, Any]:
    kind, step = v1["command"], v1.get("step_id") or ""
    reason = v1.get("reason") or ""
    body: tuple[str, dict[str, Any]]
    if kind == "start":
        body = ("StartWorkflow", {"workflow": v1.get("workflow") or "", "workflow_version": v1.get("workflow_version"),
                                  "input_json": v1.get("input_json") or "{}"})
    elif kind in ("approve", "reject"):
        body = ("ApproveStep" if kind == "approve" else "RejectStep", {"step_id": step, "reason": reason})
    elif kind == "cancel":
        body = ("CancelRun", {"reason": reason})
    elif kind == "signal":
        body = ("SignalRun", {"name": reason or "signal", "payload_json": v1.get("payload_json") or "null"})
    elif kind == "timer":
        timer_kind = _loads(v1.get("payload_json"), {}).get("kind", "")
        body = ("FireTimer", {"timer_id": v1.get("timer_id") or "", "kind": timer_kind, "step_id": v1.get("step_id")})
    else:  # an unknown v1 command: keep it visible as a no-op signal rather than losing the record
        body = ("SignalRun", {"name": f"unknown-v1-command:{kind}", "payload_json": "null"})
    return {**_envelope(v1), "run_id": v1["run_id"], "actor": v1.get("actor") or "",
            "command": (f"{NS}.{body[0]}", body[1])}


def _failure(detail: dict[str, Any]) -> dict[str, Any]:
    return {"type": str(detail.get("error_type") or "Error"), "message": str(detail.get("error") or ""),
            "retryable": False}


_EVENT_BODIES: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "RunStarted": lambda d: {"input_json": json.dumps(d.get("input", {})), "workflow_digest": str(d.get("workflow_digest", ""))},
    "StepDispatched": lambda d: {"attempt": int(d.get("attempt", 0)), "tool": str(d.get("tool", ""))},
    "StepCompleted": lambda d: {"attempt": int(d.get("attempt", 0)), "cost": float(d.get("cost") or 0), "late": False},
    "StepSkipped": lambda d: {"condition": str(d.get("when", ""))},
    "StepRetrying": lambda d: {"attempt": int(d.get("attempt", 0)), "failure": _failure(d),
                               "delay_ms": int(d.get("delay_ms", 0))},
    "StepFailed": lambda d: {"attempt": int(d.get("attempt", 0)), "failure": _failure(d)},
    "ApprovalRequested": lambda d: {"role": str(d.get("role", "")), "reason": str(d.get("reason", "")),
                                    "deadline_ms": None},
    "ApprovalGranted": lambda d: {"actor": str(d.get("actor", "")), "reason": str(d.get("reason", ""))},
    "ApprovalRejected": lambda d: {"actor": str(d.get("actor", "")), "reason": str(d.get("reason", ""))},
    "ApprovalEscalated": lambda d: {"from_role": str(d.get("from", "")), "to_role": str(d.get("to", ""))},
    "ApprovalTimedOut": lambda d: {},
    "CompensationStarted": lambda d: {"steps": [str(s) for s in d.get("steps", [])]},
    "CompensationDispatched": lambda d: {"attempt": int(d.get("attempt", 0)), "tool": str(d.get("tool", ""))},
    "CompensationRetrying": lambda d: {"attempt": 0, "failure": {"type": "Error", "message": str(d.get("error", "")),
                                                                 "retryable": True},
                                       "delay_ms": int(d.get("delay_ms", 0))},
    "StepCompensated": lambda d: {"attempt": int(d.get("attempt", 0))},
    "CompensationFailed": lambda d: {"failure": {"type": "Error", "message": str(d.get("error", "")),
                                                 "retryable": False}},
    "CancelRequested": lambda d: {"actor": str(d.get("actor", "")), "reason": str(d.get("reason", ""))},
    "RunCompleted": lambda d: {"cost": float(d.get("cost") or 0), "output_json": "null"},
    "RunFailed": lambda d: {"cost": float(d.get("cost") or 0), "reason": str(d.get("error") or "")},
    "RunCancelled": lambda d: {"cost": float(d.get("cost") or 0), "reason": str(d.get("error") or "")},
}


def workflow_event_v1(v1: dict[str, Any]) -> dict[str, Any]:
    kind = v1["type"]
    detail = _loads(v1.get("detail_json"), {})
    if kind not in _EVENT_BODIES:  # an event type v2 no longer has: keep the record, say what it was
        kind, detail = "StepSkipped", {"when": f"v1 event {v1['type']}"}
    return {**_envelope(v1), "run_id": v1["run_id"], "workflow": v1["workflow"],
            "workflow_version": v1["workflow_version"], "type": kind, "step_id": v1.get("step_id"),
            "status": v1.get("status"), "duration_ms": v1.get("duration_ms"),
            "body": (f"{NS}.{kind}", _EVENT_BODIES[kind](detail if isinstance(detail, dict) else {}))}


_OUTCOMES = {"completed", "failed", "cancelled", "compensation_failed"}


def memory_write_v1(v1: dict[str, Any]) -> dict[str, Any]:
    content = _loads(v1.get("content_json"), None)
    prov = _loads(v1.get("provenance_json"), {})
    prov = prov if isinstance(prov, dict) else {}
    subject = prov.get("subject") or (content.get("subject") if isinstance(content, dict) else None)
    body: tuple[str, dict[str, Any]]
    if v1["kind"] == "episode" and isinstance(content, dict):
        outcome = content.get("outcome") if content.get("outcome") in _OUTCOMES else "failed"
        reason = content.get("failure_reason") or content.get("error")
        body = ("Episode", {
            "run_id": str(v1.get("run_id") or content.get("run_id") or ""), "workflow": str(content.get("workflow", "")),
            "workflow_version": int(content.get("workflow_version") or content.get("version") or 0),
            "outcome": outcome, "failure": {"type": "Error", "message": str(reason), "retryable": False}
            if reason else None, "steps": [], "cost": float(content.get("cost") or 0),
            "duration_ms": int(content.get("duration_ms") or 0), "trigger": content.get("trigger")})
    elif v1["kind"] == "fact":
        body = ("FactWrite", {"key": v1.get("key") or "", "value_json": json.dumps(content)})
    else:
        body = ("WorkingWrite", {"key": v1.get("key") or "", "value_json": json.dumps(content)})
    return {**_envelope(v1), "run_id": v1.get("run_id"), "subject": str(subject) if subject else None,
            "provenance": {"service": str(prov.get("service") or prov.get("writer") or "unknown"),
                           "run_id": prov.get("run_id"), "step_id": prov.get("step_id")},
            "body": (f"{NS}.{body[0]}", body[1])}


UPCASTERS: dict[tuple[str, int], Callable[[dict[str, Any]], dict[str, Any]]] = {
    (f"{NS}.WorkflowCommand", 1): workflow_command_v1,
    (f"{NS}.WorkflowEvent", 1): workflow_event_v1,
    (f"{NS}.MemoryWrite", 1): memory_write_v1,
}
