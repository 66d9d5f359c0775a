"""The README's configuration reference names every AIOS_* variable the Helm chart can set
(its templates, values and CI presets), so an operator reading a rendered pod finds each one."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "aios-mesh"
pytestmark = pytest.mark.timeout(30)
# Written once in the README for all five services.
PER_SERVICE = re.compile(r"AIOS_(PLANNER|EXECUTOR|MEMORY|POLICY|OBSERVABILITY)_(ADDR|METRICS_PORT)")


def configuration_section() -> str:
    readme = (REPO / "README.md").read_text()
    start = readme.index("## Configuration")
    return readme[start:readme.index("\n## ", start + 1)]


def chart_variables() -> set[str]:
    files = [*(CHART / "templates").rglob("*"), CHART / "values.yaml", *(CHART / "ci").glob("*.yaml")]
    return {name for path in files if path.is_file()
            for name in re.findall(r"\bAIOS_[A-Z0-9_]*[A-Z0-9]\b", path.read_text())}


def test_every_variable_the_chart_sets_is_documented() -> None:
    documented = set(re.findall(r"\bAIOS_[A-Z0-9_]*[A-Z0-9]\b", configuration_section()))
    names = chart_variables()
    assert "AIOS_GRPC_LISTEN_ADDR" in names and "AIOS_TOPICS_PARTITIONS" in names  # the scan finds them
    missing = sorted(n for n in names - documented if not PER_SERVICE.fullmatch(n))
    assert not missing, f"README.md ## Configuration does not mention {missing}"
