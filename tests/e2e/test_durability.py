"""Durability through whole service processes: version pinning across
redeploys, durable timers and retry backoff across a planner kill -9, cancel
with compensation in reverse order, dead letters replayed once the workflow is
deployed, and a circuit breaker shared by two executor replicas through Redis.

One stack (broker, Redis, sandbox, the five services; no inference) for the
module, with its own workflow directory (AIOS_PLANNER_WORKFLOW_DIR) that the
tests change between planner restarts. A consumer group of the test's own
watches workflow events, step results, approval requests and dead letters.
Counts are over distinct event ids: the wire is at least once by contract, an
effect counts once per event id."""

from __future__ import annotations

import json
import sys
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis

from aiosmesh.v1 import audit_pb2, audit_pb2_grpc, workflow_pb2, workflow_pb2_grpc
from infra.stack import REPO, Ports, Stack, procs, wait_serving
from services.common.catalog import Catalog
from services.common.codec import AvroCodec
from services.common.grpc_server import channel
from services.common.kafka import ConsumerLoop, Inbound, MeshProducer, now_ms
from services.planner.handlers import run_id_for
from tests.conftest import wait_for
from tests.e2e.conftest import log_tail, print_log_tails
from tools.aios.cli import main as aios
from tools.sandbox.client import SandboxClient

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

TENANT = "t1"
FINAL = {"completed", "failed", "cancelled", "compensation_failed"}
BREAKER_OPEN = "aios:circuit:messages:open"

# -- workflows the module deploys ---------------------------------------------------------------------------
PIN_V1 = """
name: pin-demo
version: 1
description: version pinning, v1 - a gate waiting for a person (no timeout), then finish
steps:
  - id: gate
    tool: noop
    inputs: {version: 1}
    approval: {role: ops, reason: "v1 gate"}
  - id: finish
    tool: noop
    depends_on: [gate]
    inputs: {version: 1}
"""
PIN_V2 = """
name: pin-demo
version: 2
description: version pinning, v2 - no gate, one step more
steps:
  - id: prepare
    tool: noop
    inputs: {version: 2}
  - id: gate
    tool: noop
    depends_on: [prepare]
    inputs: {version: 2}
  - id: finish
    tool: noop
    depends_on: [gate]
    inputs: {version: 2}
  - id: extra
    tool: noop
    depends_on: [finish]
    inputs: {version: 2}
"""
TIMER = """
name: timer-escalate
version: 1
steps:
  - id: confirm
    tool: noop
    approval: {role: ops, timeout_ms: 3000, on_timeout: escalate, escalate_to: lead}
"""
RETRY = """
name: retry-backoff
version: 1
steps:
  - id: flaky
    tool: fail
    inputs: {transient_attempts: 2}
    retry: {max_attempts: 5, initial_interval_ms: 1500}
    timeout_ms: 10000
"""
SAGA = """
name: cancel-saga
version: 1
steps:
  - id: a
    tool: noop
    compensate:
      tool: messages.send
      inputs: {customer_id: "${run.id}", channel: email, body: "undo a"}
  - id: b
    tool: noop
    depends_on: [a]
    compensate:
      tool: messages.send
      inputs: {customer_id: "${run.id}", channel: email, body: "undo b"}
  - id: c
    tool: noop
    depends_on: [b]
    approval: {role: ops}
"""
KYC = """
name: kyc-intake
version: 1
trigger: {event_type: kyc.document.received}
steps:
  - id: file_document
    tool: noop
    inputs: {document_id: "${input.document_id}"}
"""
PROBE = """
name: probe-noop
version: 1
steps:
  - id: ping
    tool: noop
    timeout_ms: 4000
    retry: {max_attempts: 3, initial_interval_ms: 100}
"""
NOTIFY = """
name: cb-notify
version: 1
steps:
  - id: send
    tool: messages.send
    inputs: {customer_id: "${input.customer_id}", channel: email, body: "circuit test"}
    retry: {max_attempts: 1}
    timeout_ms: 5000
"""


