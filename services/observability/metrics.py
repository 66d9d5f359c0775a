"""The Prometheus series SREs put on Grafana, derived from the records the
audit trail consumes (workflow events, usage, audit, dead letters), so the
planner and executor need not count them. Observed only for records stored for
the first time, so a redelivered record never counts twice.

Label values come from bounded sets: outcomes and kinds from fixed lists;
every value a record carries (tenant, workflow, step, tool, model, error class)
goes through ``metrics.bounded``, because a record names them and a misbehaving
producer could name a new one on every record. Deployed workflows and
registered tools stay well under the cap, so they keep their own series."""

from __future__ import annotations

import threading

from prometheus_client import Counter, Gauge, Histogram

from services.common.metrics import bounded
from services.observability.domain.drift import DriftScore, model_name
from services.observability.domain.signals import (
    ApprovalDecided,
    BudgetSeen,
    Compensation,
    Cost,
    HumanIntervention,
    RunFinished,
    RunStarted,
    Signal,
    StepFailure,
    StepRetried,
    StepSettled,
)

_DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14400, 86400)
_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
_COST_BUCKETS = (0.0001, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 50)
_DECISION_BUCKETS = (1, 5, 15, 30, 60, 300, 900, 1800, 3600, 4 * 3600, 12 * 3600, 86400, 3 * 86400, 7 * 86400)

RUNS_STARTED = Counter("aios_workflow_runs_started_total", "Workflow runs started", ["workflow"])
RUNS_FINISHED = Counter("aios_workflow_runs_finished_total",
                        "Workflow runs that reached a final state (completed, failed, compensation_failed, "
                        "cancelled)", ["workflow", "outcome"])
RUN_SECONDS = Histogram("aios_workflow_run_duration_seconds", "Run duration from start to final state",
                        ["workflow", "outcome"], buckets=_DURATION_BUCKETS)
STEPS = Counter("aios_workflow_steps_total", "Steps settled (succeeded, failed) by workflow, step and tool",
                ["workflow", "step", "tool", "status"])
STEP_SECONDS = Histogram("aios_workflow_step_duration_seconds",
                         "Duration of a step's settling attempt as the planner saw it",
                         ["workflow", "step", "tool", "status"], buckets=_DURATION_BUCKETS)
STEP_RETRIES = Counter("aios_workflow_step_retries_total",
                       "Step attempts scheduled again after a failure, by the failure's class",
                       ["workflow", "step", "tool", "error_type"])
STEP_FAILURES = Counter("aios_workflow_step_failures_total", "Steps that failed for good, by the failure's class",
                        ["workflow", "step", "tool", "error_type"])
HUMAN = Counter("aios_human_interventions_total",
                "Human-in-the-loop events: approval requested, approved, rejected, escalated, timed_out",
                ["workflow", "kind"])
APPROVAL_SECONDS = Histogram("aios_approval_decision_duration_seconds",
                             "Time from an approval request to its decision (approved, rejected, timed_out)",
                             ["workflow", "decision"], buckets=_DECISION_BUCKETS)
COMPENSATIONS = Counter("aios_workflow_compensations_total", "Saga compensations started or failed",
                        ["workflow", "outcome"])
COST = Counter("aios_usage_cost_currency_units_total",
               "Cost recorded in usage records, in the budget's currency units", ["tenant", "workflow", "model"])
USAGE_UNITS = Counter("aios_usage_units_total",
                      "Usage units recorded (model tokens, texts or calls, as the tool reports them)",
                      ["tenant", "workflow", "model"])
STEP_COST = Histogram("aios_step_cost_currency_units", "Cost of one step attempt", ["tool"], buckets=_COST_BUCKETS)
BUDGET_REMAINING_RATIO = Gauge("aios_budget_remaining_ratio",
                               "Share of the tenant's budget window left, as the last policy decision saw it",
                               ["tenant"])
BUDGET_SPENT = Counter("aios_budget_spent_currency_units_total", "Spend reconciled against budgets", ["tenant"])
BUDGET_EXHAUSTED = Counter("aios_budget_exhausted_total", "Steps denied because the budget was exhausted",
                           ["tenant"])
DLQ_DEPTH = Gauge("aios_dlq_depth_records", "Dead letters not yet replayed, by source topic role and error type",
                  ["source_topic", "error_type"])
EVENT_LAG = Histogram("aios_event_lag_seconds", "Time from a record's occurred_at to observability consuming it",
                      ["topic"], buckets=_LAG_BUCKETS)
ENTRIES = Counter("aios_audit_entries_total", "Audit entries by source topic; duplicate = redelivery ignored",
                  ["topic", "outcome"])
