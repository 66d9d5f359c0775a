"""Audit entries: the one shape the audit trail stores. Audit records arrive
as they are; workflow events, usage records and dead letters are converted so
a run's timeline reads as one story. Pure: records are plain dicts here (a
union such as a workflow event's ``body`` is ``(record name, fields)``)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from services.common.errors import BadRecord

SYSTEM_TENANT = "_system"  # dead letters whose tenant is unknown
LATE_REASON = "late success: the step had been given up, so its effect is compensated"
# Tenants become part of Redis keys inside a {hash tag}: refuse anything else.
_TENANT = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@dataclass(frozen=True)
class AuditEntry:
    event_id: str
    tenant: str
    occurred_at_ms: float
    service: str
    action: str
    run_id: str = ""
    step_id: str = ""
    decision: str = ""
    actor: str = ""
    reason: str = ""
    policy_id: str = ""
    model_version: str = ""
    cost: float = 0.0
    detail_json: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str) -> AuditEntry:
        return cls(**json.loads(raw))

    @property
    def workflow(self) -> str:
        """The workflow the entry itself names (policy decisions and workflow events carry it), "" if none."""
        if '"workflow"' not in self.detail_json:
            return ""
        try:
            detail = json.loads(self.detail_json)
        except ValueError:
            return ""
        value = detail.get("workflow") if isinstance(detail, dict) else None
        return value if isinstance(value, str) else ""


def valid_tenant(tenant: str) -> bool:
    return bool(_TENANT.match(tenant))


def _tenant(value: Any, *, fallback: str | None = None) -> str:
    tenant = str(value or "") or (fallback or "")
    if not valid_tenant(tenant):
        raise BadRecord(f"record tenant {tenant!r} is missing or invalid")
    return tenant


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0.0
    return float(value)


def _dump(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), default=str)


def parse_detail(raw: Any) -> Any:
    """A ``*_json`` payload parsed, or kept as text when it is not JSON."""
    if not raw:
        return {}
    try:
        return json.loads(raw)
    except (TypeError, ValueError):
        return str(raw)


def from_audit_record(rec: Mapping[str, Any]) -> AuditEntry:
    return AuditEntry(event_id=_text(rec["event_id"]), tenant=_tenant(rec.get("tenant")),
                      occurred_at_ms=_number(rec.get("occurred_at")), service=_text(rec.get("service")),
                      action=_text(rec.get("action")), run_id=_text(rec.get("run_id")),
                      step_id=_text(rec.get("step_id")), decision=_text(rec.get("decision")),
                      actor=_text(rec.get("actor")), reason=_text(rec.get("reason")),
                      policy_id=_text(rec.get("policy_id")), model_version=_text(rec.get("model_version")),
                      cost=_number(rec.get("cost")), detail_json=_text(rec.get("detail_json")))


def workflow_body(rec: Mapping[str, Any]) -> dict[str, Any]:
    """The typed body of a workflow event; the codec decodes the union as ``(record name, fields)``."""
    body = rec.get("body")
    if body is None:
        return {}
    if isinstance(body, tuple | list) and len(body) == 2 and isinstance(body[1], dict):
        return dict(body[1])
    raise BadRecord(f"workflow event body is not a (record name, fields) pair, got {type(body).__name__}")


def _readable(body: Mapping[str, Any]) -> dict[str, Any]:
    """The body for people: ``*_json`` payloads (a run's input, output) parsed into their values."""
    return {k.removesuffix("_json"): parse_detail(v) if k.endswith("_json") else v for k, v in body.items()}


def _workflow_reason(body: Mapping[str, Any]) -> str:
    """Why it happened: a failure's message, an approval's, cancel's or run's reason, or the late flag."""
    failure = body.get("failure")
    if isinstance(failure, Mapping) and failure.get("message"):
        return _text(failure["message"])
    if body.get("late"):
        return LATE_REASON
    return _text(body.get("reason"))


def from_workflow_event(rec: Mapping[str, Any]) -> AuditEntry:
    """``workflow.<type>`` by the planner: actor, reason and cost from the typed body, the body
    itself (attempt, tool, failure type, late flag...) in detail_json."""
    body = workflow_body(rec)
    payload = {"workflow": rec.get("workflow"), "workflow_version": rec.get("workflow_version"),
               "type": rec.get("type"), "status": rec.get("status"), "duration_ms": rec.get("duration_ms"),
               "detail": _readable(body)}
    return AuditEntry(event_id=_text(rec["event_id"]), tenant=_tenant(rec.get("tenant")),
                      occurred_at_ms=_number(rec.get("occurred_at")), service="planner",
                      action=f"workflow.{_text(rec.get('type'))}", run_id=_text(rec.get("run_id")),
                      step_id=_text(rec.get("step_id")), decision=_text(rec.get("status")),
                      actor=_text(body.get("actor")), reason=_workflow_reason(body), cost=_number(body.get("cost")),
                      detail_json=_dump(payload))


def from_usage(rec: Mapping[str, Any]) -> AuditEntry:
    payload = {"tool": rec.get("tool"), "model": rec.get("model"), "units": rec.get("units"),
               "latency_class": rec.get("latency_class"), "duration_ms": rec.get("duration_ms")}
    return AuditEntry(event_id=_text(rec["event_id"]), tenant=_tenant(rec.get("tenant")),
                      occurred_at_ms=_number(rec.get("occurred_at")), service="executor", action="usage",
                      run_id=_text(rec.get("run_id")), step_id=_text(rec.get("step_id")),
                      actor=_text(rec.get("tool")), model_version=_text(rec.get("model")),
                      cost=_number(rec.get("cost")), detail_json=_dump(payload))


def from_dead_letter(rec: Mapping[str, Any], *, source_role: str, run_keyed: bool) -> AuditEntry:
    """Filed under the record's tenant (``_system`` when unknown); under its run
    too when the source topic is keyed by run id. The original bytes stay in
    the dead-letter topic: they may hold PII, the audit trail does not need them."""
    raw_key = rec.get("key")
    key = raw_key.decode("utf-8", "replace") if isinstance(raw_key, bytes) else _text(raw_key)
    tenant = _text(rec.get("tenant"))
    payload = {"source_topic": rec.get("source_topic"), "source_role": source_role, "group": rec.get("group"),
               "partition": rec.get("partition"), "offset": rec.get("offset"), "key": key,
               "retryable": rec.get("retryable"), "attempts": rec.get("attempts"),
               "value_bytes": len(rec.get("value") or b"")}
    return AuditEntry(event_id=_text(rec["event_id"]),
                      tenant=tenant if valid_tenant(tenant) else SYSTEM_TENANT,
                      occurred_at_ms=_number(rec.get("occurred_at")), service=_text(rec.get("service")),
                      action="deadletter", run_id=key if run_keyed else "",
                      decision=_text(rec.get("error_type")), reason=_text(rec.get("error_message")),
                      detail_json=_dump(payload))
