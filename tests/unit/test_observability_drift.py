"""Intent drift, the pure domain: a stream of real BANKING77 intents scores low against its own
baseline and high once its mix shifts or its confidence drops; scores are deterministic and do
not depend on how the stream was cut into batches; bad windows are refused with their names."""

from __future__ import annotations

import json
import random

import pytest
from pydantic import ValidationError

from services.observability.adapters.drift_store import InMemoryDriftStore, decode, encode
from services.observability.domain.drift import (
    Classified,
    DriftConfig,
    DriftState,
    classified,
    js_divergence,
    model_name,
    observe,
)
from services.observability.settings import ObservabilitySettings
from tests.unit.intent_streams import SHIFTED_INTENTS, stream
from tests.unit.planner_twins import mesh
from tools.dashboards.rules import DRIFT_SCORE_THRESHOLD

pytestmark = pytest.mark.timeout(30)
CONFIG = DriftConfig()  # the service's defaults: 500-message windows sliding by 100, a 4-window baseline


def _baseline(seed: int = 1) -> DriftState:
    return observe(DriftState(), CONFIG, stream(CONFIG.baseline_records, seed=seed))


def test_js_divergence_is_zero_for_the_same_mix_one_for_disjoint_and_symmetric() -> None:
    assert js_divergence({"a": 2, "b": 2}, {"a": 5, "b": 5}) == 0.0
    assert js_divergence({"a": 3}, {"b": 7}) == 1.0
    p, q = {"a": 9, "b": 1}, {"a": 1, "b": 9, "c": 2}
    assert js_divergence(p, q) == pytest.approx(js_divergence(q, p))
    assert 0 < js_divergence(p, q) < 1
    assert js_divergence({}, q) == 0.0  # nothing to compare yet


def test_the_same_mix_scores_low_in_every_window() -> None:
    state = _baseline()
    scores = []
    for i in range(10):  # ten steps of fresh messages from the same mix, a score after each
        state = observe(state, CONFIG, stream(CONFIG.step_records, seed=100 + i))
        if state.last is not None:
            scores.append(state.last.score)
    assert len(scores) == 10 - CONFIG.steps_per_window + 1
    assert max(scores) < DRIFT_SCORE_THRESHOLD / 2, scores  # measured 0.029-0.038: sampling noise only


def test_a_mix_shifted_to_five_intents_scores_high() -> None:
    state = observe(_baseline(), CONFIG, stream(CONFIG.window_records, seed=2, only=SHIFTED_INTENTS))
    assert state.last is not None
    assert state.last.mix > 0.75, state.last  # measured 0.85
    assert state.last.confidence_drop < 0.02  # same confidences: the mix alone raised it
    assert state.last.score == state.last.mix > DRIFT_SCORE_THRESHOLD


def test_a_partial_shift_rises_with_its_share() -> None:
    """30% of one window's messages moved to five intents scores between the two; the whole window, high."""
    state = _baseline()
    shifted = [*stream(350, seed=3), *stream(150, seed=4, only=SHIFTED_INTENTS)]
    partial = observe(state, CONFIG, shifted).last
    full = observe(state, CONFIG, stream(500, seed=4, only=SHIFTED_INTENTS)).last
    same = observe(state, CONFIG, stream(500, seed=3)).last
    assert partial is not None and full is not None and same is not None
    assert same.mix < partial.mix < full.mix


def test_a_confidence_drop_scores_high_with_the_same_mix() -> None:
    """The same intents, but the classifier is far less sure (Beta(3, 3): mean 0.5 against 0.8)."""
    state = observe(_baseline(), CONFIG, stream(CONFIG.window_records, seed=5, confidence=(3.0, 3.0)))
    assert state.last is not None
    assert state.last.mix < DRIFT_SCORE_THRESHOLD / 2
    assert state.last.confidence_drop == pytest.approx(0.375, abs=0.03)
    assert state.last.score == state.last.confidence_drop > DRIFT_SCORE_THRESHOLD
    higher = observe(_baseline(), CONFIG, stream(CONFIG.window_records, seed=5, confidence=(20.0, 1.0))).last
    assert higher is not None and higher.confidence_drop == 0.0  # more confident is not drift


def test_no_score_until_the_baseline_and_one_window_are_complete() -> None:
    config = DriftConfig(window_records=20, step_records=5, baseline_windows=2)
    messages = stream(config.baseline_records + config.window_records, seed=6)
    almost = observe(DriftState(), config, messages[:-1])
    assert almost.baseline.n == 40 and almost.last is None
    done = observe(almost, config, messages[-1:])
    assert done.last is not None and len(done.steps) == 4 and done.filling.n == 0
    later = observe(done, config, stream(3, seed=7))
    assert later.last == done.last and later.filling.n == 3  # a step is not full yet: the score stays
    assert later.baseline == done.baseline  # frozen once complete


def test_scores_are_deterministic_and_independent_of_batching() -> None:
    messages = stream(CONFIG.baseline_records + 1234, seed=8)
    whole = observe(DriftState(), CONFIG, messages)
    state = DriftState()
    for start in range(0, len(messages), 37):
        state = decode(encode(observe(state, CONFIG, messages[start:start + 37])))  # through storage, too
    assert encode(state) == encode(whole)
    assert encode(observe(DriftState(), CONFIG, messages)) == encode(whole)