# Intent drift of the classifier per tenant (domain/drift.py): set when a window after the baseline fills.
_DRIFT_LABELS = ["tenant", "model"]
DRIFT_SCORE = Gauge("aios_intent_drift_score",
                    "Distance of the last window of routed messages from the baseline: the larger of the intent "
                    "mix divergence and the confidence drop (0 = same, 1 = disjoint)", _DRIFT_LABELS)
MIX_DIVERGENCE = Gauge("aios_intent_mix_divergence_score",
                       "Jensen-Shannon divergence (base 2) of the last window's intent mix from the baseline's",
                       _DRIFT_LABELS)
CONFIDENCE_DROP = Gauge("aios_intent_confidence_drop_ratio",
                        "How far the last window's mean classifier confidence fell below the baseline's, "
                        "relative to it (0 = not lower)", _DRIFT_LABELS)


def _wf(workflow: str) -> str:
    return bounded("workflow", workflow)


def _step(workflow: str, step: str, tool: str) -> tuple[str, str, str]:
    return _wf(workflow), bounded("step", step), bounded("tool", tool)


def observe(signal: Signal) -> None:
    """One signal -> its series."""
    match signal:
        case RunStarted(workflow):
            RUNS_STARTED.labels(_wf(workflow)).inc()
        case RunFinished(workflow, outcome, seconds):
            RUNS_FINISHED.labels(_wf(workflow), outcome).inc()
            if seconds is not None:
                RUN_SECONDS.labels(_wf(workflow), outcome).observe(seconds)
        case StepSettled(workflow, step, tool, status, seconds):
            STEPS.labels(*_step(workflow, step, tool), status).inc()
            if seconds is not None:
                STEP_SECONDS.labels(*_step(workflow, step, tool), status).observe(seconds)
        case StepRetried(workflow, step, tool, error_type):
            STEP_RETRIES.labels(*_step(workflow, step, tool), bounded("error_type", error_type)).inc()
        case StepFailure(workflow, step, tool, error_type):
            STEP_FAILURES.labels(*_step(workflow, step, tool), bounded("error_type", error_type)).inc()
        case HumanIntervention(workflow, kind):
            HUMAN.labels(_wf(workflow), kind).inc()
        case ApprovalDecided(workflow, decision, seconds):
            if seconds is not None:
                APPROVAL_SECONDS.labels(_wf(workflow), decision).observe(seconds)
        case Compensation(workflow, outcome):
            COMPENSATIONS.labels(_wf(workflow), outcome).inc()
        case Cost(tenant, workflow, tool, model, amount, units):
            labels = (bounded("tenant", tenant), _wf(workflow), bounded("model", model))
            if amount > 0:
                COST.labels(*labels).inc(amount)
                STEP_COST.labels(bounded("tool", tool)).observe(amount)
            if units > 0:
                USAGE_UNITS.labels(*labels).inc(units)
        case BudgetSeen(tenant, ratio, spent, exhausted):
            tenant = bounded("tenant", tenant)
            if ratio is not None:
                BUDGET_REMAINING_RATIO.labels(tenant).set(ratio)
            if spent > 0:
                BUDGET_SPENT.labels(tenant).inc(spent)
            if exhausted:
                BUDGET_EXHAUSTED.labels(tenant).inc()


def set_dlq_depths(depths: dict[tuple[str, str], int]) -> None:
    for (role, error_type), depth in depths.items():
        DLQ_DEPTH.labels(role, bounded("error_type", error_type)).set(depth)


def sync_drift(scores: dict[tuple[str, str], DriftScore]) -> None:
    """Export the drift scores every replica shares (the store's), and drop series of streams no
    longer in it: a replica whose partitions moved away no longer keeps exporting the score it saw
    last, which ``max by (tenant, model)`` in the alert would pick over the live one."""
    with _DRIFT_LOCK:  # the consumer's batches and the refresh thread: one snapshot at a time
        _sync_drift(scores)


_DRIFT_LOCK = threading.Lock()


def _sync_drift(scores: dict[tuple[str, str], DriftScore]) -> None:
    wanted: dict[tuple[str, str], DriftScore] = {}
    for (tenant, ref), s in sorted(scores.items()):  # two versions of a model mid-refit: the higher
        labels = (bounded("tenant", tenant), bounded("model", model_name(ref)))
        if labels not in wanted or s.score > wanted[labels].score:
            wanted[labels] = s
    for gauge, value in ((DRIFT_SCORE, "score"), (MIX_DIVERGENCE, "mix"), (CONFIDENCE_DROP, "confidence_drop")):
        for labels in [tuple(sample.labels.values()) for metric in gauge.collect() for sample in metric.samples]:
            if labels not in wanted:
                gauge.remove(*labels)
        for labels, s in wanted.items():
            gauge.labels(*labels).set(getattr(s, value))
