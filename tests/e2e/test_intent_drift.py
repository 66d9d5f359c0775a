"""Intent drift through the real parts: the observability service as a process, the embedded
broker and Redis, and a real Prometheus (Debian's package) that scrapes it and evaluates the
chart's rules every second.

Two tenants' planners route a stream of real BANKING77 intents (``run.routed`` audit records,
as the planner writes them, produced onto the audit topic): first a baseline of the natural mix
(the default 2,000 messages) and a window of the same mix for both; the observability service
is then restarted (the streams and scores live in Redis); then tenant ``shifted`` gets a window
of only five intents while ``steady`` gets more of the same mix. The drift score of ``steady``
stays below the alert's threshold and AiosIntentDrift never goes pending for it; ``shifted``
crosses the threshold and the alert goes pending (its ``for: 30m`` is promtool's part,
tests/monitoring/rule_cases.py)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from infra.stack import Ports, Stack
from services.common.audit import audit_record
from services.common.catalog import Catalog
from services.common.codec import AvroCodec
from services.common.kafka import MeshProducer
from services.observability.domain.drift import DriftConfig
from tests.conftest import wait_for
from tests.e2e.conftest import print_log_tails
from tests.monitoring import live
from tests.monitoring.conftest import prometheus_binary
from tests.unit.intent_streams import SHIFTED_INTENTS, stream
from tools.dashboards.rules import DRIFT_SCORE_THRESHOLD

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]
MODEL_REF = "intent-minilm-lr@e2e"
MODEL = "intent-minilm-lr"
CONFIG = DriftConfig()  # the service's defaults
ALERT_EXPR = f"max by (tenant, model) (aios_intent_drift_score) > {DRIFT_SCORE_THRESHOLD}"


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    stack = Stack(Ports.fresh(), run_dir=tmp_path / "run", topic_prefix="drift.", tenant="steady", auth=False)
    try:
        stack.start_broker()
        stack.start_redis(persist=False)
        stack.ensure_topics()
        stack.start_service("observability")
        yield stack
    except BaseException:
        print_log_tails(stack)
        raise
    finally:
        procs = list(stack.procs.values())
        stack.down()
        assert not [p.name for p in procs if p.alive()], "processes left behind"


class Planner:
    """Writes what the planner writes when it routes a message by its intent."""

    def __init__(self, stack: Stack) -> None:
        catalog = Catalog(stack.topic_prefix)
        self.producer = MeshProducer(stack.env()["AIOS_KAFKA_BOOTSTRAP"], catalog, AvroCodec(catalog.schemas))
        self.sent = 0

    def route(self, tenant: str, messages: list[tuple[str, float]]) -> None:
        for intent, score in messages:
            self.sent += 1
            run_id = f"run-{self.sent}"
            self.producer.send("audit", key=run_id, record=audit_record(
                "planner", tenant, "run.routed", run_id=run_id, actor="source:support", decision="support-reply@1",
                reason=f"intent {intent} -> support-reply",
                detail={"intent": intent, "score": score, "model_version": MODEL_REF, "reason": "routed"}))
        self.producer.flush()


def scraped(stack: Stack) -> dict[tuple[str, str], float]:
    """The observability service's /metrics: (series name, tenant) -> value for model MODEL."""
    text = httpx.get(f"http://127.0.0.1:{stack.ports.metrics['observability']}/metrics", timeout=5).text
    out = {}
    for name, labels, value in re.findall(r"^(aios_intent_\w+)\{([^}]*)\} (\S+)$", text, re.M):
        found = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if found.get("model") == MODEL:
            out[(name, found["tenant"])] = float(value)
    return out


def audit_stored(stack: Stack) -> int:
    """Audit records the (restarted) observability process stored as new: redeliveries count as duplicates."""
    text = httpx.get(f"http://127.0.0.1:{stack.ports.metrics['observability']}/metrics", timeout=5).text
    found = re.search(r'^aios_audit_entries_total\{outcome="stored",topic="audit"\} (\S+)$', text, re.M)
    return int(float(found.group(1))) if found else 0


