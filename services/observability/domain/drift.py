"""Intent drift: does the intent classifier still see the traffic it saw when its baseline was taken?

One stream per tenant and model version (``name@version``): every message the
planner routed by intent (its ``run.routed`` audit record carries the intent
and the classifier's confidence). The first ``baseline_windows`` windows of a
stream are its baseline, frozen from then on; after that the last
``window_records`` messages, sliding by ``step_records``, are compared with it
each time a step fills:

- ``mix``: the Jensen-Shannon divergence (base 2, so 0 = the same mix and 1 =
  no intent in common) between the window's intent mix and the baseline's;
- ``confidence_drop``: how far the window's mean confidence fell below the
  baseline's, relative to it (0 = not lower, 0.25 = a quarter lower);
- ``score``: the larger of the two, so either alone can raise the alert.

Windows count messages, not minutes: the divergence of a sample from the mix it
was drawn from shrinks with the sample's size (77 intents: about 0.04 at 500
messages against a 2,000-message baseline, 0.10 at 200 against 1,000), so a
window of fixed size keeps that noise floor, and one threshold, the same at any
traffic rate. A refitted model has a new version and so learns a new baseline.

Pure: no Redis or Prometheus here. ``observe`` is a function from (state,
messages) to the new state; the adapter stores the state and the metrics
module exports the score."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from services.observability.domain.entries import parse_detail

__all__ = ["ROUTED_ACTION", "Classified", "DriftConfig", "DriftScore", "DriftState", "Tally", "classified",
           "js_divergence", "model_name", "observe", "score"]

ROUTED_ACTION = "run.routed"
# A stream's distinct intents are capped: a model has a fixed label set (BANKING77: 77), so more than this
# is a misbehaving producer; the excess is counted under one name instead of growing the state.
MAX_INTENTS = 512
OTHER_INTENT = "_other"


@dataclass(frozen=True)
class Classified:
    """One message the planner routed by its intent."""

    tenant: str
    model_ref: str  # name@version, as the inference service reports it
    intent: str
    confidence: float


def model_name(model_ref: str) -> str:
    """The model's name without its version: a bounded label value across refits."""
    return model_ref.split("@", 1)[0] or "unknown"


def classified(record: Mapping[str, Any]) -> Classified | None:
    """The classification a planner's ``run.routed`` audit record carries; None for any other
    record, and for runs started without an intent (an event that named its workflow) or
    without a usable confidence."""
    if record.get("action") != ROUTED_ACTION or record.get("service") != "planner":
        return None
    detail = parse_detail(record.get("detail_json"))
    if not isinstance(detail, dict):
        return None
    intent, confidence = detail.get("intent"), detail.get("score")
    if not isinstance(intent, str) or not intent:
        return None
    if isinstance(confidence, bool) or not isinstance(confidence, int | float) or math.isnan(confidence):
        return None
    return Classified(tenant=str(record.get("tenant") or ""), model_ref=str(detail.get("model_version") or "unknown"),
                      intent=intent, confidence=min(1.0, max(0.0, float(confidence))))


@dataclass(frozen=True)
class DriftConfig:
    """Window sizes, in messages (the observability service's AIOS_OBSERVABILITY_DRIFT_* settings)."""

    window_records: int = 500
    step_records: int = 100
    baseline_windows: int = 4

    def __post_init__(self) -> None:
        if self.step_records < 1 or self.window_records < 1 or self.baseline_windows < 1:
            raise ValueError(f"drift windows must be positive, got {self}")
        if self.window_records % self.step_records:
            raise ValueError(f"the drift window ({self.window_records} records) must be a multiple of its step "
                             f"({self.step_records} records)")

    @property
    def baseline_records(self) -> int:
        return self.window_records * self.baseline_windows

    @property
    def steps_per_window(self) -> int:
        return self.window_records // self.step_records


