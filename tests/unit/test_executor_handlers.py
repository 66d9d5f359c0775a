"""The executor's handler on its in-memory twins (unit of work, leases, claims,
a recording producer) and a clock the test moves: no Kafka, no Redis, and no
assertion on elapsed time. Tool functions block on events the test sets, so
"the call is still running" is a fact, not a race."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from services.common.errors import TransientError
from services.common.kafka import Inbound, OutRecord
from services.common.uow import Change, Loaded, MemoryUnitOfWork
from services.executor.adapters import keys
from services.executor.adapters.claims import MemoryClaimStore
from services.executor.adapters.leases import LeaseKeeper, MemoryLeaseStore
from services.executor.adapters.runner import ToolRunner
from services.executor.adapters.toolbox import Toolbox
from services.executor.domain import StepRecord
from services.executor.handlers import ExecutorConfig, StepHandler
from services.executor.tools import Call
from tests.conftest import wait_for

pytestmark = pytest.mark.timeout(30)
TENANT = "t1"


class Clock:
    """The runner's clock: moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds


class RecordingProducer:
    """The producer port: records are JSON so the test can read them back."""

    def __init__(self) -> None:
        self.sent: list[OutRecord] = []
        self.fail_flushes = 0
        self._lock = threading.Lock()

    def encode(self, role: str, key: str, record: dict[str, Any]) -> OutRecord:
        return OutRecord(role, key, json.dumps(record).encode(), {"event-id": record["event_id"]}, record["event_id"])

    def send_record(self, record: OutRecord) -> None:
        with self._lock:
            self.sent.append(record)

    def thread_errors(self) -> list[Any]:
        return []

    def use_errors(self, bucket: list[Any] | None) -> None:
        return None

    def flush(self, timeout_s: float = 30.0) -> None:
        with self._lock:
            if self.fail_flushes:
                self.fail_flushes -= 1
                self.sent.clear()  # nothing was acknowledged
                raise TransientError("broker away")

    def of(self, role: str, key: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            values = [json.loads(r.value) for r in self.sent if r.topic == role]
        return [v for v in values if key is None or v.get("idempotency_key", key) == key]


class FlakyUnitOfWork(MemoryUnitOfWork):
    """Fails the next ``fail_commits`` commits as Redis being away would. Each operation is
    atomic, as one Lua script is in Redis (late results are recorded from another thread)."""

    def __init__(self) -> None:
        super().__init__()
        self.fail_commits = 0
        self.loads: list[str] = []  # every record read, in order: each is a Redis round trip
        self._lock = threading.RLock()

    def load(self, key: str) -> Loaded:
        with self._lock:
            self.loads.append(key)
            return super().load(key)

    def commit(self, change: Change) -> str:
        with self._lock:
            if self.fail_commits:
                self.fail_commits -= 1
                raise TransientError("redis: connection refused")
            return super().commit(change)

    def clear_outbox(self, key: str, version: str) -> None:
        with self._lock:
            super().clear_outbox(key, version)


class Mesh:
    def __init__(self, tool_workers: int = 4, claim_threshold: int = 256 * 1024) -> None:
        self.clock = Clock()
        self.uow = FlakyUnitOfWork()
        self.leases = MemoryLeaseStore()
        self.claims = MemoryClaimStore()
        self.producer = RecordingProducer()
        self.toolbox = Toolbox()
        self.runner = ToolRunner(self.toolbox, workers=tool_workers, clock=self.clock, tick_s=0.002)
        self.config = ExecutorConfig(name="ex-test", record_ttl_s=3600, lease_ttl_ms=60_000,
                                     claim_threshold_bytes=claim_threshold, settle_retry_s=30)
        self.handler = StepHandler(uow=self.uow, leases=self.leases, claims=self.claims, producer=self.producer,
                                   runner=self.runner, config=self.config, workers=4,
                                   keeper=LeaseKeeper(self.leases, self.config.lease_ttl_ms))
        self.threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []

    def tool(self, name: str, fn: Callable[[dict[str, Any], Call], Any]) -> None:
        self.toolbox.tools[name] = fn

    def request(self, key: str, attempt: int, tool: str, timeout_ms: int = 1000, **inputs: Any) -> dict[str, Any]:
        return {"event_id": f"{key}-{attempt}", "tenant": TENANT, "occurred_at": 0, "run_id": f"run-{key}",
                "workflow": "wf", "step_id": "s", "attempt": attempt, "idempotency_key": key, "tool": tool,
                "inputs_json": json.dumps(inputs), "latency_class": "interactive", "timeout_ms": timeout_ms,
                "cost_estimate": 0.0, "deadline_ms": None}

    def run(self, request: dict[str, Any]) -> None:
        self.handler.run_step(request)

    def run_in_thread(self, request: dict[str, Any]) -> threading.Thread:
        def target() -> None:
            try:
                self.handler.run_step(request)
            except BaseException as exc:
                self.errors.append(exc)
        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        self.threads.append(thread)
        return thread

    def results(self, key: str) -> list[dict[str, Any]]:
        return self.producer.of("step_results", key)

    def record(self, key: str) -> StepRecord:
        return StepRecord.from_json(self.uow.load(keys.record(TENANT, key)).state)

    def close(self) -> None:
        self.handler.close(grace_s=1)


class Gate:
    """A tool that blocks until released, counting its starts per attempt."""

    def __init__(self, output: Any = None, error: BaseException | None = None) -> None:
        self.release = threading.Event()
        self.started: list[int] = []
        self.finished: list[int] = []
        self.output, self.error = output, error

    def __call__(self, inputs: dict[str, Any], call: Call) -> Any:
        self.started.append(call.attempt)
        assert self.release.wait(20), "the test never released the tool"
        self.finished.append(call.attempt)
        if self.error is not None:
            raise self.error
        return self.output if self.output is not None else {"attempt": call.attempt}


@pytest.fixture
def mesh() -> Iterator[Mesh]:
    m = Mesh()
    yield m
    for gate in getattr(m, "gates", []):
        gate.release.set()
    m.close()


@contextmanager
def only_worker_taken(tool: str, gate: Gate) -> Iterator[tuple[Mesh, Gate]]:
    """A mesh with one tool worker and the tools "busy" and ``tool`` (on ``gate``), its worker taken by a call
    of "busy" that runs until that gate is released; yields the mesh and busy's gate. Both gates are
    released and the mesh closed after."""
    mesh = Mesh(tool_workers=1)
    busy = Gate()
    mesh.tool("busy", busy)
    mesh.tool(tool, gate)
    try:
        mesh.run_in_thread(mesh.request("occupier", 1, "busy", timeout_ms=60_000))
        wait_for(lambda: busy.started == [1], timeout_s=10, message="the only tool worker to be taken")
        yield mesh, busy
    finally:
        busy.release.set()
        gate.release.set()
        mesh.close()


def _time_out(mesh: Mesh, gate: Gate, request: dict[str, Any]) -> None:
    """Run ``request`` until its attempt times out while the tool still runs."""
    thread = mesh.run_in_thread(request)
    wait_for(lambda: request["attempt"] in gate.started, timeout_s=10, message="the call to start")
    mesh.clock.advance(request["timeout_ms"] / 1000 + 0.001)
    thread.join(10)
    assert not thread.is_alive() and not mesh.errors, mesh.errors
    assert mesh.results(request["idempotency_key"])[-1]["error_type"] == "StepTimeout"


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]


