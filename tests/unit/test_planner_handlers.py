"""The planner's handlers on in-memory twins: load -> decide -> commit, in
milliseconds, with the real Avro encoding of every record in and out."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from services.common.errors import Backpressure, Conflict
from services.common.uow import Change
from services.planner import wire
from services.planner.domain.state import Verdict
from services.planner.handlers import Admission
from tests.unit.planner_twins import Mesh, mesh

pytestmark = pytest.mark.timeout(10)

PAY = {"name": "pay", "version": 1, "steps": [
    {"id": "check", "tool": "noop", "inputs": {"who": "${input.customer}"}},
    {"id": "charge", "tool": "bank.charge", "depends_on": ["check"], "cost_estimate": 0.5, "timeout_ms": 1000,
     "retry": {"max_attempts": 1}, "compensate": {"tool": "bank.refund", "inputs": {"why": "undo"}}},
]}


def start(m: Mesh, run_id: str = "run-1", **input_: Any) -> None:
    rec = m.publisher.inbound("commands", run_id, wire.command(
        "t1", run_id, "api:ann", "StartWorkflow", {"workflow": "pay", "workflow_version": 1,
                                                   "input_json": json.dumps(input_ or {"customer": "c-1"})}))
    m.planner.handle([rec])


def result(m: Mesh, step: str, attempt: int = 1, ok: bool = True, run_id: str = "run-1", offset: int = 0,
           **extra: Any) -> Any:
    rec = {"tenant": "t1", "run_id": run_id, "step_id": step, "attempt": attempt, "idempotency_key": f"{run_id}:{step}",
           "status": "ok" if ok else "error", "output_json": json.dumps({"ok": True}) if ok else None,
           "error_type": None if ok else "PermanentError", "error_message": None if ok else "declined",
           "retryable": False, "duration_ms": 1.0, "cost": 0.25 if ok else 0.0, "executor": "x", "replayed": False,
           **extra}
    return m.publisher.inbound("step_results", run_id, rec, offset)


def requests(m: Mesh) -> list[tuple[str, str, int]]:
    return [(r["step_id"], r["kind"], r["attempt"]) for r in m.publisher.decoded("step_requests")]


def test_an_api_start_is_checked_once_and_dispatches_the_first_step() -> None:
    m = mesh(PAY)
    start(m)
    assert m.policy.starts == []  # the gRPC API checked it before accepting it
    assert requests(m) == [("check", "action", 1)]
    assert m.policy.evaluated == [("run-1", "check")]
    assert m.runs.load("t1", "run-1").outbox == []  # produced, acknowledged, cleared
    [ev] = [e for e in m.publisher.decoded("workflow_events") if e["type"] == "RunStarted"]
    assert json.loads(ev["body"][1]["input_json"]) == {"customer": "c-1"}


def test_a_redelivered_result_changes_nothing() -> None:
    m = mesh(PAY)
    start(m)
    rec = result(m, "check")
    m.planner.handle([rec])
    commits, sent = m.uow.commits, len(m.publisher.sent)
    m.planner.handle([rec])
    assert m.uow.commits == commits and len(m.publisher.sent) == sent


def test_a_compare_and_set_retry_never_asks_policy_twice() -> None:
    """v1 asked policy inside the compare-and-set loop: every retry evaluated (and audited) the step again."""
    m = mesh(PAY)
    start(m)
    real_commit, raced = m.uow.commit, []

    def racing_commit(change: Change) -> str:
        if not raced:  # another replica moves the run between our load and our commit
            raced.append(1)
            loaded = m.uow.load(change.key)
            real_commit(Change(change.key, loaded.version, loaded.state or ""))
            raise Conflict("moved", retryable=True)
        return real_commit(change)

    m.uow.commit = racing_commit  # type: ignore[method-assign]
    m.planner.handle([result(m, "check")])
    assert raced and m.policy.evaluated.count(("run-1", "charge")) == 1
    assert ("charge", "action", 1) in requests(m)


def test_a_crash_before_produce_leaves_the_outbox_for_the_next_load() -> None:
    m = mesh(PAY)
    m.publisher.fail_sends = 1
    with pytest.raises(RuntimeError):
        start(m)
    assert requests(m) == [] and m.runs.load("t1", "run-1").outbox  # committed, not yet sent
    m.planner.handle([result(m, "check", offset=1)])  # any later event of the run produces it first
    assert [r[0] for r in requests(m)] == ["check", "charge"]


def test_a_success_after_the_step_gave_up_is_compensated() -> None:
    m = mesh(PAY)
    start(m)
    m.planner.handle([result(m, "check")])
    m.planner.handle([result(m, "charge", ok=False, offset=1)])
    run = m.runs.load("t1", "run-1").run
    assert run is not None and run.status == "failed"
    # check's cost is metered (it had no estimate); charge's reservation is released
    assert m.policy.reconciled == [("run-1", "check", 0.25), ("run-1", "charge", 0.0)]
    m.planner.handle([result(m, "charge", ok=True, offset=2, late=True)])
    assert ("charge", "compensation", 1) in requests(m)
    completed = [e for e in m.publisher.decoded("workflow_events") if e["type"] == "StepCompleted"]
    assert completed[-1]["body"][1]["late"] is True


def test_policy_deny_fails_the_step_with_the_reason() -> None:
    m = mesh(PAY)
    m.policy.verdicts["bank.charge"] = Verdict("deny", ("over the limit",), "p@v1")
    start(m)
    m.planner.handle([result(m, "check")])
    run = m.runs.load("t1", "run-1").run
    assert run is not None and run.status == "failed" and "over the limit" in (run.error or "")
    [episode] = m.publisher.decoded("memory_writes")
    name, body = episode["body"]
    assert name.endswith("Episode") and body["outcome"] == "failed"
    assert "over the limit" in body["failure"]["message"]  # the reason travels to memory, typed
    assert {s["step_id"]: s["status"] for s in body["steps"]} == {"check": "succeeded", "charge": "failed"}


def test_an_ingress_event_is_checked_once_even_when_redelivered() -> None:
    m = mesh({**PAY, "trigger": {"event_type": "order.paid"}})
    rec = m.publisher.inbound("ingress", "c-1", {"tenant": "t1", "source": "shop", "type": "order.paid",
                                                 "subject": "c-1", "data_json": json.dumps({"customer": "c-1"}),
                                                 "workflow": "pay"})
    m.planner.handle([rec])
    m.planner.handle([rec])
    assert len(m.policy.starts) == 1 and len(requests(m)) == 1


def test_a_timer_fires_once_in_effect() -> None:
    flow = {"name": "pay", "version": 1, "steps": [
        {"id": "a", "tool": "noop", "retry": {"max_attempts": 3, "initial_interval_ms": 100}}]}
    m = mesh(flow)
    start(m)
    m.planner.handle([m.publisher.inbound("step_results", "run-1", {
        "tenant": "t1", "run_id": "run-1", "step_id": "a", "attempt": 1, "idempotency_key": "run-1:a",
        "status": "error", "output_json": None, "error_type": "StepTimeout", "error_message": "slow",
        "retryable": True, "duration_ms": 1.0, "cost": 0.0, "executor": "x", "replayed": False})])
    run = m.runs.load("t1", "run-1").run
    assert run is not None
    timer = run.steps["a"].timer_id
    fire = wire.command("t1", "run-1", "system:timer", "FireTimer", {"timer_id": timer, "kind": "retry", "step_id": "a"})
    m.planner.handle([m.publisher.inbound("commands", "run-1", fire, 5)])
    m.planner.handle([m.publisher.inbound("commands", "run-1", fire, 6)])  # fired again after a crash
    assert [r for r in requests(m) if r[0] == "a"] == [("a", "action", 1), ("a", "action", 2)]


def ingress(m: Mesh, n: int, partition: int = 0) -> list[Any]:
    recs = []
    for i in range(n):
        rec = m.publisher.inbound("ingress", f"c-{i}", {
            "tenant": "t1", "source": "shop", "type": "order.paid", "subject": f"c-{i}",
            "data_json": json.dumps({"customer": f"c-{i}"}), "workflow": "pay"}, offset=i)
        recs.append(dataclasses.replace(rec, partition=partition))
    return recs


def test_new_ingress_waits_while_its_tenant_has_the_most_runs_in_flight() -> None:
    m = mesh(PAY)
    m.planner.admission = Admission(per_tenant=2)
    first = ingress(m, 5)
    with pytest.raises(Backpressure) as deferred:
        m.planner.handle(first)
    assert len(m.publisher.decoded("step_requests")) == 2  # two runs admitted
    assert deferred.value.deferred == [(r.topic, r.partition, r.offset) for r in first[2:]]
    assert m.policy.starts and len(set(m.policy.starts)) == 2  # the waiting ones were never checked or classified
    # A run finishing makes room: the in-flight result goes first, then one more event is admitted.
    run_id = m.publisher.decoded("step_requests")[0]["run_id"]
    m.planner.handle([result(m, "check", run_id=run_id, offset=10)])
    m.planner.handle([result(m, "charge", run_id=run_id, offset=11)])
    with pytest.raises(Backpressure) as again:
        m.planner.handle(first[2:])
    assert len(again.value.deferred) == 2 and len(m.policy.starts) == 3


def test_a_full_tenant_never_blocks_step_results_of_its_runs() -> None:
    m = mesh(PAY)
    m.planner.admission = Admission(per_tenant=1)
    [one, two] = ingress(m, 2)
    with pytest.raises(Backpressure):
        m.planner.handle([one, two])
    run_id = m.publisher.decoded("step_requests")[0]["run_id"]
    # results in the same batch as waiting ingress are applied, not held back
    with pytest.raises(Backpressure):
        m.planner.handle([two, result(m, "check", run_id=run_id, offset=20)])
    assert ("charge", "action", 1) in requests(m)


def test_a_batch_asks_policy_once_for_every_step_it_starts() -> None:
    m = mesh(PAY)
    recs = [m.publisher.inbound("commands", f"run-{i}", wire.command(
        "t1", f"run-{i}", "api:ann", "StartWorkflow",
        {"workflow": "pay", "workflow_version": 1, "input_json": json.dumps({"customer": f"c-{i}"})}), i)
        for i in range(5)]
    m.planner.handle(recs)
    assert m.policy.calls == 1 and len(m.policy.evaluated) == 5
    assert sorted(r[0] for r in requests(m)) == ["check"] * 5


def test_each_run_keeps_its_own_trace_though_a_batch_decides_for_many() -> None:
    """v1 handled a batch under the first record's trace: every other run's records joined it."""
    m = mesh(PAY)
    traces = {f"run-{i}": f"{i + 1:032x}" for i in range(3)}
    recs = [dataclasses.replace(rec, headers={**rec.headers, "traceparent": f"00-{traces[rec.key]}-{7:016x}-01"})
            for rec in (m.publisher.inbound("commands", run_id, wire.command(
                "t1", run_id, "api:ann", "StartWorkflow",
                {"workflow": "pay", "workflow_version": 1, "input_json": json.dumps({"customer": "c"})}), i)
                for i, run_id in enumerate(traces))]
    m.planner.handle(recs)
    topic = m.publisher.catalog.topic("step_requests")
    sent = [r for r in m.publisher.sent if r.topic == topic]
    assert len(sent) == 3
    assert {r.key: r.headers["traceparent"].split("-")[1] for r in sent} == traces
    # a later event of a run arriving on another trace (a timer, a person) stays in the run's trace
    run_id = "run-1"
    rec = result(m, "check", run_id=run_id, offset=9)
    m.planner.handle([dataclasses.replace(rec, headers={**rec.headers, "traceparent": f"00-{'f' * 32}-{1:016x}-01"})])
    [charge] = [r for r in m.publisher.sent if r.topic == topic and r.key == run_id and r not in sent]
    assert charge.headers["traceparent"].split("-")[1] == traces[run_id]


def test_a_run_moves_between_listing_indexes_and_keeps_its_actor_and_step_traces() -> None:
    """What `aios workflows list` filters on and `aios workflows show` renders, written by the handler's
    own commits: the run's actor, its status index, and each step's trace."""
    from services.planner.listing import index_key

    m = mesh(PAY)
    trace = f"{42:032x}"
    rec = m.publisher.inbound("commands", "run-1", wire.command(
        "t1", "run-1", "api:ann", "StartWorkflow", {"workflow": "pay", "workflow_version": 1,
                                                    "input_json": json.dumps({"customer": "c-1"})}))
    m.planner.handle([dataclasses.replace(rec, headers={**rec.headers, "traceparent": f"00-{trace}-{7:016x}-01"})])

    def listed(**dims: str) -> list[str]:
        return sorted(m.uow.zsets.get(index_key("t1", **dims), {}))

    assert listed(status="running") == listed(actor="api:ann", workflow="pay", status="running") == ["run-1"]
    m.planner.handle([result(m, "check", offset=1)])
    m.planner.handle([result(m, "charge", ok=False, offset=2)])
    run = m.runs.load("t1", "run-1").run
    assert run is not None and run.status == "failed" and run.actor == "api:ann"
    assert listed(status="running") == [] and listed(workflow="pay", status="failed") == ["run-1"]
    assert listed(actor="api:ann") == listed() == ["run-1"]  # the non-status indexes stay
    assert {s.id: s.trace_id for s in run.steps.values()} == {"check": trace, "charge": trace}
