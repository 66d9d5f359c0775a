"""The six dashboards: mesh overview (golden signals per service), workflows, inference
tiers, cost and budgets, Kafka and consumer lag, approvals.

Series come from every service's /metrics (job = the service, as the chart's
ServiceMonitor labels it) and from Ray's metrics endpoint (job ``inference``: the
Serve batch queues of the two tiers). Panels for things an ordinary run may not
produce (dead letters, retries, budget denials, escalations, open circuits) end in
``or vector(0)`` so they show 0 rather than "No data"; so do the intent drift panels, which
have a score only once a stream's baseline and first window are complete."""

from __future__ import annotations

from typing import Any

from tools.dashboards.panels import RATE, Dashboard, Q, Row, Var, stat, timeseries
from tools.dashboards.rules import DRIFT_SCORE_THRESHOLD

__all__ = ["DASHBOARDS", "RAY_SERVE_METRICS", "TIERS"]

# The Serve deployments behind each inference tier (services/inference/app.py).
TIERS = {"LowLatencyEncoder": "low_latency", "HighThroughputEncoder": "high_throughput"}
_TIER = 'deployment=~"LowLatencyEncoder|HighThroughputEncoder"'
# Ray Serve's own series (Ray prefixes "ray_"), scraped from Ray's metrics export port.
RAY_SERVE_METRICS = ("ray_serve_batch_wait_time_ms", "ray_serve_actual_batch_size", "ray_serve_batch_queue_length",
                     "ray_serve_batch_execution_time_ms", "ray_serve_deployment_processing_latency_ms",
                     "ray_serve_deployment_request_counter")


def _tier(expr: str) -> str:
    """``expr`` (by deployment) relabelled by tier name."""
    return (f'label_replace(label_replace({expr}, "tier", "low_latency", "deployment", "LowLatencyEncoder"), '
            f'"tier", "high_throughput", "deployment", "HighThroughputEncoder")')


def _p(quantile: float, metric: str, by: str, match: str = "") -> str:
    return f"histogram_quantile({quantile}, sum by ({by}, le) (rate({metric}_bucket{{{match}}}[{RATE}])))"


def _rate(metric: str, by: str, match: str = "") -> str:
    return f"sum by ({by}) (rate({metric}{{{match}}}[{RATE}]))"


def overview() -> dict[str, Any]:
    services = Row("Golden signals per service", [
        timeseries("Traffic: records handled", Q(_rate("aios_records_total", "service"), "{{service}}"),
                   unit="ops", description="Records the consumer loop handled per second, every outcome."),
        timeseries("Traffic: gRPC calls", Q(_rate("aios_grpc_server_handled_total", "job, grpc_method"),
                                            "{{job}} {{grpc_method}}"), unit="reqps"),
        timeseries("Errors: dead letters and transient retries",
                   Q(_rate("aios_dead_letters_total", "service") + " or vector(0)", "dead letters {{service}}"),
                   Q(_rate("aios_transient_retries_total", "service") + " or vector(0)", "retries {{service}}"),
                   unit="ops"),
        timeseries("Errors: gRPC calls not OK",
                   Q(_rate("aios_grpc_server_handled_total", "job, grpc_code", 'grpc_code!="OK"') + " or vector(0)",
                     "{{job}} {{grpc_code}}"), unit="reqps"),
        timeseries("Latency: consumer batch p99", Q(_p(0.99, "aios_consumer_batch_duration_seconds", "service"),
                                                    "{{service}}"), unit="s"),
        timeseries("Latency: gRPC p99", Q(_p(0.99, "aios_grpc_server_handling_seconds", "job, grpc_method"),
                                          "{{job}} {{grpc_method}}"), unit="s"),
        timeseries("Saturation: consumer lag", Q("sum by (service) (aios_consumer_lag_records)", "{{service}}"),
                   unit="short", description="Records behind the high watermark, summed over partitions."),
        timeseries("Saturation: admission queue and paused partitions",
                   Q("sum by (service) (aios_admission_queue_records)", "admission queue {{service}}"),
                   Q("sum by (service, reason) (aios_consumer_paused_partitions)", "paused {{service}} {{reason}}"),
                   unit="short", description="Records held back for capacity, and partitions paused for "
                   "capacity (backpressure) or to retry a record (retry)."),
    ])
    health = Row("Health", [
        stat("Services up", Q("sum(aios_service_up)"), description="Processes reporting aios_service_up = 1."),
        stat("Scrape targets up", Q("sum(up)")),
        stat("Runs finished (1h)", Q("sum(increase(aios_workflow_runs_finished_total[1h]))")),
        stat("Dead letters pending", Q("sum(aios_dlq_depth_records) or vector(0)")),
    ])
    return Dashboard("aios-mesh-overview", "AIOS mesh / Overview",
                     "Golden signals (traffic, errors, latency, saturation) of every mesh service.", [health, services])