# -- 1. attempt fencing ------------------------------------------------------------------------------------------
def test_a_retry_waits_while_the_timed_out_call_still_runs(mesh: Mesh) -> None:
    gate = Gate()
    mesh.gates = [gate]  # type: ignore[attr-defined]
    mesh.tool("gate", gate)
    _time_out(mesh, gate, mesh.request("k1", 1, "gate"))
    assert mesh.leases.holder(TENANT, "k1") == 1, "the timed-out call keeps the lease while it runs"
    with pytest.raises(TransientError, match="attempt 1 still runs"):
        mesh.run(mesh.request("k1", 2, "gate"))
    assert gate.started == [1], "attempt 2 must not start next to attempt 1"
    gate.release.set()
    wait_for(lambda: mesh.leases.holder(TENANT, "k1") is None, timeout_s=10, message="attempt 1 to return")
    mesh.run(mesh.request("k1", 2, "gate"))  # the consumer's retry: answered with attempt 1's (late) success
    answer = mesh.results("k1")[-1]
    assert (answer["attempt"], answer["status"], answer["replayed"]) == (2, "ok", True)
    assert json.loads(answer["output_json"]) == {"attempt": 1}
    assert gate.started == [1], "the tool ran once for the step"


def test_an_older_attempt_never_starts_after_a_newer_one_was_recorded(mesh: Mesh) -> None:
    starts: list[int] = []

    def flaky(inputs: dict[str, Any], call: Call) -> Any:
        starts.append(call.attempt)
        raise TransientError("not now")
    mesh.tool("flaky", flaky)
    mesh.run(mesh.request("k2", 2, "flaky"))
    mesh.run(mesh.request("k2", 1, "flaky"))  # attempt 1's request, delivered late
    assert starts == [2]
    old = mesh.results("k2")[-1]
    assert (old["attempt"], old["error_type"], old["retryable"]) == (1, "AttemptSuperseded", False)
    mesh.run(mesh.request("k2", 1, "flaky"))  # and a redelivery of it is answered the same way
    assert starts == [2] and mesh.results("k2")[-1]["event_id"] == old["event_id"]


