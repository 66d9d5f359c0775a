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
          "ApprovalEscalated": "escalated", "ApprovalTimedOut": "timed_out"}
_DECISIONS = {"ApprovalGranted": "approved", "ApprovalRejected": "rejected", "ApprovalTimedOut": "timed_out"}
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
    """A step's last attempt settled (succeeded or failed for good)."""

    workflow: str
    step: str
    tool: str
    status: str
    seconds: float | None


@dataclass(frozen=True)
class StepRetried:
    """An attempt failed and the step is scheduled again; ``error_type`` is the failure's class."""

    workflow: str
    step: str
    tool: str
    error_type: str


@dataclass(frozen=True)
class StepFailure:
    """A step failed for good; ``error_type`` is the failure's class."""

    workflow: str
    step: str
    tool: str
    error_type: str


@dataclass(frozen=True)
class HumanIntervention:
    workflow: str
    kind: str


@dataclass(frozen=True)
class ApprovalDecided:
    """An approval was granted, rejected or timed out ``seconds`` after it was requested
    (None when the request is not known, e.g. older than the run facts' TTL)."""

    workflow: str
    decision: str
    seconds: float | None


@dataclass(frozen=True)
class Compensation:
    workflow: str
    outcome: str


@dataclass(frozen=True)
class Cost:
    """One usage record: its cost (currency units of the budget) and units (model tokens, texts or calls,
    as the tool reports them) by tenant, workflow, tool and model."""

    tenant: str
    workflow: str
    tool: str
    model: str
    amount: float
    units: float = 0.0


@dataclass(frozen=True)
class BudgetSeen:
    """A policy decision or reconcile: the tenant's budget as policy saw it."""

    tenant: str
    remaining_ratio: float | None
    spent: float
    exhausted: bool


Signal = (RunStarted | RunFinished | StepSettled | StepRetried | StepFailure | HumanIntervention | ApprovalDecided
          | Compensation | Cost | BudgetSeen)


def _seconds(duration_ms: Any) -> float | None:
    if isinstance(duration_ms, int | float) and not isinstance(duration_ms, bool) and duration_ms >= 0:
        return float(duration_ms) / 1000.0
    return None


def _number(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def step_tool(rec: Mapping[str, Any]) -> str:
    """The tool a workflow event names (StepDispatched, CompensationDispatched), if any."""
    return str(workflow_body(rec).get("tool") or "")


def failure_type(rec: Mapping[str, Any]) -> str:
    """The failure class a StepRetrying or StepFailed event carries (``unknown`` if none)."""
    failure = workflow_body(rec).get("failure")
    return str(failure.get("type") or UNKNOWN) if isinstance(failure, Mapping) else UNKNOWN


def workflow_signals(rec: Mapping[str, Any], tool: str = "", requested_at_ms: float | None = None) -> list[Signal]:
    """Signals of one workflow event; ``tool`` is the step's tool if known, ``requested_at_ms`` when
    the approval this event decides was requested (if known)."""
    kind = str(rec.get("type") or "")
    workflow = str(rec.get("workflow") or UNKNOWN)
    step = str(rec.get("step_id") or UNKNOWN)
    tool = tool or UNKNOWN
    if kind == "RunStarted":
        return [RunStarted(workflow)]
    if kind in _RUN_OUTCOMES:
        # RunFailed carries failed or compensation_failed; the status is the finer outcome.
        outcome = str(rec.get("status") or _RUN_OUTCOMES[kind]) if kind == "RunFailed" else _RUN_OUTCOMES[kind]
        return [RunFinished(workflow, outcome, _seconds(rec.get("duration_ms")))]
    if kind in _STEP_STATUS:
        settled: list[Signal] = [StepSettled(workflow, step, tool, _STEP_STATUS[kind], _seconds(rec.get("duration_ms")))]
        if kind == "StepFailed":
            settled.append(StepFailure(workflow, step, tool, failure_type(rec)))
        return settled
    if kind == "StepRetrying":
        return [StepRetried(workflow, step, tool, failure_type(rec))]
    if kind in _HUMAN:
        signals: list[Signal] = [HumanIntervention(workflow, _HUMAN[kind])]
        if kind in _DECISIONS:
            at = _number(rec.get("occurred_at"))
            waited = (at - requested_at_ms) / 1000.0 if at is not None and requested_at_ms is not None else None
            signals.append(ApprovalDecided(workflow, _DECISIONS[kind], max(0.0, waited) if waited is not None
                                           else None))
        return signals
    if kind in _COMPENSATION:
        return [Compensation(workflow, _COMPENSATION[kind])]
    return []


def usage_signals(rec: Mapping[str, Any], workflow: str) -> list[Signal]:
    """A usage record's cost and units (nothing when it has neither)."""
    cost = max(0.0, _number(rec.get("cost")) or 0.0)
    units = max(0.0, _number(rec.get("units")) or 0.0)
    if cost <= 0 and units <= 0:
        return []
    return [Cost(str(rec.get("tenant")), workflow or UNKNOWN, str(rec.get("tool") or UNKNOWN),
                 str(rec.get("model") or "none"), cost, units)]


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
