"""Prometheus rules: SLO recording rules and multi-window burn-rate alerts for step
latency and run success, and alerts for dead-letter growth, consumer lag, budgets,
open circuit breakers, drift and services down. Each alert has a summary and a
runbook section in docs/runbooks.md (``tests/monitoring`` checks both). Annotations use
``$labels`` only, never ``$value``: a notification's text stays stable while it fires."""

from __future__ import annotations

from typing import Any

__all__ = ["DRIFT_SCORE_THRESHOLD", "OBJECTIVES", "RULE_FILES", "STEP_LATENCY_THRESHOLD_S", "runbook_anchor"]

RUNBOOKS = "docs/runbooks.md"
STEP_LATENCY_THRESHOLD_S = 5  # a step is "fast enough" when it settles within this (a histogram bucket bound)
OBJECTIVES = {"step_latency": 0.99, "run_success": 0.99}
# Intent drift (services/observability/domain/drift.py) alerts above this: five times the noise floor of a
# 500-message window of the same BANKING77 mix against a 2,000-message baseline (0.03-0.04), reached when
# about 40% of a window moves to a few intents (30%: 0.15; all of it to five intents: 0.85), or when the
# mean confidence falls by a fifth.
DRIFT_SCORE_THRESHOLD = 0.2
WINDOWS = ("5m", "30m", "1h", "6h")
# (long window, short window, burn rate, for, severity): the SRE workbook's page and ticket pairs.
BURNS = (("1h", "5m", 14.4, "2m", "critical", "Fast"), ("6h", "30m", 6, "15m", "warning", "Slow"))


def runbook_anchor(alert: str) -> str:
    """The heading anchor of an alert's runbook section (the heading is the alert's name)."""
    return alert.lower()


def _alert(name: str, expr: str, summary: str, description: str, *, for_: str, severity: str) -> dict[str, Any]:
    return {"alert": name, "expr": expr, "for": for_, "labels": {"severity": severity},
            "annotations": {"summary": summary, "description": description,
                            "runbook_url": f"{RUNBOOKS}#{runbook_anchor(name)}"}}


def _slo_records() -> list[dict[str, Any]]:
    le = f'le="{float(STEP_LATENCY_THRESHOLD_S)}"'  # prometheus_client writes bucket bounds as floats
    rules = []
    for w in WINDOWS:
        rules.append({"record": f"aios:step_latency:error_ratio_rate{w}", "expr": (
            f"1 - (sum by (workflow) (rate(aios_workflow_step_duration_seconds_bucket{{{le}}}[{w}]))"
            f" / sum by (workflow) (rate(aios_workflow_step_duration_seconds_count[{w}])))")})
    for w in WINDOWS:
        rules.append({"record": f"aios:run_success:error_ratio_rate{w}", "expr": (
            f'sum by (workflow) (rate(aios_workflow_runs_finished_total{{outcome=~"failed|compensation_failed"}}'
            f"[{w}])) / sum by (workflow) (rate(aios_workflow_runs_finished_total{{outcome!=\"cancelled\"}}[{w}]))")})
    return rules


def _burn_alerts() -> list[dict[str, Any]]:
    what = {"step_latency": ("StepLatency", f"steps settling within {STEP_LATENCY_THRESHOLD_S} s"),
            "run_success": ("RunSuccess", "runs completing")}
    alerts = []
    for sli, (camel, good) in what.items():
        budget = round(1 - OBJECTIVES[sli], 6)
        for long, short, burn, for_, severity, speed in BURNS:
            limit = f"({burn} * {budget})"
            alerts.append(_alert(
                f"Aios{camel}BudgetBurn{speed}",
                f"aios:{sli}:error_ratio_rate{long} > {limit} and aios:{sli}:error_ratio_rate{short} > {limit}",
                f"{{{{ $labels.workflow }}}} burns its {sli.replace('_', ' ')} error budget {burn}x too fast",
                f"Over {long} (and still over {short}) more than {burn} x {budget:.0%} of {{{{ $labels.workflow }}}}'s"
                f" {good.split()[0]} miss the objective ({OBJECTIVES[sli]:.0%} {good}); at this rate the 30-day "
                "budget is gone in " + ("2 days" if burn > 10 else "5 days") + ".",
                for_=for_, severity=severity))
    return alerts


