"""Each preset renders exactly as committed in tests/chart/golden/
(regenerate after an intended change: .venv/bin/python -m tests.chart.golden --write)."""

from __future__ import annotations

import difflib

import pytest

from tests.chart import golden, kube

pytestmark = pytest.mark.timeout(120)


def test_every_preset_has_a_golden_file() -> None:
    assert sorted(p.stem for p in golden.GOLDEN.glob("*.yaml")) == sorted(kube.presets())


@pytest.mark.parametrize("preset", sorted(kube.presets()))
def test_render_matches_golden(preset: str) -> None:
    path = golden.GOLDEN / f"{preset}.yaml"
    expected, actual = path.read_text(), golden.rendered(preset)
    if actual != expected:
        diff = "".join(list(difflib.unified_diff(expected.splitlines(True), actual.splitlines(True),
                                                 str(path), "rendered"))[:80])
        pytest.fail(f"{path.name} is stale; review and run `.venv/bin/python -m tests.chart.golden --write`:\n{diff}")