def test_an_older_attempt_never_starts_while_a_newer_one_holds_the_lease(mesh: Mesh) -> None:
    gate = Gate()
    mesh.gates = [gate]  # type: ignore[attr-defined]
    mesh.tool("gate", gate)
    newer = mesh.run_in_thread(mesh.request("k3", 2, "gate"))
    wait_for(lambda: gate.started == [2], timeout_s=10, message="attempt 2 to start")
    mesh.run(mesh.request("k3", 1, "gate"))
    assert mesh.results("k3")[-1]["error_type"] == "AttemptSuperseded"
    gate.release.set()
    newer.join(10)
    assert gate.started == [2]


def test_in_process_tools_get_the_steps_key_on_every_attempt(mesh: Mesh) -> None:
    seen: list[tuple[int, str]] = []

    def tool(inputs: dict[str, Any], call: Call) -> Any:
        seen.append((call.attempt, call.idempotency_key))
        if call.attempt == 1:
            raise TransientError("once")
        return {}
    mesh.tool("t", tool)
    mesh.run(mesh.request("run-9:step-a", 1, "t"))
    mesh.run(mesh.request("run-9:step-a", 2, "t"))
    assert seen == [(1, "run-9:step-a"), (2, "run-9:step-a")]


def test_a_queued_call_of_an_expired_attempt_never_starts() -> None:
    late = Gate()
    with only_worker_taken("late", late) as (mesh, busy):
        queued = mesh.run_in_thread(mesh.request("k4", 1, "late", timeout_ms=1000))
        wait_for(lambda: mesh.runner.queued() == 1, timeout_s=10, message="the second call to queue")
        mesh.clock.advance(1.001)  # past its deadline, still queued
        queued.join(10)
        result = mesh.results("k4")[-1]
        assert (result["error_type"], result["retryable"]) == ("StepTimeout", True)
        assert "did not start" in result["error_message"]
        assert mesh.leases.holder(TENANT, "k4") is None, "a call that never started holds no lease"
        busy.release.set()
        late.release.set()
        wait_for(lambda: mesh.runner.running() == 0 and busy.finished == [1], timeout_s=10,
                 message="the worker to be free")
        mesh.run(mesh.request("k4", 2, "late", timeout_ms=1000))  # the retry runs at once
        assert late.started == [2], "the expired attempt's call must never start"