# -- the harness --------------------------------------------------------------------------------------------
@dataclass
class Observer:
    """Everything on the watched topics, in consumption order (per run: production order)."""

    records: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, batch: Sequence[Inbound]) -> None:
        with self.lock:
            self.records += [(rec.role, rec.value) for rec in batch]

    def of(self, role: str, run_id: str | None = None) -> list[dict[str, Any]]:
        """Distinct (by event id) records of a role, optionally of one run, first delivery first."""
        seen: set[str] = set()
        out = []
        with self.lock:
            snapshot = list(self.records)
        for r, value in snapshot:
            if r != role or (run_id is not None and value.get("run_id") != run_id) or value["event_id"] in seen:
                continue
            seen.add(value["event_id"])
            out.append(value)
        return out

    def events(self, run_id: str, type_: str | None = None) -> list[dict[str, Any]]:
        return [e for e in self.of("workflow_events", run_id) if type_ is None or e["type"] == type_]


@dataclass
class Mesh:
    stack: Stack
    wf_dir: Path
    env: dict[str, str]
    producer: MeshProducer
    observer: Observer
    redis: redis.Redis
    planner: grpc.Channel  # reconnects fast (services.common.grpc_server.channel) across planner restarts
    spawned: list[procs.Proc] = field(default_factory=list)

    @property
    def stub(self) -> workflow_pb2_grpc.WorkflowServiceStub:
        return workflow_pb2_grpc.WorkflowServiceStub(self.planner)

    # -- processes ------------------------------------------------------------------------------------------
    def restart_planner(self, *, crash: bool = False, down_s: float = 0.0) -> None:
        if crash:
            self.stack.kill9("planner")
        else:
            self.stack.stop("planner")
        time.sleep(down_s)  # how long the planner stays down; not an assertion
        self.spawned.append(self.stack.start_service("planner"))

    def log_tail(self, name: str, chars: int = 3000) -> str:
        proc = self.stack.procs.get(name)
        path = Path(proc.log) if proc else self.stack.log_dir / f"{name}.log"
        return log_tail(path, chars, missing="(no log)")

    def until(self, predicate: Callable[[], Any], timeout_s: float, message: str, interval_s: float = 0.1,
              logs: tuple[str, ...] = ("planner",)) -> Any:
        try:
            return wait_for(predicate, timeout_s=timeout_s, interval_s=interval_s, message=message)
        except AssertionError as exc:
            if type(exc) is not AssertionError:
                raise  # a specific failure the predicate raised, not the deadline
            tails = "\n".join(f"--- {n} log tail ---\n{self.log_tail(n)}" for n in logs)
            raise AssertionError(f"{exc}\n{tails}") from None

    # -- runs -----------------------------------------------------------------------------------------------
    def start(self, workflow: str, run_input: dict[str, Any] | None = None) -> str:
        return str(self.stub.StartWorkflow(workflow_pb2.StartWorkflowRequest(
            tenant=TENANT, workflow=workflow, input_json=json.dumps(run_input or {}), actor="durability-test"),
            timeout=10).run_id)

    def run(self, run_id: str) -> workflow_pb2.Run | None:
        """The run, or None while it does not exist yet or the planner is restarting."""
        try:
            return self.stub.GetRun(workflow_pb2.GetRunRequest(tenant=TENANT, run_id=run_id), timeout=5)
        except grpc.RpcError:
            return None

    def wait_run(self, run_id: str, statuses: set[str], timeout_s: float = 60,
                 logs: tuple[str, ...] = ("planner",)) -> workflow_pb2.Run:
        def reached() -> workflow_pb2.Run | None:
            run = self.run(run_id)
            return run if run is not None and run.status in statuses else None

        last = self.run(run_id)
        return self.until(reached, timeout_s, f"run {run_id} to be {sorted(statuses)} "
                          f"(was {last.status if last else 'missing'} when the wait began)", logs=logs)

    def timers_of(self, run_id: str) -> list[str]:
        return [t for t in self.redis.zrange(f"aios:{{{TENANT}}}:timers", 0, -1) if t.startswith(run_id + ":")]

    def write_workflow(self, name: str, text: str) -> None:
        (self.wf_dir / f"{name}.yaml").write_text(text)


