"""The planner never waits for the intent model in its consumer loop (services.planner.intents):
support messages whose intent is not known yet are deferred like events over their admission
limit (Backpressure: their partitions pause and rewind, nothing is buffered) while the step
results of the same batch are applied at once; when the messages come again their intents are
ready, asked of the model once. On the code before, the loop called the model in line, so a slow
model held up the batch's step results."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from typing import Any

import pytest

from services.common.errors import Backpressure, TransientError
from services.planner import wire
from services.planner.intents import BackgroundIntents
from tests.conftest import wait_for
from tests.unit.planner_twins import Mesh, mesh

pytestmark = pytest.mark.timeout(20)

REPLY = {"name": "reply", "version": 1, "trigger": {"event_type": "support.message.received", "default": True},
         "steps": [{"id": "a", "tool": "noop"}, {"id": "b", "tool": "noop", "depends_on": ["a"]}]}
BLOCK = {"name": "block", "version": 1,
         "trigger": {"event_type": "support.message.received", "intents": ["lost_card"]},
         "steps": [{"id": "a", "tool": "noop"}]}


class SlowModel:
    """A stand-in for the inference service: answers once ``gate`` is set; "lost" texts are lost_card."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.calls: list[list[str]] = []
        self.fail: Exception | None = None

    def classify(self, texts: list[str]) -> list[tuple[str | None, float, str]]:
        self.calls.append(list(texts))
        self.gate.wait(10)
        if self.fail is not None:
            raise self.fail
        return [("lost_card" if "lost" in t else "other", 0.9, "m@1") for t in texts]


def messages(m: Mesh, texts: list[str], partition: int = 0) -> list[Any]:
    recs = []
    for i, text in enumerate(texts):
        rec = m.publisher.inbound("ingress", f"c-{i}", {
            "tenant": "t1", "source": "helpdesk", "type": "support.message.received", "subject": f"c-{i}",
            "data_json": json.dumps({"text": text}), "workflow": None}, offset=100 + i)
        recs.append(dataclasses.replace(rec, partition=partition))
    return recs


def planner_with(model: SlowModel) -> tuple[Mesh, BackgroundIntents]:
    m = mesh(REPLY, BLOCK)
    intents = BackgroundIntents(model)
    m.planner.classifier = intents
    return m, intents


def running_run(m: Mesh) -> str:
    """A reply run already in flight (started through the API), waiting for step a's result."""
    m.planner.handle([m.publisher.inbound("commands", "run-1", wire.command(
        "t1", "run-1", "api:ann", "StartWorkflow", {"workflow": "reply", "workflow_version": 1,
                                                    "input_json": "{}"}), offset=1)])
    return "run-1"


def step_result(m: Mesh, run_id: str, step: str, offset: int) -> Any:
    return m.publisher.inbound("step_results", run_id, {
        "tenant": "t1", "run_id": run_id, "step_id": step, "attempt": 1, "idempotency_key": f"{run_id}:{step}",
        "status": "ok", "output_json": "{}", "error_type": None, "error_message": None, "retryable": False,
        "duration_ms": 1.0, "cost": 0.0, "executor": "x", "replayed": False}, offset)


def dispatched(m: Mesh) -> list[tuple[str, str]]:
    return [(r["run_id"], r["step_id"]) for r in m.publisher.decoded("step_requests")]


def test_step_results_go_on_while_the_model_classifies_the_messages_of_the_same_batch() -> None:
    model = SlowModel()
    m, intents = planner_with(model)
    run_id = running_run(m)
    batch = [*messages(m, ["I lost my card", "where is my refund"]), step_result(m, run_id, "a", 7)]
    with pytest.raises(Backpressure) as deferred:
        m.planner.handle(batch)  # the model has not answered: the handler returns at once
    assert (run_id, "b") in dispatched(m)  # the in-flight run moved on
    assert deferred.value.deferred == [(r.topic, r.partition, r.offset) for r in batch[:2]]
    assert deferred.value.retry_after_s <= 1.0
    model.gate.set()
    wait_for(lambda: not intents.lookup([(batch[0].value["event_id"], "")])[1], timeout_s=10,
             message="the intents classified in the background")
    m.planner.handle(batch[:2])  # the messages come again: their intents are ready
    started = {r["run_id"]: r["workflow"] for r in m.publisher.decoded("step_requests") if r["run_id"] != run_id}
    assert sorted(started.values()) == ["block", "reply"]  # routed by the intents the model gave
    assert model.calls == [["I lost my card", "where is my refund"]]  # one request, never repeated
    intents.close()


def test_a_failed_classification_is_a_transient_error_once_then_asked_again() -> None:
    model = SlowModel()
    model.fail = ConnectionError("inference restarting")
    model.gate.set()
    m, intents = planner_with(model)
    batch = messages(m, ["hello"])
    with pytest.raises(Backpressure):
        m.planner.handle(batch)
    wait_for(lambda: model.calls, timeout_s=5, message="the request sent")
    time.sleep(0.05)
    with pytest.raises(TransientError) as failed:
        m.planner.handle(batch)
    assert not isinstance(failed.value, Backpressure)  # a failure, retried with backoff by the loop
    model.fail = None
    with pytest.raises(Backpressure):
        m.planner.handle(batch)  # asked again
    wait_for(lambda: len(model.calls) == 2, timeout_s=5, message="the request sent again")
    wait_for(lambda: not intents.lookup([(batch[0].value["event_id"], "")])[1], timeout_s=5,
             message="classified")
    m.planner.handle(batch)
    assert [r["workflow"] for r in m.publisher.decoded("step_requests")] == ["reply"]
    intents.close()


def test_the_background_model_call_stays_in_the_trace_that_asked_for_it() -> None:
    """A worker thread does not inherit context: on the code before, the classify request of a
    background thread started a trace of its own, so no run's trace showed its classification."""
    from services.common import tracing

    seen: list[str] = []

    class Model:
        def classify(self, texts: list[str]) -> list[tuple[str | None, float, str]]:
            seen.append(tracing.current_trace_id())
            return [("x", 1.0, "m@1") for _ in texts]

    intents = BackgroundIntents(Model())
    try:
        with tracing.span_from_headers("planner classify", {"traceparent": f"00-{'c1' * 16}-{'d2' * 8}-01"}):
            intents.lookup([("e1", "where is my card")])
        wait_for(lambda: seen, timeout_s=5, message="the background request")
    finally:
        intents.close()
    assert seen == ["c1" * 16]