# -- 2. a late success is recorded and published -----------------------------------------------------------------
def test_a_success_after_the_timeout_is_recorded_and_published(mesh: Mesh) -> None:
    gate = Gate(output={"refund_id": "ref_1"})
    mesh.gates = [gate]  # type: ignore[attr-defined]
    mesh.tool("gate", gate)
    _time_out(mesh, gate, mesh.request("k5", 1, "gate"))
    gate.release.set()
    late = wait_for(lambda: [r for r in mesh.results("k5") if r["status"] == "ok"], timeout_s=10,
                    message="the late success to be published")[0]
    assert late["event_id"] == _sha("k5#1#late")
    assert late["event_id"] != _sha("k5#1#result")
    assert (late["attempt"], late["late"], late["replayed"], late["error_type"]) == (1, True, False, None)
    assert json.loads(late["output_json"]) == {"refund_id": "ref_1"}
    usage = [u for u in mesh.producer.of("usage") if u["event_id"] == _sha("k5#1#late")[:24] + "usage"]
    assert len(usage) == 1
    record = mesh.record("k5")
    assert record.results[1].error_type == "StepTimeout" and record.late[1].output == {"refund_id": "ref_1"}
    wait_for(lambda: mesh.leases.holder(TENANT, "k5") is None, timeout_s=10, message="the lease to be released")
    # A redelivery of attempt 1 re-publishes both, as first published, marked replayed.
    before = len(mesh.results("k5"))
    mesh.run(mesh.request("k5", 1, "gate"))
    again = mesh.results("k5")[before:]
    assert [(r["event_id"], r["status"], r["replayed"]) for r in again] == [
        (_sha("k5#1#result"), "error", True), (_sha("k5#1#late"), "ok", True)]
    assert gate.started == [1]


def test_a_failure_after_the_timeout_publishes_nothing_more(mesh: Mesh) -> None:
    gate = Gate(error=TransientError("upstream 503"))
    mesh.gates = [gate]  # type: ignore[attr-defined]
    mesh.tool("gate", gate)
    _time_out(mesh, gate, mesh.request("k6", 1, "gate"))
    gate.release.set()
    wait_for(lambda: mesh.leases.holder(TENANT, "k6") is None, timeout_s=10, message="the lease to be released")
    assert [r["error_type"] for r in mesh.results("k6")] == ["StepTimeout"]
    assert mesh.record("k6").late == {}


def test_a_result_that_cannot_be_recorded_now_is_kept_and_recorded_later(mesh: Mesh) -> None:
    runs: list[int] = []

    def effect(inputs: dict[str, Any], call: Call) -> Any:
        runs.append(call.attempt)
        return {"done": True}
    mesh.tool("effect", effect)
    mesh.uow.fail_commits = 1  # Redis away right after the effect happened
    with pytest.raises(TransientError):
        mesh.run(mesh.request("k7", 1, "effect"))

    def answered() -> bool:
        try:
            mesh.run(mesh.request("k7", 1, "effect"))  # the consumer's retry
            return True
        except TransientError:
            return False  # still waiting for the background to record it
    wait_for(answered, timeout_s=10, message="the kept result to be recorded")
    assert runs == [1], "the effect must not be repeated"
    assert mesh.record("k7").results[1].output == {"done": True}
    assert [r["status"] for r in mesh.results("k7")][-1] == "ok"


def test_records_left_in_the_outbox_by_a_crash_are_produced_on_the_next_delivery(mesh: Mesh) -> None:
    runs: list[int] = []
    mesh.tool("effect", lambda inputs, call: runs.append(call.attempt) or {"ok": 1})
    mesh.run(mesh.request("k8", 1, "effect"))
    key = keys.record(TENANT, "k8")
    published = list(mesh.producer.sent)
    # The process died after the commit and before the broker acknowledged: the outbox is still there.
    loaded = mesh.uow.load(key)
    mesh.uow.commit(Change(key, loaded.version, loaded.state or "", outbox=published))
    mesh.producer.sent.clear()
    mesh.run(mesh.request("k8", 1, "effect"))
    assert runs == [1]
    assert mesh.uow.load(key).outbox == []
    assert [(r["event_id"], r["replayed"]) for r in mesh.results("k8")] == [
        (_sha("k8#1#result"), False), (_sha("k8#1#result"), True)]  # the outbox as committed, then the answer
    assert len(mesh.producer.of("usage")) == 1


def test_a_broker_that_does_not_acknowledge_neither_loses_nor_repeats_the_effect(mesh: Mesh) -> None:
    runs: list[int] = []
    mesh.tool("effect", lambda inputs, call: runs.append(call.attempt) or {"ok": 1})
    mesh.producer.fail_flushes = 1
    with pytest.raises(TransientError):
        mesh.run(mesh.request("k13", 1, "effect"))
    wait_for(lambda: mesh.results("k13"), timeout_s=10, message="the recorded result to be produced")
    wait_for(lambda: mesh.leases.holder(TENANT, "k13") is None, timeout_s=10, message="the lease to be released")
    mesh.run(mesh.request("k13", 1, "effect"))  # the consumer's retry
    assert runs == [1]
    assert {r["event_id"] for r in mesh.results("k13")} == {_sha("k13#1#result")}