def _steps(run: workflow_pb2.Run) -> dict[str, workflow_pb2.StepView]:
    return {s.step_id: s for s in run.steps}


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    run_dir = Path(tmp_path_factory.mktemp("durability"))
    wf_dir = run_dir / "workflows"
    wf_dir.mkdir()
    for name, text in (("pin-demo-v1", PIN_V1), ("timer-escalate", TIMER), ("retry-backoff", RETRY),
                       ("cancel-saga", SAGA), ("cb-notify", NOTIFY), ("probe-noop", PROBE)):
        (wf_dir / f"{name}.yaml").write_text(text)
    stack = Stack(Ports.fresh(), run_dir=run_dir, topic_prefix="dur.", tenant=TENANT)
    observer_loop: ConsumerLoop | None = None
    harness: Mesh | None = None
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AIOS_PLANNER_WORKFLOW_DIR", str(wf_dir))  # Stack.env() copies os.environ into every service
        try:
            stack.up(inference=False)
            env = stack.env()
            for key, value in env.items():  # the aios CLI reads the same variables
                if key.startswith("AIOS_"):
                    mp.setenv(key, value)
            catalog = Catalog(stack.topic_prefix)
            codec = AvroCodec(catalog.schemas)
            producer = MeshProducer(env["AIOS_KAFKA_BOOTSTRAP"], catalog, codec)
            observer = Observer()
            observer_loop = ConsumerLoop(
                service="durability-observer", group=f"dur.observer-{uuid.uuid4().hex[:8]}",
                roles=["workflow_events", "step_results", "approvals", "deadletters"], handler=observer,
                bootstrap=env["AIOS_KAFKA_BOOTSTRAP"], catalog=catalog, codec=codec, producer=producer).start()
            assert observer_loop.assigned.wait(30), "the test's observer consumer did not join its group"
            harness = Mesh(stack, wf_dir, env, producer, observer,
                           redis.Redis.from_url(env["AIOS_REDIS_URL"], decode_responses=True),
                           channel(env["AIOS_PLANNER_ADDR"]), spawned=list(stack.procs.values()))
            yield harness
        except BaseException:
            print_log_tails(stack)
            raise
        finally:
            if observer_loop is not None:
                observer_loop.stop()
            if harness is not None:
                harness.planner.close()
                harness.redis.close()
                harness.producer.close()
            everything = list(stack.procs.values()) + (harness.spawned if harness else [])
            stack.down()
            leftovers = [f"{p.name} (pid {p.pid})" for p in everything if p.alive()]
            assert not leftovers, f"processes left behind: {leftovers}"