_W = 'workflow=~"$workflow"'


def workflows() -> dict[str, Any]:
    runs = Row("Runs", [
        timeseries("Runs started", Q(_rate("aios_workflow_runs_started_total", "workflow", _W), "{{workflow}}"),
                   unit="ops"),
        timeseries("Runs finished by outcome",
                   Q(_rate("aios_workflow_runs_finished_total", "workflow, outcome", _W), "{{workflow}} {{outcome}}"),
                   unit="ops"),
        timeseries("Run success ratio (SLI)",
                   Q(f'sum by (workflow) (rate(aios_workflow_runs_finished_total{{{_W}, outcome="completed"}}[{RATE}]))'
                     f' / sum by (workflow) (rate(aios_workflow_runs_finished_total{{{_W}, outcome!="cancelled"}}'
                     f"[{RATE}]))", "{{workflow}}"), unit="percentunit"),
        timeseries("Run duration p50 / p95",
                   Q(_p(0.5, "aios_workflow_run_duration_seconds", "workflow", _W), "p50 {{workflow}}"),
                   Q(_p(0.95, "aios_workflow_run_duration_seconds", "workflow", _W), "p95 {{workflow}}"), unit="s"),
    ])
    steps = Row("Steps", [
        timeseries("Step latency p95 by step",
                   Q(_p(0.95, "aios_workflow_step_duration_seconds", "workflow, step", _W), "{{workflow}}/{{step}}"),
                   unit="s", width=24),
        timeseries("Steps settled", Q(_rate("aios_workflow_steps_total", "workflow, step, status", _W),
                                      "{{workflow}}/{{step}} {{status}}"), unit="ops"),
        timeseries("Step latency SLI (share within 5 s)",
                   Q("1 - aios:step_latency:error_ratio_rate5m", "{{workflow}}"), unit="percentunit",
                   description="From the recording rule aios:step_latency:error_ratio_rate5m (objective 99%)."),
        timeseries("Retries by failure class",
                   Q(_rate("aios_workflow_step_retries_total", "workflow, error_type", _W) + " or vector(0)",
                     "{{workflow}} {{error_type}}"), unit="ops"),
        timeseries("Failures by failure class",
                   Q(_rate("aios_workflow_step_failures_total", "workflow, error_type", _W) + " or vector(0)",
                     "{{workflow}} {{error_type}}"), unit="ops"),
        timeseries("Compensations", Q(_rate("aios_workflow_compensations_total", "workflow, outcome", _W)
                                      + " or vector(0)", "{{workflow}} {{outcome}}"), unit="ops"),
        timeseries("Executor tool time p95", Q(_p(0.95, "aios_executor_tool_duration_seconds", "tool"), "{{tool}}"),
                   unit="s"),
    ])
    admission = Row("Admission", [
        timeseries("Admission queue depth",
                   Q('sum(aios_admission_queue_records{service="planner"})', "deferred for capacity"),
                   Q('sum(aios_consumer_lag_records{service="planner", topic=~".*ingress.events"})', "ingress lag"),
                   unit="short", description="Ingress records the planner deferred because a tenant or workflow "
                   "is at its in-flight limit, and all ingress records it has not admitted yet."),
        timeseries("Admission waits", Q(f"sum(rate(aios_admission_waits_total[{RATE}])) or vector(0)", "waits"),
                   unit="ops"),
        timeseries("Circuit breakers not closed",
                   Q('max by (connector) (aios_circuit_breaker_state{state!="closed"}) or vector(0)',
                     "{{connector}}"), unit="short"),
        timeseries("Memory recall latency p95", Q(_p(0.95, "aios_memory_recall_duration_seconds", "phase"),
                                                  "{{phase}}"), unit="s"),
    ])
    return Dashboard("aios-mesh-workflows", "AIOS mesh / Workflows",
                     "Runs and steps by workflow: rates, outcomes, latency, retries and failures by class.",
                     [runs, steps, admission],
                     variables=[Var("workflow", "Workflow", "aios_workflow_runs_started_total")])


