"""Unit cases for every alert, run by ``promtool test rules``: input series (1 m apart) and,
at chosen times, exactly which alerts of a name fire with which labels. Each alert has a
case where it fires and one where it stays quiet (pending, or a neighbour series)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Case:
    name: str
    series: dict[str, str]
    # (eval time, alert name, label sets expected to fire; [] = none fires)
    expect: list[tuple[str, str, list[dict[str, str]]]] = field(default_factory=list)


def _steps(wf: str, good: int, total: int) -> dict[str, str]:
    return {f'aios_workflow_step_duration_seconds_bucket{{le="5.0",workflow="{wf}",step="s1",tool="t"}}':
            f"0+{good}x480",
            f'aios_workflow_step_duration_seconds_count{{workflow="{wf}",step="s1",tool="t"}}': f"0+{total}x480"}


def _runs(wf: str, **per_outcome: int) -> dict[str, str]:
    return {f'aios_workflow_runs_finished_total{{workflow="{wf}",outcome="{o}"}}': f"0+{n}x480"
            for o, n in per_outcome.items()}


CASES = [
    Case("step latency burns the budget of one workflow", {**_steps("refund", 50, 100), **_steps("fine", 100, 100)}, [
        ("1m", "AiosStepLatencyBudgetBurnFast", []),  # pending for 2m
        ("70m", "AiosStepLatencyBudgetBurnFast", [{"workflow": "refund", "severity": "critical"}]),
        ("70m", "AiosStepLatencyBudgetBurnSlow", [{"workflow": "refund", "severity": "warning"}]),
    ]),
    Case("run failures: 10% burns slowly, 50% fast; cancellations do not count", {
        **_runs("refund", completed=90, failed=10), **_runs("bad", completed=50, compensation_failed=50),
        **_runs("cancels", completed=50, cancelled=50)}, [
        ("70m", "AiosRunSuccessBudgetBurnFast", [{"workflow": "bad", "severity": "critical"}]),
        ("70m", "AiosRunSuccessBudgetBurnSlow", [{"workflow": "refund", "severity": "warning"},
                                                  {"workflow": "bad", "severity": "warning"}]),
        ("10m", "AiosRunSuccessBudgetBurnSlow", []),  # still pending (for 15m)
    ]),
    Case("dead letters growing, then steady", {
        'aios_dlq_depth_records{source_topic="step_requests",error_type="BadRecord"}': "0x10 1x40",
        'aios_dlq_depth_records{source_topic="ingress",error_type="PermanentError"}': "_x20 2x30"}, [
        ("12m", "AiosDeadLettersGrowing", []),  # grew at 11m: pending
        ("20m", "AiosDeadLettersGrowing", [{"source_topic": "step_requests", "error_type": "BadRecord",
                                            "severity": "warning"}]),
        ("30m", "AiosDeadLettersGrowing", [{"source_topic": "ingress", "error_type": "PermanentError",
                                            "severity": "warning"}]),
        ("45m", "AiosDeadLettersGrowing", []),  # both steady for 15m
    ]),
    Case("consumer lag summed over partitions", {
        'aios_consumer_lag_records{service="executor",topic="t.step.requests",partition="0"}': "800x30",
        'aios_consumer_lag_records{service="executor",topic="t.step.requests",partition="1"}': "400x30",
        'aios_consumer_lag_records{service="planner",topic="t.ingress.events",partition="0"}': "900x30"}, [
        ("5m", "AiosConsumerLagHigh", []),
        ("15m", "AiosConsumerLagHigh", [{"service": "executor", "topic": "t.step.requests", "severity": "warning"}]),
    ]),
    Case("budget nearly exhausted", {'aios_budget_remaining_ratio{tenant="acme"}': "0.05x20",
                                     'aios_budget_remaining_ratio{tenant="globex"}': "0.5x20"}, [
        ("2m", "AiosBudgetNearlyExhausted", []),
        ("10m", "AiosBudgetNearlyExhausted", [{"tenant": "acme", "severity": "warning"}]),
    ]),
    Case("budget exhausted: denials or nothing left", {
        'aios_budget_exhausted_total{tenant="acme"}': "0 0 1 2 3 4 5 6 7 8 9 10",
        'aios_budget_remaining_ratio{tenant="zero"}': "0x12", 'aios_budget_remaining_ratio{tenant="fine"}': "0.5x12",
        'aios_budget_exhausted_total{tenant="fine"}': "3x12"}, [
        ("0m", "AiosBudgetExhausted", []),  # pending (for 1m)
        ("5m", "AiosBudgetExhausted", [{"tenant": "acme", "severity": "critical"},
                                       {"tenant": "zero", "severity": "critical"}]),
    ]),
    Case("a circuit stays open on every replica", {
        'aios_circuit_breaker_state{connector="bank",state="open",instance="a"}': "0 0 1 1 1 0 1 1 1",
        'aios_circuit_breaker_state{connector="bank",state="half-open",instance="a"}': "0 0 0 0 0 1 0 0 0",
        'aios_circuit_breaker_state{connector="bank",state="closed",instance="a"}': "1 1 0 0 0 0 0 0 0",
        'aios_circuit_breaker_state{connector="bank",state="open",instance="b"}': "0 0 1 1 1 1 1 1 1",
        'aios_circuit_breaker_state{connector="crm",state="closed",instance="a"}': "1x8",
        'aios_circuit_breaker_state{connector="crm",state="open",instance="a"}': "0x8"}, [
        ("3m", "AiosCircuitBreakerOpen", []),
        ("6m", "AiosCircuitBreakerOpen", [{"connector": "bank", "severity": "warning"}]),
    ]),
    Case("intent drift: one tenant's stream shifted for 30 minutes, another's did not, a third recovered", {
        'aios_intent_drift_score{tenant="acme",model="intent-minilm-lr",instance="a"}': "0.04x5 0.8x40",
        'aios_intent_drift_score{tenant="globex",model="intent-minilm-lr",instance="a"}': "0.04x45",
        'aios_intent_drift_score{tenant="initech",model="intent-minilm-lr",instance="a"}': "0.5x20 0.05x25"}, [
        ("20m", "AiosIntentDrift", []),  # acme above 0.2 since 6m: pending (for 30m)
        ("40m", "AiosIntentDrift", [{"tenant": "acme", "model": "intent-minilm-lr", "severity": "warning"}]),
    ]),
    Case("a mesh service is down", {'up{job="planner",instance="127.0.0.1:9101"}': "0x10",
                                    'up{job="executor",instance="127.0.0.1:9102"}': "1x10",
                                    'up{job="node",instance="127.0.0.1:9100"}': "0x10"}, [
        ("3m", "AiosServiceDown", []),
        ("6m", "AiosServiceDown", [{"job": "planner", "instance": "127.0.0.1:9101", "severity": "critical"}]),
    ]),
]