# -- 1. version pinning ------------------------------------------------------------------------------------
def test_running_run_keeps_its_version_after_v2_is_deployed_and_v1_removed(mesh: Mesh) -> None:
    old = mesh.start("pin-demo")
    waiting = mesh.wait_run(old, {"waiting_approval"})
    assert waiting.workflow_version == 1
    assert _steps(waiting)["gate"].status == "waiting_approval"

    mesh.write_workflow("pin-demo-v2", PIN_V2)
    mesh.restart_planner()
    (mesh.wf_dir / "pin-demo-v1.yaml").unlink()
    mesh.restart_planner()  # only v2 is deployed now
    deployed = {w.name: w for w in mesh.stub.ListWorkflows(workflow_pb2.ListWorkflowsRequest(), timeout=10).workflows}
    assert deployed["pin-demo"].version == 2 and list(deployed["pin-demo"].steps) == [
        "prepare", "gate", "finish", "extra"]

    mesh.stub.Approve(workflow_pb2.DecisionRequest(tenant=TENANT, run_id=old, step_id="gate", actor="ops@test",
                                                   reason="pinning check"), timeout=10)
    done = mesh.wait_run(old, FINAL)
    assert done.status == "completed", f"{done.status}: {done.error}"
    assert done.workflow_version == 1
    mesh.until(lambda: mesh.observer.events(old, "RunCompleted"), 30, "RunCompleted on workflow.events")
    steps = _steps(done)
    assert list(steps) == ["gate", "finish"], "the v1 run must keep v1's steps"
    # `finish` was rendered after v1's file was gone: from the v1 snapshot, not from v2.
    assert json.loads(steps["finish"].output_json) == {"echo": {"version": 1}}
    assert {e["workflow_version"] for e in mesh.observer.events(old)} == {1}

    new = mesh.start("pin-demo")
    fresh = mesh.wait_run(new, FINAL)
    assert fresh.status == "completed", f"{fresh.status}: {fresh.error}"
    assert fresh.workflow_version == 2
    assert list(_steps(fresh)) == ["prepare", "gate", "finish", "extra"]
    assert json.loads(_steps(fresh)["finish"].output_json) == {"echo": {"version": 2}}


# -- 2. durable approval timer across kill -9 ---------------------------------------------------------------
def test_approval_timer_survives_planner_kill_9_and_escalates_once(mesh: Mesh) -> None:
    run_id = mesh.start("timer-escalate")
    mesh.wait_run(run_id, {"waiting_approval"})
    first_timer = f"{run_id}:confirm:approval:0"
    assert mesh.timers_of(run_id) == [first_timer], "the approval deadline is a durable timer in Redis"

    mesh.restart_planner(crash=True, down_s=1.0)

    failed = mesh.wait_run(run_id, FINAL, timeout_s=60)
    assert failed.status == "failed", f"{failed.status}: {failed.error}"
    confirm = _steps(failed)["confirm"]
    assert confirm.status == "failed" and confirm.error.startswith("ApprovalTimeout:"), confirm.error
    assert confirm.decided_by == "system:timeout"
    # Everything the run set is settled: no timer left to fire a second time.
    mesh.until(lambda: not mesh.timers_of(run_id), 10, "the run's timers to be cleared")

    mesh.until(lambda: mesh.observer.events(run_id, "RunFailed"), 30, "RunFailed on workflow.events")
    types = [e["type"] for e in mesh.observer.events(run_id)]
    assert types.count("ApprovalEscalated") == 1, types
    assert types.count("ApprovalTimedOut") == 1, types
    assert types.index("ApprovalEscalated") < types.index("ApprovalTimedOut") < types.index("RunFailed"), types
    escalated = mesh.observer.events(run_id, "ApprovalEscalated")[0]
    assert escalated["body"][1] == {"from_role": "ops", "to_role": "lead"}
    asked = [(a["step_id"], a["role"]) for a in mesh.observer.of("approvals", run_id)]
    assert asked == [("confirm", "ops"), ("confirm", "lead")], asked

    # Observability (its own consumer, deduped by event id) saw the same: one escalation, then the failure.
    with channel(mesh.env["AIOS_OBSERVABILITY_ADDR"]) as chan:
        audit = audit_pb2_grpc.AuditServiceStub(chan)

        def timeline() -> list[str]:
            try:
                entries = audit.Timeline(audit_pb2.TimelineRequest(tenant=TENANT, run_id=run_id), timeout=5).entries
            except grpc.RpcError:
                return []
            actions = [e.action for e in entries]
            return actions if "workflow.RunFailed" in actions else []

        actions = mesh.until(timeline, 30, "the run's audit timeline to show its failure", logs=("observability",))
    assert actions.count("workflow.ApprovalEscalated") == 1, actions