def inference() -> dict[str, Any]:
    tiers = Row("Tiers (Ray Serve batch queues)", [
        timeseries("Queue time p50 / p95 by tier",
                   Q(_tier(_p(0.5, "ray_serve_batch_wait_time_ms", "deployment", _TIER)), "p50 {{tier}}"),
                   Q(_tier(_p(0.95, "ray_serve_batch_wait_time_ms", "deployment", _TIER)), "p95 {{tier}}"),
                   unit="ms", description="Time requests waited for their batch to fill."),
        timeseries("Batch size by tier (mean)",
                   Q(_tier(f"sum by (deployment) (rate(ray_serve_actual_batch_size_sum{{{_TIER}}}[{RATE}])) / "
                           f"sum by (deployment) (rate(ray_serve_actual_batch_size_count{{{_TIER}}}[{RATE}]))"),
                     "{{tier}}"), unit="short", description="Texts per batch (batch_size_fn counts texts)."),
        timeseries("Batch execution p95 by tier",
                   Q(_tier(_p(0.95, "ray_serve_batch_execution_time_ms", "deployment", _TIER)), "{{tier}}"),
                   unit="ms"),
        timeseries("Batch queue length by tier",
                   Q(_tier(f"max by (deployment) (ray_serve_batch_queue_length{{{_TIER}}})"), "{{tier}}"),
                   unit="short"),
        timeseries("Requests by deployment",
                   Q(_rate("ray_serve_deployment_request_counter_total", "deployment"), "{{deployment}}"), unit="reqps"),
        timeseries("Processing latency p95 by deployment",
                   Q(_p(0.95, "ray_serve_deployment_processing_latency_ms", "deployment"), "{{deployment}}"),
                   unit="ms"),
    ])
    callers = Row("Callers", [
        timeseries("Memory recall p95 (embed = inference round trip)",
                   Q(_p(0.95, "aios_memory_recall_duration_seconds", "phase"), "{{phase}}"), unit="s"),
        timeseries("Model usage units by model", Q(_rate("aios_usage_units_total", "model"), "{{model}}"),
                   unit="short"),
    ])
    # A stream has a score only after its baseline and one window (2,500 routed messages by default).
    drift = Row("Intent drift (alert AiosIntentDrift)", [
        timeseries(f"Drift score by tenant and model (alert above {DRIFT_SCORE_THRESHOLD})",
                   Q("max by (tenant, model) (aios_intent_drift_score) or vector(0)", "{{tenant}} {{model}}"),
                   unit="short", description="The larger of the two below for the last window against the baseline."),
        timeseries("Intent mix divergence and confidence drop",
                   Q("max by (tenant, model) (aios_intent_mix_divergence_score) or vector(0)",
                     "mix {{tenant}} {{model}}"),
                   Q("max by (tenant, model) (aios_intent_confidence_drop_ratio) or vector(0)",
                     "confidence drop {{tenant}} {{model}}"), unit="short"),
    ])
    return Dashboard("aios-mesh-inference", "AIOS mesh / Inference tiers",
                     "Ray Serve tiers: queue time, batch size, execution time, request rate; callers' view; "
                     "intent drift.", [tiers, callers, drift])


_T = 'tenant=~"$tenant"'


def cost() -> dict[str, Any]:
    spend = Row("Spend", [
        timeseries("Cost rate by tenant", Q(_rate("aios_usage_cost_currency_units_total", "tenant", _T)
                                            + " or vector(0)", "{{tenant}}"), unit="short",
                   description="Currency units of the budget per second, from usage records."),
        timeseries("Cost by workflow (1h)", Q(f"sum by (workflow) (increase(aios_usage_cost_currency_units_total"
                                              f"{{{_T}}}[1h])) or vector(0)", "{{workflow}}"), unit="short"),
        timeseries("Cost by model (1h)", Q(f"sum by (model) (increase(aios_usage_cost_currency_units_total"
                                           f"{{{_T}}}[1h])) or vector(0)", "{{model}}"), unit="short"),
        timeseries("Usage units by tenant and model",
                   Q(_rate("aios_usage_units_total", "tenant, model", _T), "{{tenant}} {{model}}"), unit="short",
                   description="Tokens, texts or calls, as each tool reports them."),
        timeseries("Step cost p95 by tool", Q(_p(0.95, "aios_step_cost_currency_units", "tool") + " or vector(0)",
                                              "{{tool}}"), unit="short"),
    ])
    budgets = Row("Budgets", [
        timeseries("Budget remaining (share of window)", Q(f"min by (tenant) (aios_budget_remaining_ratio{{{_T}}})",
                                                           "{{tenant}}"), unit="percentunit"),
        timeseries("Budget remaining and limit",
                   Q(f"min by (tenant) (aios_budget_remaining_currency_units{{{_T}}})", "remaining {{tenant}}"),
                   Q(f"max by (tenant) (aios_budget_limit_currency_units{{{_T}}})", "limit {{tenant}}"),
                   unit="short"),
        timeseries("Spend reconciled", Q(_rate("aios_budget_spent_currency_units_total", "tenant", _T)
                                         + " or vector(0)", "{{tenant}}"), unit="short"),
        timeseries("Steps denied for budget", Q(_rate("aios_budget_exhausted_total", "tenant", _T) + " or vector(0)",
                                                "{{tenant}}"), unit="ops"),
    ])
    return Dashboard("aios-mesh-cost", "AIOS mesh / Cost and budgets",
                     "Cost and usage by tenant, workflow and model; budgets as policy sees them.", [spend, budgets],
                     variables=[Var("tenant", "Tenant", "aios_policy_decisions_total")])


