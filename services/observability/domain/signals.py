"""What each stored record means for the dashboards, as plain values. The
metrics adapter turns these into Prometheus series; keeping the mapping here
makes it testable without a registry."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from services.observability.domain.entries import parse_detail, workflow_body

UNKNOWN = "unknown"
_RUN_OUTCOMES = {"RunCompleted": "completed", "RunFailed": "failed", "RunCancelled": "cancelled"}
_HUMAN = {"ApprovalRequested": "requested", "ApprovalGranted": "approved", "ApprovalRejected": "rejected",
          "ApprovalEscalated": "escalated"}
_COMPENSATION = {"CompensationStarted": "started", "CompensationFailed": "failed"}
_STEP_STATUS = {"StepCompleted": "succeeded", "StepFailed": "failed"}


@dataclass(frozen=True)
class RunStarted:
    workflow: str


@dataclass(frozen=True)
class RunFinished:
    workflow: str
    outcome: str
    seconds: float | None


@dataclass(frozen=True)
class StepSettled:
    tool: str
    status: str
    seconds: float | None


@dataclass(frozen=True)
class StepRetried:
    tool: str


@dataclass(frozen=True)
class HumanIntervention:
    workflow: str
    kind: str


@dataclass(frozen=True)
class Compensation:
    workflow: str
    outcome: str


@dataclass(frozen=True)
class Cost:
    tenant: str
    workflow: str
    tool: str
    amount: float


@dataclass(frozen=True)
class BudgetSeen:
    """A policy decision or reconcile: the tenant's budget as policy saw it."""

    tenant: str
    remaining_ratio: float | None
    spent: float
    exhausted: bool


Signal = RunStarted | RunFinished | StepSettled | StepRetried | HumanIntervention | Compensation | Cost | BudgetSeen


def _seconds(duration_ms: Any) -> float | None:
    if isinstance(duration_ms, int | float) and not isinstance(duration_ms, bool) and duration_ms >= 0:
        return float(duration_ms) / 1000.0
    return None


def step_tool(rec: Mapping[str, Any]) -> str:
    """The tool a workflow event names (StepDispatched, CompensationDispatched), if any."""
    return str(workflow_body(rec).get("tool") or "")


def workflow_signals(rec: Mapping[str, Any], tool: str) -> list[Signal]:
    """Signals of one workflow event; ``tool`` is the step's tool if known."""
    kind = str(rec.get("type") or "")
    workflow = str(rec.get("workflow") or UNKNOWN)
    tool = tool or UNKNOWN
    if kind == "RunStarted":
        return [RunStarted(workflow)]
    if kind in _RUN_OUTCOMES:
        # RunFailed carries failed or compensation_failed; the status is the finer outcome.
        outcome = str(rec.get("status") or _RUN_OUTCOMES[kind]) if kind == "RunFailed" else _RUN_OUTCOMES[kind]
        return [RunFinished(workflow, outcome, _seconds(rec.get("duration_ms")))]
    if kind in _STEP_STATUS:
        return [StepSettled(tool, _STEP_STATUS[kind], _seconds(rec.get("duration_ms")))]
    if kind == "StepRetrying":
        return [StepRetried(tool)]
    if kind in _HUMAN:
        return [HumanIntervention(workflow, _HUMAN[kind])]
    if kind in _COMPENSATION:
        return [Compensation(workflow, _COMPENSATION[kind])]
    return []


def usage_signals(rec: Mapping[str, Any], workflow: str) -> list[Signal]:
    cost = rec.get("cost")
    if not isinstance(cost, int | float) or isinstance(cost, bool) or cost <= 0:
        return []
    return [Cost(str(rec.get("tenant")), workflow or UNKNOWN, str(rec.get("tool") or UNKNOWN), float(cost))]


def audit_signals(rec: Mapping[str, Any]) -> list[Signal]:
    """Budget signals from the policy service's decisions and reconciles."""
    if rec.get("service") != "policy":
        return []
    action = rec.get("action")
    detail = parse_detail(rec.get("detail_json"))
    budget = detail.get("budget") if isinstance(detail, dict) else None
    ratio = None
    if isinstance(budget, dict) and isinstance(budget.get("limit"), int | float) and budget["limit"] > 0:
        ratio = float(budget.get("remaining") or 0.0) / float(budget["limit"])
    tenant = str(rec.get("tenant"))
    if action == "budget.reconcile" and rec.get("decision") == "spent":
        return [BudgetSeen(tenant, ratio, float(rec.get("cost") or 0.0), exhausted=False)]
    if action == "policy.evaluate" and (ratio is not None or str(rec.get("policy_id") or "").endswith(":budget")):
        exhausted = str(rec.get("policy_id") or "").endswith(":budget")
        return [BudgetSeen(tenant, ratio, 0.0, exhausted=exhausted)]
    return []


@dataclass(frozen=True)
class DlqReplay:
    source_role: str
    error_type: str
    count: int


def dlq_replay(rec: Mapping[str, Any]) -> DlqReplay | None:
    """An audit record ``action=dlq.replayed`` (from ``aios dlq replay``) lowers the DLQ depth."""
    if rec.get("action") != "dlq.replayed":
        return None
    detail = parse_detail(rec.get("detail_json"))
    if not isinstance(detail, dict):
        return None
    count = detail.get("count", 1)
    return DlqReplay(str(detail.get("source_role") or detail.get("source_topic") or UNKNOWN),
                     str(detail.get("error_type") or UNKNOWN), int(count) if isinstance(count, int) else 1)