# -- 3. retry backoff across kill -9 ------------------------------------------------------------------------
def test_retry_backoff_timer_survives_planner_kill_9(mesh: Mesh) -> None:
    run_id = mesh.start("retry-backoff")

    def backing_off() -> bool:
        run = mesh.run(run_id)
        step = _steps(run).get("flaky") if run is not None else None  # a pending start has no steps yet
        return step is not None and step.status == "retrying"

    mesh.until(backing_off, 30, "attempt 1 to fail and the step to back off", interval_s=0.02)
    mesh.stack.kill9("planner")
    try:
        pending = mesh.timers_of(run_id)
        time.sleep(1.0)  # the planner stays down a moment; not an assertion
    finally:
        mesh.spawned.append(mesh.stack.start_service("planner"))
    # The precondition of this test: the crash landed while the backoff timer was pending.
    assert pending == [f"{run_id}:flaky:retry:1"], pending

    done = mesh.wait_run(run_id, FINAL, timeout_s=60, logs=("planner", "executor"))
    assert done.status == "completed", f"{done.status}: {done.error}"
    flaky = _steps(done)["flaky"]
    assert flaky.attempt == 3 and json.loads(flaky.output_json) == {"attempt": 3}
    mesh.until(lambda: mesh.observer.events(run_id, "RunCompleted"), 30, "RunCompleted on workflow.events")
    dispatched = [e["body"][1]["attempt"] for e in mesh.observer.events(run_id, "StepDispatched")]
    assert dispatched == [1, 2, 3], dispatched
    assert len(mesh.observer.events(run_id, "StepRetrying")) == 2


# -- 4. cancel compensates in reverse order -----------------------------------------------------------------
def test_cancel_compensates_completed_steps_in_reverse_order(mesh: Mesh, capsys: pytest.CaptureFixture[str]) -> None:
    run_id = mesh.start("cancel-saga")
    waiting = mesh.wait_run(run_id, {"waiting_approval"})
    assert _steps(waiting)["c"].status == "waiting_approval"
    assert [s for s in _steps(waiting) if _steps(waiting)[s].status == "succeeded"] == ["a", "b"]

    code = aios(["cancel", run_id, "--by", "x", "--reason", "y", "--tenant", TENANT])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"cancel requested for run {run_id}" in captured.out

    done = mesh.wait_run(run_id, FINAL, logs=("planner", "executor"))
    assert done.status == "cancelled", f"{done.status}: {done.error}"
    # The actor is the authenticated principal (the stack's operator), not what --by claims.
    assert "cancelled by user:operator: y" in done.error
    steps = _steps(done)
    assert steps["a"].status == "succeeded/compensated" and steps["b"].status == "succeeded/compensated"
    assert steps["c"].status == "cancelled"

    mesh.until(lambda: mesh.observer.events(run_id, "RunCancelled"), 30, "RunCancelled on workflow.events")
    flow = [(e["type"], e["step_id"]) for e in mesh.observer.events(run_id)
            if e["type"] in ("CompensationStarted", "CompensationDispatched", "StepCompensated", "RunCancelled")]
    assert flow == [("CompensationStarted", None), ("CompensationDispatched", "b"), ("StepCompensated", "b"),
                    ("CompensationDispatched", "a"), ("StepCompensated", "a"), ("RunCancelled", None)], flow
    # The effects themselves, as the third party saw them: b undone first, then a, each once.
    with SandboxClient(mesh.env["AIOS_SANDBOX_URL"]) as sandbox:
        undone = [m["body"] for m in sandbox.state()["outbox"] if m["customer_id"] == run_id]
        assert undone == ["undo b", "undo a"], undone
        assert sandbox.effect_count("message.send", key=f"{run_id}:b:compensate") == 1
        assert sandbox.effect_count("message.send", key=f"{run_id}:a:compensate") == 1


