"""The committed dashboards and rules are what ``tools.dashboards`` generates; every
dashboard has a datasource variable, a unique uid and stays under 256 KiB; every PromQL
expression parses and names only series the mesh exports."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.monitoring import promql
from tools.dashboards import __main__ as generator

pytestmark = pytest.mark.timeout(120)
MAX_BYTES = 256 * 1024


def test_regenerating_gives_the_committed_files() -> None:
    assert generator.stale() == [], "run: .venv/bin/python -m tools.dashboards"


def test_every_dashboard_of_the_catalog_is_committed() -> None:
    from tools.dashboards.catalog import DASHBOARDS

    assert set(promql.dashboards()) == set(DASHBOARDS) == {"overview", "workflows", "inference", "cost", "kafka",
                                                           "approvals"}


def test_dashboards_have_unique_uids_a_datasource_variable_and_a_small_size() -> None:
    uids = []
    for name, board in promql.dashboards().items():
        path = promql.FILES / "dashboards" / f"{name}.json"
        assert path.stat().st_size < MAX_BYTES, f"{name}: {path.stat().st_size} bytes"
        uids.append(board["uid"])
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
        ids = [p["id"] for p in promql.panels(board)]
        assert len(ids) == len(set(ids)), f"{name}: panel ids repeat"
        for panel in promql.panels(board):
            if panel["type"] != "row":
                assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
                assert panel.get("targets"), f"{name}/{panel['title']} has no query"
        for var in variables.values():
            if var["type"] == "query":
                assert var["datasource"]["uid"] == "${datasource}", var["name"]
    assert len(uids) == len(set(uids)), uids


def test_every_expression_parses(promtool: Path, tmp_path: Path) -> None:
    exprs = [q for _d, _t, q in promql.panel_queries()] + \
        [rule["expr"] for rule in promql.rules()] + \
        [promql.fill(v["query"].removeprefix("label_values(").rsplit(",", 1)[0])
         for board in promql.dashboards().values() for v in board["templating"]["list"] if v["type"] == "query"]
    checked = subprocess.run([str(promtool), "check", "rules", str(promql.recording_rules_file(exprs, tmp_path /
                                                                                               "exprs.yaml"))],
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in checked.stdout


def test_a_bad_expression_does_not_parse(promtool: Path, tmp_path: Path) -> None:
    path = promql.recording_rules_file(["sum by (service (rate(aios_records_total[1m]))"], tmp_path / "bad.yaml")
    assert subprocess.run([str(promtool), "check", "rules", str(path)], capture_output=True, timeout=60).returncode


def test_expressions_name_only_exported_series() -> None:
    exported = promql.exported_names() | promql.PROMETHEUS_OWN
    used = {}
    for dashboard, title, expr in promql.panel_queries():
        used.update({name: f"{dashboard}/{title}" for name in promql.metric_names(expr)})
    for rule in promql.rules():
        used.update({name: rule.get("alert") or rule.get("record") for name in promql.metric_names(rule["expr"])})
    unknown = {name: where for name, where in used.items() if name not in exported}
    assert unknown == {}
    assert len(used) > 30


def test_metric_names_are_extracted_from_promql() -> None:
    expr = ('histogram_quantile(0.95, sum by (workflow, le) (rate(aios_x_bucket{workflow=~"a|b", le="5.0"}[1m]))) '
            '/ on (workflow) group_left sum(aios:rec:ratio offset 5m) or vector(0) unless up == bool 0')
    assert promql.metric_names(expr) == {"aios_x_bucket", "aios:rec:ratio", "up"}