def kafka() -> dict[str, Any]:
    lag = Row("Consumer lag", [
        timeseries("Lag by service and topic", Q("sum by (service, topic) (aios_consumer_lag_records)",
                                                 "{{service}} {{topic}}"), unit="short", width=24),
        timeseries("Lag by partition", Q("max by (service, topic, partition) (aios_consumer_lag_records)",
                                         "{{service}} {{topic}}[{{partition}}]"), unit="short", width=24),
        timeseries("Event lag to observability p95", Q(_p(0.95, "aios_event_lag_seconds", "topic"), "{{topic}}"),
                   unit="s", description="occurred_at to consumed by observability."),
    ])
    flow = Row("Flow and errors", [
        timeseries("Records by topic and outcome", Q(_rate("aios_records_total", "topic, outcome"),
                                                     "{{topic}} {{outcome}}"), unit="ops"),
        timeseries("Batch handling p99 by topic", Q(_p(0.99, "aios_consumer_batch_duration_seconds", "topic"),
                                                    "{{topic}}"), unit="s"),
        timeseries("Dead letters by topic and error", Q(_rate("aios_dead_letters_total", "topic, error_type")
                                                        + " or vector(0)", "{{topic}} {{error_type}}"), unit="ops"),
        timeseries("Dead-letter depth", Q("sum by (source_topic, error_type) (aios_dlq_depth_records) or vector(0)",
                                          "{{source_topic}} {{error_type}}"), unit="short"),
        timeseries("Transient retries by class", Q(_rate("aios_transient_retries_total", "service, error_type")
                                                   + " or vector(0)", "{{service}} {{error_type}}"), unit="ops"),
        timeseries("Backpressure pauses", Q(_rate("aios_backpressure_pauses_total", "service, topic")
                                            + " or vector(0)", "{{service}} {{topic}}"), unit="ops"),
    ])
    return Dashboard("aios-mesh-kafka", "AIOS mesh / Kafka and consumer lag",
                     "Consumer lag per group (service) and partition, flow, dead letters, retries.", [lag, flow])


def approvals() -> dict[str, Any]:
    row = Row("Approvals", [
        timeseries("Approvals requested", Q(_rate("aios_human_interventions_total", "workflow", 'kind="requested"')
                                            + " or vector(0)", "{{workflow}}"), unit="ops"),
        timeseries("Decisions by kind", Q(_rate("aios_human_interventions_total", "kind", 'kind!="requested"')
                                          + " or vector(0)", "{{kind}}"), unit="ops"),
        timeseries("Time to decision p50 / p95",
                   Q(_p(0.5, "aios_approval_decision_duration_seconds", "workflow") + " or vector(0)",
                     "p50 {{workflow}}"),
                   Q(_p(0.95, "aios_approval_decision_duration_seconds", "workflow") + " or vector(0)",
                     "p95 {{workflow}}"), unit="s"),
        timeseries("Policy decisions by effect", Q(_rate("aios_policy_decisions_total", "effect"), "{{effect}}"),
                   unit="ops"),
        stat("Requested (24h)", Q('sum(increase(aios_human_interventions_total{kind="requested"}[24h])) '
                                  "or vector(0)")),
        stat("Decided (24h)", Q('sum(increase(aios_human_interventions_total{kind=~"approved|rejected|timed_out"}'
                                '[24h])) or vector(0)')),
        stat("Escalated (24h)", Q('sum(increase(aios_human_interventions_total{kind="escalated"}[24h])) '
                                  "or vector(0)")),
    ])
    return Dashboard("aios-mesh-approvals", "AIOS mesh / Approvals",
                     "Human-in-the-loop: approvals requested, decisions and time to decision.", [row])


# file stem -> builder; the chart renders one ConfigMap per file.
DASHBOARDS = {"overview": overview, "workflows": workflows, "inference": inference, "cost": cost,
              "kafka": kafka, "approvals": approvals}