# -- 5. dead letters you can act on -------------------------------------------------------------------------
def test_unroutable_event_is_dead_lettered_then_replayed_once_its_workflow_is_deployed(
        mesh: Mesh, capsys: pytest.CaptureFixture[str]) -> None:
    event_id = uuid.uuid4().hex
    mesh.producer.send("ingress", "cust-kyc-1", {
        "event_id": event_id, "tenant": TENANT, "occurred_at": now_ms(), "source": "kyc-portal",
        "type": "kyc.document.received", "subject": "cust-kyc-1",
        "data_json": json.dumps({"document_id": "doc-42"}), "workflow": None})
    mesh.producer.flush()

    def dead_letter() -> dict[str, Any] | None:
        for d in mesh.observer.of("deadletters"):
            if json.loads(d["headers_json"] or "{}").get("event-id") == event_id:
                return d
        return None

    dead = mesh.until(dead_letter, 60, "the kyc event to be dead-lettered")
    assert dead["error_type"] == "UnknownWorkflow" and "kyc.document.received" in dead["error_message"]
    assert dead["source_topic"] == "dur.ingress.events" and dead["service"] == "planner"
    run_id = run_id_for(TENANT, event_id)
    assert mesh.run(run_id) is None, "an unroutable event starts no run"

    mesh.write_workflow("kyc-intake", KYC)
    mesh.restart_planner()
    code = aios(["dlq", "replay", "--all", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    outcomes = json.loads(captured.out)
    mine = [o for o in outcomes if o["source_topic"] == "dur.ingress.events"]
    assert mine and all(o["action"] == "replayed" for o in mine), outcomes

    done = mesh.wait_run(run_id, FINAL)
    assert done.status == "completed", f"{done.status}: {done.error}"
    assert done.workflow == "kyc-intake"
    assert json.loads(_steps(done)["file_document"].output_json) == {"echo": {"document_id": "doc-42"}}
    # Replaying again changes nothing: the dead letter is remembered as replayed.
    assert aios(["dlq", "replay", "--all", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert all(o["action"] != "replayed" for o in again), again


# -- 6. a circuit breaker shared by executor replicas -------------------------------------------------------
class PartitionsStranded(AssertionError):
    """Step requests on some step.requests partitions were never executed after a second replica joined."""


def _start_second_executor(mesh: Mesh) -> procs.Proc:
    env = mesh.stack.env()
    port = procs.free_port()
    env.update({"AIOS_INSTANCE_ID": "executor-1", "AIOS_EXECUTOR_ADDR": f"127.0.0.1:{port}",
                "AIOS_EXECUTOR_METRICS_PORT": str(procs.free_port())})
    proc = procs.spawn("executor-1", [sys.executable, "-m", "services.executor"], env=env,
                       log_dir=mesh.stack.log_dir, port=port, cwd=REPO)
    mesh.stack.procs["executor-1"] = proc  # stopped with the stack
    mesh.spawned.append(proc)
    wait_serving(proc, timeout_s=90)
    return proc


def _request_ids_per_partition(per_partition: int, partitions: int = 4) -> list[str]:
    """Request ids whose run ids (the record key) land on every partition under librdkafka's default
    partitioner (CRC-32 of the key), so a probe reaches every partition whichever replica owns it."""
    wanted = {p: per_partition for p in range(partitions)}
    out = []
    while any(wanted.values()):
        request_id = uuid.uuid4().hex
        part = zlib.crc32(run_id_for(TENANT, request_id).encode()) % partitions
        if wanted[part]:
            wanted[part] -= 1
            out.append(request_id)
    return out


def test_circuit_breaker_is_shared_by_two_executor_replicas(mesh: Mesh) -> None:
    second = _start_second_executor(mesh)
    names = {f"executor-{mesh.stack.procs['executor'].pid}", f"executor-{second.pid}"}
    sandbox = SandboxClient(mesh.env["AIOS_SANDBOX_URL"])
    started: list[str] = []

    def results(status: str | None = None, error_type: str | None = None) -> list[dict[str, Any]]:
        ids = set(started)
        return [r for r in mesh.observer.of("step_results") if r["run_id"] in ids
                and (status is None or r["status"] == status)
                and (error_type is None or r["error_type"] == error_type)]

    def batch(n: int, workflow: str = "cb-notify", request_ids: Sequence[str] | None = None) -> list[workflow_pb2.Run]:
        """Start runs (n, or one per request id), wait until all are final."""
        ids = [str(mesh.stub.StartWorkflow(workflow_pb2.StartWorkflowRequest(
            tenant=TENANT, workflow=workflow, input_json=json.dumps({"customer_id": f"cb-{i}"}),
            request_id=request_id, actor="durability-test"), timeout=10).run_id)
            for i, request_id in enumerate(request_ids if request_ids is not None else [""] * n)]
        started.extend(ids)
        return [mesh.wait_run(run_id, FINAL, timeout_s=40, logs=("executor", "executor-1")) for run_id in ids]

    try:
        # Both replicas work: probe runs on every step.requests partition are executed, by both replicas
        # once the group has rebalanced (the joining replica is SERVING before it owns partitions).
        def both_take_work() -> bool:
            probes = batch(0, "probe-noop", request_ids=_request_ids_per_partition(2))
            stuck = [(r.run_id, _steps(r)["ping"].error) for r in probes if r.status != "completed"]
            if stuck:
                raise PartitionsStranded(
                    f"{len(stuck)} of {len(probes)} probe runs never ran: {stuck}; step results came only from "
                    f"{sorted({r['executor'] for r in results()})} of {sorted(names)}")
            return {r["executor"] for r in results("ok")} == names

        mesh.until(both_take_work, 60, "both executor replicas to run steps", interval_s=0.5,
                   logs=("executor", "executor-1"))

        sandbox.set_faults(fail_rate=1.0, fail_status=503, paths=["/v1/messages"])
        assert not mesh.redis.exists(BREAKER_OPEN)
        batch(6)  # 6 calls answered 503: the threshold is 5 failures in 30 s
        assert mesh.redis.exists(BREAKER_OPEN), "5 failures should have opened the messages breaker"
        assert 0 < mesh.redis.ttl(BREAKER_OPEN) <= 10

        # While open, both replicas refuse calls without reaching the API. Runs are spread over the
        # step.requests partitions, which the two replicas share; start more until both have answered.
        def both_fail_fast() -> bool:
            if {r["executor"] for r in results("error", "CircuitOpen")} >= names:
                return True
            batch(4)
            return False

        mesh.until(both_fail_fast, 60, "CircuitOpen step results from both executors", interval_s=0,
                   logs=("executor", "executor-1"))
        refused = results("error", "CircuitOpen")
        assert all(r["retryable"] for r in refused)
        run = mesh.run(refused[0]["run_id"])
        assert run is not None and run.status == "failed"
        assert _steps(run)["send"].error.startswith("CircuitOpen:"), _steps(run)["send"].error
        assert {r["executor"] for r in results()} <= names

        # Cured: once the open period ends, runs on both replicas go through.
        sandbox.clear_faults()
        mesh.until(lambda: not mesh.redis.exists(BREAKER_OPEN), 15, "the breaker's open period to end")
        # Half-open: one trial call decides; its success closes the circuit for every replica.
        [trial] = batch(1)
        assert trial.status == "completed", (trial.run_id, trial.status, trial.error)
        assert not mesh.redis.exists(BREAKER_OPEN)
        cured: set[str] = {trial.run_id}

        def both_succeed() -> bool:
            runs = batch(4)
            cured.update(r.run_id for r in runs)
            assert all(r.status == "completed" for r in runs), [(r.run_id, r.status, r.error) for r in runs]
            return {r["executor"] for r in results("ok") if r["run_id"] in cured} >= names

        mesh.until(both_succeed, 60, "successful sends from both executors", interval_s=0,
                   logs=("executor", "executor-1"))
    finally:
        sandbox.clear_faults()
        sandbox.close()
