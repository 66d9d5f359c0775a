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
