"""Workflow files as `aios workflows validate` and the planner read them: random text, and the
deployed workflows with values replaced, keys dropped and keys added at random places. Validation
answers a list of errors (each naming its path) or none; a file it passes builds into a definition.
Nothing raises."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.common.errors import ConfigError
from services.planner.domain.workflow import build
from services.planner.workflows import load_file
from tests.fuzz.conftest import EXAMPLES, examples
from tools.aios.cli import validate_file

pytestmark = pytest.mark.timeout(300)
REPO = Path(__file__).resolve().parents[2]
DEPLOYED = [yaml.safe_load(p.read_text()) for p in sorted((REPO / "workflows").glob("*.yaml"))]
FUZZ = settings(max_examples=examples(200), deadline=2000,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                    st.text(max_size=40), st.sampled_from(["${input.x}", "${steps.a.output}", "${", "}", "${1/0}",
                                                           "${input.", "a", "", "-1", "retry", "ok"]))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=12), inner, max_size=3)),
                      max_leaves=8)


def _check(path: Path) -> None:
    EXAMPLES["workflow yaml"] += 1
    errors, raw = validate_file(path)
    assert all(isinstance(e, str) and e.startswith(str(path)) for e in errors), errors
    if not errors:
        build(raw)  # what validation passes, the planner can load
    try:  # and the planner's own loader says the same, as a ConfigError
        load_file(path)
    except ConfigError as exc:
        assert errors and str(path) in str(exc)
    else:
        assert not errors


def _containers(doc: Any, trail: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [trail]
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else []
    for key, value in items:
        if isinstance(value, (dict, list)):
            found += _containers(value, (*trail, key))
    return found


def _at(doc: Any, trail: tuple[Any, ...]) -> Any:
    for key in trail:
        doc = doc[key]
    return doc


@st.composite
def mutated_workflows(draw: st.DrawFn) -> Any:
    doc = copy.deepcopy(draw(st.sampled_from(DEPLOYED)))
    for _ in range(draw(st.integers(1, 4))):
        target = _at(doc, draw(st.sampled_from(_containers(doc))))
        keys = list(target) if isinstance(target, dict) else list(range(len(target)))
        op = draw(st.sampled_from(["replace", "drop", "add"]))
        if op == "add" or not keys:
            if isinstance(target, dict):
                target[draw(st.sampled_from(["id", "tool", "when", "depends_on", "retry", "inputs", "x"]))] = \
                    draw(VALUES)
            else:
                target.append(draw(VALUES))
        elif op == "drop":
            del target[draw(st.sampled_from(keys))]
        else:
            target[draw(st.sampled_from(keys))] = draw(VALUES)
    return doc


@FUZZ
@given(st.text(max_size=400))
def test_random_text(tmp_path: Path, text: str) -> None:
    path = tmp_path / "wf.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    _check(path)


@FUZZ
@given(mutated_workflows())
def test_mutated_deployed_workflows(tmp_path: Path, doc: Any) -> None:
    path = tmp_path / "wf.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True))
    _check(path)


@FUZZ
@given(st.binary(max_size=200))
def test_random_bytes(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "wf.yaml"
    path.write_bytes(data)
    _check(path)
