"""What the dashboards and rules query: every PromQL expression (with Grafana's variables
filled in), the metric names it reads, and the names the mesh exports."""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from tests.monitoring.conftest import REPO

FILES = REPO / "charts" / "aios-mesh" / "files"
# Grafana's variables as a check fills them: every workflow and tenant, a 1-minute rate window.
VARIABLES = {"$__rate_interval": "1m", "$workflow": ".*", "$tenant": ".*"}
# Series Prometheus makes itself, not the mesh.
PROMETHEUS_OWN = {"up"}
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
             "offset", "inf", "nan", "le"}
_METRIC_MODULES = ("services.common.metrics", "services.planner.metrics", "services.executor.metrics",
                   "services.memory.metrics", "services.policy.metrics", "services.observability.metrics")


def dashboards() -> dict[str, dict[str, Any]]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((FILES / "dashboards").glob("*.json"))}


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels") or []


def panel_queries() -> list[tuple[str, str, str]]:
    """(dashboard, panel title, PromQL with variables filled in) for every query of every panel."""
    out = []
    for name, board in dashboards().items():
        for panel in panels(board):
            for target in panel.get("targets") or []:
                out.append((name, panel["title"], fill(target["expr"])))
    return out


def rules() -> list[dict[str, Any]]:
    return [rule for p in sorted((FILES / "rules").glob("*.yaml"))
            for group in yaml.safe_load(p.read_text())["groups"] for rule in group["rules"]]


def fill(expr: str) -> str:
    for var, value in VARIABLES.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unfilled variable in {expr}"
    return expr


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (label matchers, strings, durations and grouping clauses removed)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = set()
    for m in re.finditer(r"(?<![\w:.])([a-zA-Z_:][\w:]*)\s*(\()?", text):
        if m.group(2) is None and m.group(1).lower() not in _KEYWORDS:
            names.add(m.group(1))
    return names


def exported_names() -> set[str]:
    """Every series name the mesh's processes register (counters with _total, histograms with
    _bucket/_sum/_count), the Ray Serve series the dashboards read, and recording rules."""
    from prometheus_client import REGISTRY

    from tools.dashboards.catalog import RAY_SERVE_METRICS

    for module in _METRIC_MODULES:
        importlib.import_module(module)
    names = set(REGISTRY._names_to_collectors)  # noqa: SLF001 - the registry's own index of names
    for ray in RAY_SERVE_METRICS:
        names |= {ray, f"{ray}_total", f"{ray}_bucket", f"{ray}_sum", f"{ray}_count"}
    names |= {rule["record"] for rule in rules() if "record" in rule}
    return names


def recording_rules_file(exprs: list[str], path: Path) -> Path:
    """Every expression as a recording rule, so ``promtool check rules`` parses them all offline."""
    records = [{"record": f"aios:check:expr{i}", "expr": expr} for i, expr in enumerate(exprs)]
    path.write_text(yaml.safe_dump({"groups": [{"name": "every-expression", "rules": records}]}))
    return path
