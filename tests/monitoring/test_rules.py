"""The chart's alert rules: ``promtool check rules`` accepts them, ``promtool test rules``
runs a firing and a quiet case for every alert (``rule_cases``), and every alert has a
summary and a runbook section."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.monitoring.conftest import REPO
from tests.monitoring.rule_cases import CASES

pytestmark = pytest.mark.timeout(120)
RULES = sorted((REPO / "charts" / "aios-mesh" / "files" / "rules").glob("*.yaml"))
RUNBOOKS = REPO / "docs" / "runbooks.md"


def alerts() -> dict[str, dict[str, Any]]:
    out = {}
    for path in RULES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                if "alert" in rule:
                    out[rule["alert"]] = rule
    return out


def _annotations(rule: dict[str, Any], labels: dict[str, str]) -> dict[str, str]:
    """The rule's annotations as Prometheus expands them (they use only ``$labels``)."""
    def expand(text: str) -> str:
        assert "$value" not in text, "annotations must not use $value (unstable notification text)"
        return re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels.get(m.group(1), ""), text)
    return {k: expand(v) for k, v in rule["annotations"].items()}


def promtool_tests(cases: list[Any]) -> dict[str, Any]:
    """A promtool unit-test file for ``cases``."""
    rules = alerts()
    tests = []
    for case in cases:
        evals = []
        for at, name, firing in case.expect:
            evals.append({"eval_time": at, "alertname": name, "exp_alerts": [
                {"exp_labels": labels, "exp_annotations": _annotations(rules[name], labels)} for labels in firing]})
        tests.append({"name": case.name, "interval": "1m",
                      "input_series": [{"series": s, "values": v} for s, v in case.series.items()],
                      "alert_rule_test": evals})
    return {"rule_files": [str(p) for p in RULES], "evaluation_interval": "1m", "tests": tests}


def run_promtool(promtool: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(promtool), *args], capture_output=True, text=True, timeout=60)


def test_promtool_checks_the_rules(promtool: Path) -> None:
    assert RULES, "no rule files in the chart"
    checked = run_promtool(promtool, "check", "rules", *map(str, RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.count("SUCCESS") == len(RULES)


def test_promtool_unit_tests_pass(promtool: Path, tmp_path: Path) -> None:
    spec = tmp_path / "alerts.test.yaml"
    spec.write_text(yaml.safe_dump(promtool_tests(CASES), sort_keys=False))
    ran = run_promtool(promtool, "test", "rules", str(spec))
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "SUCCESS" in ran.stdout + ran.stderr


def test_a_wrong_expectation_fails(promtool: Path, tmp_path: Path) -> None:
    """The harness can fail: expecting the quiet workflow to burn its budget is caught."""
    case = CASES[0]
    wrong = type(case)(case.name, case.series,
                       [("70m", "AiosStepLatencyBudgetBurnFast", [{"workflow": "fine", "severity": "critical"}])])
    spec = tmp_path / "wrong.test.yaml"
    spec.write_text(yaml.safe_dump(promtool_tests([wrong]), sort_keys=False))
    ran = run_promtool(promtool, "test", "rules", str(spec))
    assert ran.returncode != 0 and "FAILED" in ran.stdout + ran.stderr


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    fires = {name for case in CASES for _at, name, firing in case.expect if firing}
    quiet = {name for case in CASES for _at, name, firing in case.expect if not firing}
    assert set(alerts()) - fires == set(), "alerts without a case where they fire"
    assert set(alerts()) - quiet - {"AiosStepLatencyBudgetBurnSlow", "AiosRunSuccessBudgetBurnFast"} == set(), \
        "alerts without a case where they stay quiet"
    # The two exempted are quiet by exact firing sets: "fine" never burns, "refund" at 10% burns only slowly.


def test_every_alert_has_a_summary_severity_and_runbook_section() -> None:
    headings = {m.group(1) for m in re.finditer(r"^## (\w+)\s*$", RUNBOOKS.read_text(), re.M)}
    for name, rule in alerts().items():
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        assert rule["annotations"]["runbook_url"] == f"docs/runbooks.md#{name.lower()}", name
        assert name in headings, f"docs/runbooks.md has no '## {name}' section"