def test_distinct_intents_are_capped() -> None:
    config = DriftConfig(window_records=10, step_records=10, baseline_windows=100)
    state = observe(DriftState(), config, [(f"intent-{i}", 0.9) for i in range(600)])
    assert len(state.baseline.counts) == 513 and state.baseline.counts["_other"] == 88


def _routed(**detail: object) -> dict[str, object]:
    return {"service": "planner", "action": "run.routed", "tenant": "acme", "run_id": "r1",
            "detail_json": json.dumps(detail)}


def test_classified_reads_the_planners_routing_record() -> None:
    got = classified(_routed(intent="card_arrival", score=0.93, model_version="intent-minilm-lr@abc", reason="x"))
    assert got == Classified("acme", "intent-minilm-lr@abc", "card_arrival", 0.93)
    assert model_name(got.model_ref) == "intent-minilm-lr"
    assert classified(_routed(intent="a", score=1.7, model_version="m@1")) == Classified("acme", "m@1", "a", 1.0)
    # A run started by an event that named its workflow has no intent; other records are not routing.
    assert classified(_routed(intent=None, score=0.0, model_version="", reason="event names workflow w")) is None
    assert classified(_routed(intent="a", score=True, model_version="m@1")) is None
    assert classified({**_routed(intent="a", score=0.5), "action": "run.completed"}) is None
    assert classified({**_routed(intent="a", score=0.5), "service": "policy"}) is None
    assert classified({**_routed(), "detail_json": "not json"}) is None


def test_windows_that_do_not_divide_are_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="multiple of its step"):
        DriftConfig(window_records=500, step_records=300)
    monkeypatch.setenv("AIOS_OBSERVABILITY_DRIFT_WINDOW_RECORDS", "500")
    monkeypatch.setenv("AIOS_OBSERVABILITY_DRIFT_STEP_RECORDS", "300")
    with pytest.raises(ValidationError, match="AIOS_OBSERVABILITY_DRIFT_WINDOW_RECORDS"):
        ObservabilitySettings()


def test_the_in_memory_store_keeps_streams_per_tenant_and_model_version() -> None:
    config = DriftConfig(window_records=10, step_records=5, baseline_windows=1)
    store = InMemoryDriftStore(config)

    def batch(tenant: str, ref: str, seed: int, only: tuple[str, ...] = ()) -> list[Classified]:
        return [Classified(tenant, ref, i, c) for i, c in stream(10, seed=seed, only=only)]

    first = store.observe([*batch("a", "m@1", 1), *batch("b", "m@1", 2)])
    assert [(u.tenant, u.started, u.baseline_records, u.score) for u in first] == [("a", True, 10, None),
                                                                                   ("b", True, 10, None)]
    second = store.observe(batch("a", "m@1", 3, SHIFTED_INTENTS) + batch("a", "m@2", 4))
    assert [(u.model_ref, u.started) for u in second] == [("m@1", False), ("m@2", True)]
    assert second[0].score is not None and second[1].score is None  # a new version learns its own baseline
    assert set(store.scores()) == {("a", "m@1")}


class _Classifier:
    """The inference service's answer for the planner's routing (a model ref, per text a label and score)."""

    def classify(self, texts: list[str]) -> list[tuple[str | None, float, str]]:
        return [("card_arrival", 0.87, "intent-minilm-lr@abc123") for _ in texts]


def test_the_planners_routing_record_carries_what_drift_reads() -> None:
    """Contract: the audit record the planner writes when it routes an ingress event by intent
    (Avro-encoded and decoded) is what ``classified`` understands."""
    flow = {"name": "reply", "version": 1, "trigger": {"event_type": "support.message.received", "intents": [
        "card_arrival"]}, "steps": [{"id": "a", "tool": "noop"}]}
    m = mesh(flow)
    m.planner.classifier = _Classifier()
    m.planner.handle([m.publisher.inbound("ingress", "c-1", {
        "tenant": "t1", "source": "support", "type": "support.message.received", "subject": "c-1",
        "data_json": json.dumps({"text": "Where is my card?"})})])
    routed = [classified(r) for r in m.publisher.decoded("audit")]
    assert [c for c in routed if c is not None] == [Classified("t1", "intent-minilm-lr@abc123", "card_arrival", 0.87)]


def test_js_divergence_does_not_depend_on_the_order_keys_were_counted_in() -> None:
    """Float sums depend on their order: a window counted in arrival order and the same window read
    back from storage (keys sorted) must score bit for bit the same, whatever the hash seed."""
    p = {f"intent_{i}": 1 + (i * 7919) % 13 for i in range(300)}
    q = {f"intent_{i}": 1 + (i * 104729) % 11 for i in range(0, 300, 2)}
    rng = random.Random(9)
    reordered = [dict(rng.sample(list(p.items()), len(p))) for _ in range(40)]
    assert {js_divergence(r, q) for r in reordered} == {js_divergence(p, q)}