# -- 3. start-to-close -------------------------------------------------------------------------------------------
def test_time_queued_for_a_worker_does_not_count_against_the_running_call() -> None:
    work = Gate(output={"done": True})
    with only_worker_taken("work", work) as (mesh, busy):
        step = mesh.run_in_thread(mesh.request("k9", 1, "work", timeout_ms=1000))
        wait_for(lambda: mesh.runner.queued() == 1, timeout_s=10, message="the call to queue")
        mesh.clock.advance(0.9)  # queued 900 ms of its 1000
        busy.release.set()
        wait_for(lambda: work.started == [1], timeout_s=10, message="the call to start")
        mesh.clock.advance(0.9)  # 1800 ms since accepted, 900 ms since it started
        step.join(0.2)  # a handler that counted the queue time would report StepTimeout now
        work.release.set()
        step.join(10)
        result = mesh.results("k9")[-1]
        assert (result["status"], result["error_type"]) == ("ok", None), result
        assert result["duration_ms"] == pytest.approx(900, abs=1)  # the running time, by the runner's clock


# -- 4. claim check ----------------------------------------------------------------------------------------------
def test_an_output_over_the_threshold_travels_by_reference() -> None:
    mesh = Mesh(claim_threshold=1024)
    big = {"rows": ["x" * 100] * 50}
    mesh.tool("big", lambda inputs, call: big)
    mesh.tool("small", lambda inputs, call: {"n": 1})
    try:
        mesh.run(mesh.request("k10", 1, "big"))
        mesh.run(mesh.request("k11", 1, "small"))
        ref = json.loads(mesh.results("k10")[-1]["output_json"])
        encoded = json.dumps(big).encode()
        sha = hashlib.sha256(encoded).hexdigest()
        assert ref == {"$claim": f"aios:{{{TENANT}}}:claim:{sha}", "bytes": len(encoded), "sha256": sha}
        assert mesh.claims.get(ref["$claim"]) == encoded
        assert mesh.record("k10").results[1].output == ref, "the record keeps the reference, not the bytes"
        assert json.loads(mesh.results("k11")[-1]["output_json"]) == {"n": 1}
        mesh.run(mesh.request("k10", 1, "big"))  # a replay carries the same reference
        assert json.loads(mesh.results("k10")[-1]["output_json"]) == ref
    finally:
        mesh.close()


# -- 6. retention ------------------------------------------------------------------------------------------------
def test_records_fences_and_claims_expire_after_the_retention_setting() -> None:
    mesh = Mesh(claim_threshold=1024)
    mesh.tool("big", lambda inputs, call: {"blob": "y" * 4096})
    try:
        mesh.run(mesh.request("k12", 1, "big"))
        record_key = keys.record(TENANT, "k12")
        assert mesh.uow.expiry[record_key] == pytest.approx(mesh.uow.clock() + 3600, abs=5)
        [(claim_key, (_data, claim_due))] = mesh.claims.items.items()
        assert claim_due == pytest.approx(mesh.claims.clock() + 3600, abs=5)
        _fence, fence_due = mesh.leases.fences[(TENANT, "k12")]
        assert fence_due == pytest.approx(mesh.leases.clock() + 3600, abs=5)
    finally:
        mesh.close()


# -- the plug-in API ---------------------------------------------------------------------------------------------
def test_plugins_register_tools_through_the_long_standing_import_path() -> None:
    from services.executor.tools import ToolResult, tool

    @tool("test.plugin_echo")
    def echo(inputs: dict[str, Any], call: Call) -> ToolResult:
        return ToolResult({"key": call.idempotency_key, **inputs}, cost=0.5)

    mesh = Mesh()  # a toolbox built after the plug-in was imported has its tool
    try:
        mesh.run(mesh.request("k14", 1, "test.plugin_echo", a=1))
        result = mesh.results("k14")[-1]
        assert json.loads(result["output_json"]) == {"key": "k14", "a": 1} and result["cost"] == 0.5
    finally:
        mesh.close()


