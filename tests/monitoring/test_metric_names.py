"""Every series the mesh registers follows the Prometheus conventions: ``aios_`` prefix,
``_total`` on counters only, latencies as histograms in ``_seconds``, a unit (or a
unitless kind: ratio, state, score, up) at the end of every gauge and histogram, and
bounded label values."""

from __future__ import annotations

import importlib
import re

import pytest
from prometheus_client import REGISTRY

from services.common import metrics
from tests.monitoring.promql import _METRIC_MODULES

pytestmark = pytest.mark.timeout(30)
UNITS = ("_seconds", "_bytes", "_records", "_partitions", "_currency_units", "_ratio", "_score", "_state", "_up")
# Names whose labels are caller-chosen free values would be unbounded: none may have these.
UNBOUNDED_LABELS = {"run_id", "event_id", "step_attempt", "message", "error_message", "trace_id", "key"}


def families() -> list[object]:
    for module in _METRIC_MODULES:
        importlib.import_module(module)
    return [f for f in REGISTRY.collect() if f.name.startswith("aios_")]


def test_the_mesh_registers_its_series() -> None:
    names = {f.name for f in families()}
    assert {"aios_records", "aios_consumer_lag_records", "aios_workflow_step_duration_seconds",
            "aios_circuit_breaker_state", "aios_grpc_server_handled", "aios_usage_cost_currency_units"} <= names


def test_counters_gauges_and_histograms_are_named_by_convention() -> None:
    for family in families():
        name, kind = family.name, family.type  # counters' family names drop "_total"
        assert re.fullmatch(r"aios_[a-z0-9_]+", name), name
        if kind == "counter":
            assert not name.endswith("_total"), name
        else:
            assert not name.endswith("_total"), f"{name}: only counters end in _total"
            assert name.endswith(UNITS), f"{name} ({kind}) has no unit suffix"
        if kind == "histogram" and ("duration" in name or "latency" in name or "seconds" in name):
            assert name.endswith("_seconds"), name
        if "duration" in name or name.endswith("_seconds"):
            assert kind == "histogram", f"{name}: latencies are histograms"


def test_no_series_is_labelled_by_an_unbounded_value() -> None:
    for family in families():
        for sample in family.samples:
            assert not UNBOUNDED_LABELS & set(sample.labels), (family.name, sample.labels)


def test_bounded_folds_values_past_the_limit_into_other() -> None:
    kind = "test-kind-limit"
    assert [metrics.bounded(kind, f"t{i}", limit=3) for i in range(5)] == ["t0", "t1", "t2", "other", "other"]
    assert metrics.bounded(kind, "t1", limit=3) == "t1"  # values seen before keep their series
    assert metrics.bounded(kind, "") == "unknown"
    assert metrics.bounded("test-kind-text", "free text with spaces") == "other"


def _distinct(family: str, label: str, prefix: str) -> set[str]:
    values = {s.labels[label] for f in REGISTRY.collect() if f.name == family for s in f.samples if label in s.labels}
    return {v for v in values if v.startswith(prefix) or v == metrics.OTHER}


def test_caller_chosen_labels_stay_under_the_cap_in_every_service() -> None:
    """Tenants, actions, workflows, steps and tools come from requests and records: a caller
    naming a new one on every call gets ``other`` past the cap, not a series each."""
    from services.executor import metrics as executor
    from services.executor.domain import AttemptResult
    from services.observability import metrics as observability
    from services.observability.domain.signals import Cost, StepSettled
    from services.policy import metrics as policy

    n = metrics.MAX_LABEL_VALUES + 50
    for i in range(n):
        policy.decided(f"flood-t{i}", f"flood-a{i}", "allow", budget_exhausted=True, seconds=0.001)
        policy.budget_seen(f"flood-t{i}", 1.0, 2.0)
        executor.recorded(f"flood-tool{i}", AttemptResult(attempt=1, status="ok"), late=False)
        observability.observe(StepSettled(f"flood-wf{i}", f"flood-s{i}", f"flood-tool{i}", "succeeded", 0.1))
        observability.observe(Cost(f"flood-t{i}", f"flood-wf{i}", f"flood-tool{i}", "m", 0.5, 1))
    cap = metrics.MAX_LABEL_VALUES + 1  # the values seen first, then "other"
    for family, label, prefix in [
            ("aios_policy_decisions", "tenant", "flood-t"), ("aios_policy_decisions", "action", "flood-a"),
            ("aios_policy_budget_denials", "tenant", "flood-t"), ("aios_budget_limit_currency_units", "tenant", "flood-t"),
            ("aios_policy_evaluate_duration_seconds", "action", "flood-a"),
            ("aios_executor_attempt_outcomes", "tool", "flood-tool"),
            ("aios_executor_tool_duration_seconds", "tool", "flood-tool"),
            ("aios_workflow_steps", "workflow", "flood-wf"), ("aios_workflow_steps", "step", "flood-s"),
            ("aios_workflow_steps", "tool", "flood-tool"), ("aios_usage_cost_currency_units", "workflow", "flood-wf"),
            ("aios_usage_cost_currency_units", "tenant", "flood-t"), ("aios_step_cost_currency_units", "tool", "flood-tool")]:
        seen = _distinct(family, label, prefix)
        assert metrics.OTHER in seen and len(seen) <= cap, (family, label, len(seen))