def drift_alerts(prom: live.Prometheus) -> dict[str, str]:
    """AiosIntentDrift alerts Prometheus holds (pending or firing): tenant -> state."""
    return {a["labels"]["tenant"]: a["state"] for a in prom.get("/api/v1/alerts")["alerts"]
            if a["labels"]["alertname"] == "AiosIntentDrift"}


def _score(prom: live.Prometheus, tenant: str) -> float | None:
    result = prom.series(f'aios_intent_drift_score{{tenant="{tenant}",model="{MODEL}"}}')
    return float(result[0]["value"][1]) if result else None


def test_a_shifted_stream_of_banking77_intents_raises_the_drift_alert_and_a_steady_one_does_not(
        stack: Stack, tmp_path: Path) -> None:
    planner = Planner(stack)
    figures: dict[str, Any] = {}
    with live.running(prometheus_binary("prometheus"), stack, tmp_path) as prom:
        # 1. Baseline and one window of the natural mix for both tenants (seeded, different draws).
        first = CONFIG.baseline_records + CONFIG.window_records
        planner.route("steady", stream(first, seed=21))
        planner.route("shifted", stream(first, seed=22))
        wait_for(lambda: {("aios_intent_drift_score", t) for t in ("steady", "shifted")} <= set(scraped(stack)),
                 timeout_s=60, interval_s=0.5, message="drift scores of both tenants on /metrics")
        before = scraped(stack)
        figures["unshifted"] = {t: round(before[("aios_intent_drift_score", t)], 4) for t in ("steady", "shifted")}
        assert max(figures["unshifted"].values()) < DRIFT_SCORE_THRESHOLD / 2, figures
        wait_for(lambda: _score(prom, "shifted") is not None and _score(prom, "steady") is not None, timeout_s=20,
                 interval_s=0.5, message="Prometheus to scrape both scores")
        assert prom.series(ALERT_EXPR) == []

        # 2. A restart continues the streams: the scores are exported again before any new traffic.
        stack.stop("observability")
        stack.start_service("observability")
        restored = scraped(stack)
        assert {k: round(v, 4) for k, v in restored.items() if k[0] == "aios_intent_drift_score"} == \
            {("aios_intent_drift_score", t): s for t, s in figures["unshifted"].items()}

        # 3. One window of five intents for "shifted", one more of the same mix for "steady".
        planner.route("steady", stream(CONFIG.window_records, seed=23))
        planner.route("shifted", stream(CONFIG.window_records, seed=24, only=SHIFTED_INTENTS))
        wait_for(lambda: audit_stored(stack) == 2 * CONFIG.window_records, timeout_s=60, interval_s=0.5,
                 message=f"the restarted service to store {2 * CONFIG.window_records} routed messages")
        assert scraped(stack)[("aios_intent_drift_score", "shifted")] > DRIFT_SCORE_THRESHOLD
        wait_for(lambda: drift_alerts(prom).get("shifted") == "pending", timeout_s=30, interval_s=0.5,
                 message="AiosIntentDrift pending for the shifted tenant in Prometheus")
        after = scraped(stack)
        figures["after"] = {t: {name.removeprefix("aios_intent_"): round(after[(name, t)], 4)
                                for name in ("aios_intent_drift_score", "aios_intent_mix_divergence_score",
                                             "aios_intent_confidence_drop_ratio")} for t in ("steady", "shifted")}
        assert after[("aios_intent_drift_score", "steady")] < DRIFT_SCORE_THRESHOLD / 2, figures
        assert after[("aios_intent_mix_divergence_score", "shifted")] > 0.75, figures
        firing = prom.series(ALERT_EXPR)
        assert [(s["metric"]["tenant"], s["metric"]["model"]) for s in firing] == [("shifted", MODEL)]
        assert set(drift_alerts(prom)) == {"shifted"}
    print(f"drift scores (alert above {DRIFT_SCORE_THRESHOLD}): {figures}")