@dataclass(frozen=True)
class Tally:
    """Intent counts and the confidence sum of some messages."""

    counts: Mapping[str, int] = field(default_factory=dict)
    confidence_sum: float = 0.0

    @property
    def n(self) -> int:
        return sum(self.counts.values())

    @property
    def mean_confidence(self) -> float:
        n = self.n
        return self.confidence_sum / n if n else 0.0

    @staticmethod
    def merge(tallies: Iterable[Tally]) -> Tally:
        counts: Counter[str] = Counter()
        total = 0.0
        for t in tallies:
            counts.update(t.counts)
            total += t.confidence_sum
        return Tally(dict(counts), total)


@dataclass(frozen=True)
class DriftScore:
    mix: float
    confidence_drop: float

    @property
    def score(self) -> float:
        return max(self.mix, self.confidence_drop)


@dataclass(frozen=True)
class DriftState:
    """One stream: its baseline (complete once it holds ``baseline_records``), the closed steps of the
    current window (oldest first), the step being filled, and the last score (None until the first
    full window after the baseline)."""

    baseline: Tally = field(default_factory=Tally)
    steps: tuple[Tally, ...] = ()
    filling: Tally = field(default_factory=Tally)
    last: DriftScore | None = None


def js_divergence(p: Mapping[str, int], q: Mapping[str, int]) -> float:
    """Jensen-Shannon divergence (base 2, in [0, 1]) between two count vectors' distributions."""
    np_, nq = sum(p.values()), sum(q.values())
    if np_ <= 0 or nq <= 0:
        return 0.0
    total = 0.0
    for key in sorted(set(p) | set(q)):  # a fixed order: float sums depend on it, sets follow the hash seed
        a, b = p.get(key, 0) / np_, q.get(key, 0) / nq
        m = (a + b) / 2
        if a > 0:
            total += a * math.log2(a / m)
        if b > 0:
            total += b * math.log2(b / m)
    return min(1.0, max(0.0, total / 2))


def score(window: Tally, baseline: Tally) -> DriftScore:
    """How far ``window`` is from ``baseline``."""
    base_conf = baseline.mean_confidence
    drop = max(0.0, 1.0 - window.mean_confidence / base_conf) if base_conf > 0 else 0.0
    return DriftScore(mix=js_divergence(window.counts, baseline.counts), confidence_drop=min(1.0, drop))


def _intent(counts: Mapping[str, int], intent: str) -> str:
    return intent if intent in counts or len(counts) < MAX_INTENTS else OTHER_INTENT


def observe(state: DriftState, config: DriftConfig, messages: Iterable[tuple[str, float]]) -> DriftState:
    """The stream after ``messages`` (intent, confidence) in arrival order: the baseline fills first,
    then each filled step closes, slides the window and, once the window is full, scores it."""
    base_counts, base_conf = Counter(state.baseline.counts), state.baseline.confidence_sum
    base_n = sum(base_counts.values())
    steps = list(state.steps)
    fill_counts, fill_conf = Counter(state.filling.counts), state.filling.confidence_sum
    fill_n = sum(fill_counts.values())
    last = state.last
    for intent, confidence in messages:
        if base_n < config.baseline_records:
            base_counts[_intent(base_counts, intent)] += 1
            base_conf += confidence
            base_n += 1
            continue
        fill_counts[_intent(fill_counts, intent)] += 1
        fill_conf += confidence
        fill_n += 1
        if fill_n < config.step_records:
            continue
        steps = [*steps, Tally(dict(fill_counts), fill_conf)][-config.steps_per_window:]
        fill_counts, fill_conf, fill_n = Counter(), 0.0, 0
        if len(steps) == config.steps_per_window:
            last = score(Tally.merge(steps), Tally(base_counts, base_conf))
    return DriftState(baseline=Tally(dict(base_counts), base_conf), steps=tuple(steps),
                      filling=Tally(dict(fill_counts), fill_conf), last=last)