@pytest.mark.parametrize("cost", [float("nan"), float("inf"), -0.5, 1e300])
def test_a_plugin_cost_that_is_not_an_amount_is_reported_as_the_estimate(mesh: Mesh, cost: float,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    """Old code published NaN (truthy, so ``cost or estimate`` kept it), inf, negative or absurd costs:
    the planner's settlement of the step was then refused for good and its run never ended."""
    from services.executor.tools import ToolResult

    mesh.tool("test.bad_cost", lambda inputs, call: ToolResult({"ok": True}, cost=cost))
    request = {**mesh.request("k15", 1, "test.bad_cost"), "cost_estimate": 0.25}
    mesh.run(request)
    result = mesh.results("k15")[-1]
    assert result["status"] == "ok" and result["cost"] == 0.25
    assert "test.bad_cost reported cost" in caplog.text


# -- round trips -------------------------------------------------------------------------------------------------
def test_a_step_reads_its_record_twice_and_commits_against_the_read_under_its_lease(mesh: Mesh) -> None:
    """Before its lease (a replay needs no lease) and under it (the holder before may have just
    finished); the outcome is committed against that second read, not a third (was: 3 reads)."""
    mesh.tool("t", lambda inputs, call: {"ok": 1})
    mesh.run(mesh.request("k1", 1, "t"))
    assert mesh.uow.loads == [keys.record(TENANT, "k1")] * 2
    assert [r["status"] for r in mesh.results("k1")] == ["ok"]


def test_a_record_changed_during_the_call_is_read_again_and_the_outcome_recorded_once(mesh: Mesh) -> None:
    """Another writer commits to the record while the call runs: the commit against the read under the
    lease is refused by its version, the record is read again, and the outcome is recorded once."""
    key = keys.record(TENANT, "k2")

    def meddling(inputs: dict[str, Any], call: Call) -> Any:
        now = mesh.uow.load(key)
        mesh.uow.commit(Change(key=key, expected=now.version, state=now.state or "{}", outbox=[]))
        return {"ok": 2}

    mesh.tool("t", meddling)
    mesh.run(mesh.request("k2", 1, "t"))
    assert mesh.uow.loads == [key] * 4  # before, under the lease, the tool's own, after the refused commit
    assert [r["status"] for r in mesh.results("k2")] == ["ok"]
    assert len(mesh.record("k2").own(1)) == 1


def test_a_batch_whose_flush_fails_keeps_what_the_crash_left_in_the_outbox(mesh: Mesh) -> None:
    """A crash left attempt 1's timeout result and usage in the outbox; attempt 2 runs in a consumer
    batch, which queues them again, commits its own records and flushes once at the end. The flush
    fails: the outbox must still hold attempt 1's records (was: replaced by attempt 2's, so they were
    never delivered and attempt 1's cost never billed)."""
    mesh.tool("effect", lambda inputs, call: {"ok": call.attempt})
    key = keys.record(TENANT, "k21")
    left = [mesh.producer.encode("usage", "run-k21", {"event_id": "u1", "attempt": 1}),
            mesh.producer.encode("step_results", "run-k21", {"event_id": "r1", "attempt": 1})]
    mesh.uow.commit(Change(key, "", StepRecord().to_json(), outbox=left))
    mesh.producer.fail_flushes = 1
    request = mesh.request("k21", 2, "effect")
    rec = Inbound(topic="step_requests", role="step_requests", partition=0, offset=0, key=request["run_id"],
                  schema="StepRequest", value=request, headers={}, idempotency_key=request["event_id"])
    with pytest.raises(TransientError):
        mesh.handler.handle([rec])
    outbox = {r.event_id for r in mesh.uow.load(key).outbox}
    assert {"u1", "r1"} <= outbox and len(outbox) == 4, outbox  # and attempt 2's result and usage
    mesh.handler.handle([rec])  # the redelivery: everything goes out once the broker acknowledges
    assert {"u1", "r1"} <= {r.event_id for r in mesh.producer.sent}
    assert mesh.uow.load(key).outbox == []