def _mesh_alerts() -> list[dict[str, Any]]:
    depth = "sum by (source_topic, error_type) (aios_dlq_depth_records)"
    return [
        _alert("AiosDeadLettersGrowing",
               f"{depth} > 0 unless {depth.replace('records)', 'records offset 15m)')} >= {depth}",
               "Dead letters from {{ $labels.source_topic }} ({{ $labels.error_type }}) are accumulating",
               "Dead letters wait for replay and their number grew in the last 15 minutes.",
               for_="5m", severity="warning"),
        _alert("AiosConsumerLagHigh", "sum by (service, topic) (aios_consumer_lag_records) > 1000",
               "{{ $labels.service }} is far behind on {{ $labels.topic }}",
               "The consumer group of {{ $labels.service }} has stayed more than 1000 records behind the high "
               "watermark of {{ $labels.topic }} for 10 minutes.", for_="10m", severity="warning"),
        _alert("AiosBudgetNearlyExhausted", "min by (tenant) (aios_budget_remaining_ratio) < 0.1",
               "Tenant {{ $labels.tenant }} has less than 10% of its budget window left",
               "Policy last saw less than 10% of the window's budget left; steps will be denied when it runs out.",
               for_="5m", severity="warning"),
        _alert("AiosBudgetExhausted",
               "sum by (tenant) (increase(aios_budget_exhausted_total[10m])) > 0 "
               "or min by (tenant) (aios_budget_remaining_ratio) <= 0",
               "Tenant {{ $labels.tenant }} has exhausted its budget: steps are denied",
               "Policy denies steps of {{ $labels.tenant }} for budget, or its remaining budget is 0.",
               for_="1m", severity="critical"),
        _alert("AiosCircuitBreakerOpen", 'max by (connector) (aios_circuit_breaker_state{state!="closed"}) == 1',
               "Circuit breaker of connector {{ $labels.connector }} is open",
               "Calls to {{ $labels.connector }} fail fast (open or half-open) for 2 minutes: its API keeps "
               "failing; steps using it are retried and may exhaust their retries.", for_="2m", severity="warning"),
        _alert("AiosIntentDrift", f"max by (tenant, model) (aios_intent_drift_score) > {DRIFT_SCORE_THRESHOLD}",
               "Intent mix or classifier confidence of {{ $labels.model }} for {{ $labels.tenant }} drifted from "
               "the baseline",
               f"The last window of messages routed by intent scored above {DRIFT_SCORE_THRESHOLD} against the "
               "stream's baseline for 30 minutes: the intent mix moved (aios_intent_mix_divergence_score) or the "
               "classifier's mean confidence fell (aios_intent_confidence_drop_ratio).",
               for_="30m", severity="warning"),
        _alert("AiosServiceDown", 'up{job=~"planner|executor|memory|policy|observability"} == 0',
               "AIOS mesh {{ $labels.job }} is not being scraped",
               "Prometheus cannot scrape {{ $labels.job }} at {{ $labels.instance }} for 5 minutes.",
               for_="5m", severity="critical"),
    ]


def slo_rules() -> dict[str, Any]:
    return {"groups": [{"name": "aios-mesh.slo.records", "rules": _slo_records()},
                       {"name": "aios-mesh.slo.alerts", "rules": _burn_alerts()}]}


def mesh_rules() -> dict[str, Any]:
    return {"groups": [{"name": "aios-mesh.alerts", "rules": _mesh_alerts()}]}


# file stem -> rules document; the chart's PrometheusRule takes every file's groups.
RULE_FILES = {"aios-mesh-slo": slo_rules, "aios-mesh-alerts": mesh_rules}
