"""The Prometheus series SREs put on Grafana, fed from the audit trail's
inputs. Observed only for records stored for the first time, so a
redelivered record never counts twice."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from services.observability.domain.signals import (
    BudgetSeen,
    Compensation,
    Cost,
    HumanIntervention,
    RunFinished,
    RunStarted,
    Signal,
    StepRetried,
    StepSettled,
)

_DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14400, 86400)
_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
_COST_BUCKETS = (0.0001, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 50)

RUNS_STARTED = Counter("aios_workflow_runs_started_total", "Workflow runs started", ["workflow"])
RUNS_FINISHED = Counter("aios_workflow_runs_finished_total",
                        "Workflow runs that reached a final state (completed, failed, compensation_failed, "
                        "cancelled)", ["workflow", "outcome"])
RUN_SECONDS = Histogram("aios_workflow_run_duration_seconds", "Run duration from start to final state",
                        ["workflow", "outcome"], buckets=_DURATION_BUCKETS)
STEPS = Counter("aios_workflow_steps_total", "Step results (succeeded, failed) by tool", ["tool", "status"])
STEP_SECONDS = Histogram("aios_workflow_step_duration_seconds", "Duration of a step attempt as the planner saw it",
                         ["tool", "status"], buckets=_DURATION_BUCKETS)
STEP_RETRIES = Counter("aios_workflow_step_retries_total", "Step attempts scheduled again after a failure",
                       ["tool"])
HUMAN = Counter("aios_human_interventions_total",
                "Human-in-the-loop events: approval requested, approved, rejected, escalated",
                ["workflow", "kind"])
COMPENSATIONS = Counter("aios_workflow_compensations_total", "Saga compensations started or failed",
                        ["workflow", "outcome"])
COST = Counter("aios_cost_total", "Cost recorded in usage records (currency units)", ["tenant", "workflow"])
STEP_COST = Histogram("aios_step_cost", "Cost of one step attempt (currency units)", ["tool"],
                      buckets=_COST_BUCKETS)
BUDGET_REMAINING_RATIO = Gauge("aios_budget_remaining_ratio",
                               "Share of the tenant's budget window left, as the last policy decision saw it",
                               ["tenant"])
BUDGET_SPENT = Counter("aios_budget_spent_total", "Spend reconciled against budgets (currency units)",
                       ["tenant"])
BUDGET_EXHAUSTED = Counter("aios_budget_exhausted_total", "Steps denied because the budget was exhausted",
                           ["tenant"])
DLQ_DEPTH = Gauge("aios_dlq_depth", "Dead letters not yet replayed, by source topic role and error type",
                  ["source_topic", "error_type"])
EVENT_LAG = Histogram("aios_event_lag_seconds", "Time from a record's occurred_at to observability consuming it",
                      ["topic"], buckets=_LAG_BUCKETS)
ENTRIES = Counter("aios_audit_entries_total", "Audit entries by source topic; duplicate = redelivery ignored",
                  ["topic", "outcome"])


def observe(signal: Signal) -> None:
    """One signal -> its series."""
    match signal:
        case RunStarted(workflow):
            RUNS_STARTED.labels(workflow).inc()
        case RunFinished(workflow, outcome, seconds):
            RUNS_FINISHED.labels(workflow, outcome).inc()
            if seconds is not None:
                RUN_SECONDS.labels(workflow, outcome).observe(seconds)
        case StepSettled(tool, status, seconds):
            STEPS.labels(tool, status).inc()
            if seconds is not None:
                STEP_SECONDS.labels(tool, status).observe(seconds)
        case StepRetried(tool):
            STEP_RETRIES.labels(tool).inc()
        case HumanIntervention(workflow, kind):
            HUMAN.labels(workflow, kind).inc()
        case Compensation(workflow, outcome):
            COMPENSATIONS.labels(workflow, outcome).inc()
        case Cost(tenant, workflow, tool, amount):
            COST.labels(tenant, workflow).inc(amount)
            STEP_COST.labels(tool).observe(amount)
        case BudgetSeen(tenant, ratio, spent, exhausted):
            if ratio is not None:
                BUDGET_REMAINING_RATIO.labels(tenant).set(ratio)
            if spent > 0:
                BUDGET_SPENT.labels(tenant).inc(spent)
            if exhausted:
                BUDGET_EXHAUSTED.labels(tenant).inc()


def set_dlq_depths(depths: dict[tuple[str, str], int]) -> None:
    for (role, error_type), depth in depths.items():
        DLQ_DEPTH.labels(role, error_type).set(depth)
