"""Observability in-process against the embedded broker and Redis: records on
the four topics (workflow events as typed WorkflowEvent v2 records) become
timelines and queries, once each, per tenant; metrics follow; bad requests get
clear errors."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from prometheus_client import REGISTRY

from aiosmesh.v1 import audit_pb2, audit_pb2_grpc
from infra.stack import procs
from services.common.catalog import Catalog
from services.common.codec import AvroCodec
from services.common.kafka import Inbound, MeshProducer
from services.common.settings import load_settings
from services.common.uow import marker_key
from services.observability.adapters.audit_store import DAY_MS, RedisAuditStore
from services.observability.domain.entries import LATE_REASON, AuditEntry
from services.observability.domain.query import build_filter
from services.observability.handlers import ROLES, ObservabilityContext, handle_records
from services.observability.main import bootstrap
from services.observability.settings import ObservabilitySettings
from tests.conftest import wait_for

pytestmark = pytest.mark.integration
T0 = 1_800_000_000_000


class Mesh:
    """A producer onto the test's topics and a client of the service under test."""

    def __init__(self, env: dict[str, str], prefix: str, stub: audit_pb2_grpc.AuditServiceStub, rt: Any) -> None:
        catalog = Catalog(prefix)
        self.producer = MeshProducer(env["AIOS_KAFKA_BOOTSTRAP"], catalog, AvroCodec(catalog.schemas))
        self.stub, self.rt, self.catalog = stub, rt, catalog

    def send(self, role: str, key: str, record: dict[str, Any]) -> None:
        self.producer.send(role, key=key, record=dict(record))
        self.producer.flush()

    def timeline(self, tenant: str, run_id: str) -> list[audit_pb2.AuditEntry]:
        return list(self.stub.Timeline(audit_pb2.TimelineRequest(tenant=tenant, run_id=run_id), timeout=10).entries)

    def query(self, tenant: str, **kw: Any) -> list[audit_pb2.AuditEntry]:
        return list(self.stub.Query(audit_pb2.AuditQuery(tenant=tenant, **kw), timeout=10).entries)

    def wait_timeline(self, tenant: str, run_id: str, count: int) -> list[audit_pb2.AuditEntry]:
        def ready() -> list[audit_pb2.AuditEntry] | None:
            try:
                entries = self.timeline(tenant, run_id)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise
                return None
            return entries if len(entries) >= count else None

        return wait_for(ready, timeout_s=45, message=f"{count} timeline entries of {tenant}/{run_id}")


@pytest.fixture
def mesh(mesh_env: dict[str, str], prefix: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Mesh]:
    monkeypatch.setenv("AIOS_OBSERVABILITY_ADDR", f"127.0.0.1:{procs.free_port()}")
    monkeypatch.setenv("AIOS_OBSERVABILITY_METRICS_PORT", "0")
    settings = load_settings(ObservabilitySettings)
    rt = bootstrap(settings)
    channel = grpc.insecure_channel(settings.observability_addr)
    try:
        yield Mesh(mesh_env, prefix, audit_pb2_grpc.AuditServiceStub(channel), rt)
    finally:
        channel.close()
        rt.shutdown()


def uid(head: str) -> str:
    return f"{head}{uuid.uuid4().hex[:8]}"


BODIES: dict[str, dict[str, Any]] = {  # a valid body per event type used here; tests override fields
    "RunStarted": {"input_json": "{}", "workflow_digest": "sha256:test"},
    "StepDispatched": {"attempt": 1, "tool": "unknown"},
    "StepCompleted": {"attempt": 1, "cost": 0.0, "late": False},
    "StepFailed": {"attempt": 1, "failure": {"type": "Error", "message": "", "retryable": False}},
    "ApprovalRequested": {"role": "", "reason": "", "deadline_ms": None},
    "ApprovalGranted": {"actor": "", "reason": ""},
    "RunCompleted": {"cost": 0.0, "output_json": "null"},
    "RunFailed": {"cost": 0.0, "reason": ""},
    "RunCancelled": {"cost": 0.0, "reason": ""},
}


def wf_event(tenant: str, run_id: str, workflow: str, kind: str, at: int, body: dict[str, Any] | None = None,
             **kw: Any) -> dict[str, Any]:
    """A WorkflowEvent v2 as the planner writes it: ``type`` the enum symbol, ``body`` the union value."""
    rec = {"tenant": tenant, "occurred_at": at, "run_id": run_id, "workflow": workflow, "workflow_version": 1,
           "type": kind, "step_id": None, "status": None, "duration_ms": None,
           "body": (f"aiosmesh.v1.{kind}", {**BODIES[kind], **(body or {})})}
    rec.update(kw)
    return rec


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.mark.timeout(120)
def test_one_run_from_every_topic_reads_as_one_timeline(mesh: Mesh) -> None:
    tenant, run, wf, tool = uid("t"), uid("r"), uid("wf"), uid("bank.")
    dlq_before = metric("aios_dlq_depth_records", source_topic="step_requests", error_type="BadRecord")
    # Sent out of timeline order and across topics: the timeline sorts by occurred_at.
    mesh.send("workflow_events", run, wf_event(tenant, run, wf, "RunCompleted", T0 + 900, {"cost": 0.3},
                                               status="completed", duration_ms=900.0))
    mesh.send("workflow_events", run, wf_event(tenant, run, wf, "RunStarted", T0))
    mesh.send("workflow_events", run, wf_event(tenant, run, wf, "StepDispatched", T0 + 100, {"tool": tool},
                                               step_id="s1", status="dispatched"))
    mesh.send("audit", run, {"tenant": tenant, "occurred_at": T0 + 50, "service": "policy", "run_id": run,
                             "step_id": "s1", "action": "policy.evaluate", "decision": "require_approval",
                             "reason": "needs a human", "policy_id": "default@v1:r", "cost": 0.3,
                             "detail_json": json.dumps({"budget": {"limit": 10, "remaining": 4}})})
    mesh.send("workflow_events", run, wf_event(tenant, run, wf, "ApprovalRequested", T0 + 60, {"role": "finance"},
                                               step_id="s1", status="waiting_approval"))
    mesh.send("usage", run, {"tenant": tenant, "occurred_at": T0 + 400, "run_id": run, "step_id": "s1",
                             "tool": tool, "model": None, "units": 1.0, "cost": 0.3, "latency_class": "batch",
                             "duration_ms": 300.0})
    mesh.send("workflow_events", run, wf_event(tenant, run, wf, "StepCompleted", T0 + 500, {"cost": 0.3},
                                               step_id="s1", status="succeeded", duration_ms=400.0))
    mesh.send("deadletters", run, {"tenant": tenant, "occurred_at": T0 + 950, "service": "executor", "group": "g",
                                   "source_topic": mesh.catalog.topic("step_requests"), "partition": 0,
                                   "offset": 3, "key": run.encode(), "value": b"junk", "headers_json": "{}",
                                   "error_type": "BadRecord", "error_message": "cannot decode", "retryable": False,
                                   "attempts": 1})
    entries = mesh.wait_timeline(tenant, run, 8)
    assert [e.action for e in entries] == [
        "workflow.RunStarted", "policy.evaluate", "workflow.ApprovalRequested", "workflow.StepDispatched", "usage",
        "workflow.StepCompleted", "workflow.RunCompleted", "deadletter"]
    assert [e.occurred_at_ms for e in entries] == sorted(e.occurred_at_ms for e in entries)
    done = entries[6]
    assert (done.service, done.decision, done.cost, json.loads(done.detail_json)["duration_ms"]) == \
        ("planner", "completed", 0.3, 900.0)
    assert json.loads(entries[3].detail_json)["detail"] == {"attempt": 1, "tool": tool}
    assert mesh.query(tenant, limit=3)[0].action == "deadletter"  # newest first
    assert [e.action for e in mesh.query(tenant, action="workflow.Step*")] == ["workflow.StepCompleted",
                                                                              "workflow.StepDispatched"]
    assert [e.action for e in mesh.query(tenant, run_id=run, action="usage")] == ["usage"]

    assert metric("aios_workflow_runs_started_total", workflow=wf) == 1
    assert metric("aios_workflow_runs_finished_total", workflow=wf, outcome="completed") == 1
    assert metric("aios_workflow_run_duration_seconds_sum", workflow=wf, outcome="completed") == 0.9
    assert metric("aios_workflow_steps_total", workflow=wf, step="s1", tool=tool,
                  status="succeeded") == 1  # tool from StepDispatched
    assert metric("aios_human_interventions_total", workflow=wf, kind="requested") == 1
    assert metric("aios_usage_cost_currency_units_total", tenant=tenant, workflow=wf, model="none") == \
        pytest.approx(0.3)
    assert metric("aios_budget_remaining_ratio", tenant=tenant) == pytest.approx(0.4)
    assert metric("aios_dlq_depth_records", source_topic="step_requests", error_type="BadRecord") == dlq_before + 1
    assert metric("aios_event_lag_seconds_count", topic="usage") >= 1


@pytest.mark.timeout(120)
def test_redelivered_records_are_stored_once(mesh: Mesh) -> None:
    tenant, run, wf = uid("t"), uid("r"), uid("wf")
    started = {**wf_event(tenant, run, wf, "RunStarted", T0), "event_id": uid("ev")}
    for _ in range(3):  # the same event id three times, as a redelivery would bring it
        mesh.send("workflow_events", run, started)
    # Same key, same partition: once this one is stored, the copies before it were handled.
    mesh.send("workflow_events", run, wf_event(tenant, run, wf, "RunCancelled", T0 + 5, status="cancelled"))
    entries = mesh.wait_timeline(tenant, run, 2)
    assert [e.action for e in entries] == ["workflow.RunStarted", "workflow.RunCancelled"]
    assert entries[0].event_id == started["event_id"]
    assert metric("aios_workflow_runs_started_total", workflow=wf) == 1

    # The handler itself, given the same record again (a crash before the offset commit).
    store = RedisAuditStore(mesh.rt.redis)
    ctx = ObservabilityContext(store=store, catalog=mesh.catalog)
    again = Inbound(topic=mesh.catalog.topic("workflow_events"), role="workflow_events", partition=0, offset=1,
                    key=run, schema="aiosmesh.v1.WorkflowEvent", value=started, headers={},
                    idempotency_key=started["event_id"])
    handle_records(ctx, [again, again])
    assert len(mesh.timeline(tenant, run)) == 2
    assert metric("aios_workflow_runs_started_total", workflow=wf) == 1


@pytest.mark.timeout(120)
def test_a_failed_run_reads_with_its_reasons_actors_and_late_flag(mesh: Mesh) -> None:
    tenant, run, wf = uid("t"), uid("r"), uid("wf")
    declined = {"type": "PermanentError", "message": "card declined by issuer", "retryable": False}
    for at, kind, body, kw in [
        (1, "RunStarted", {}, {}),
        (2, "ApprovalGranted", {"actor": "ann", "reason": "amount checked"}, {"step_id": "pay"}),
        (3, "StepFailed", {"attempt": 2, "failure": declined}, {"step_id": "pay", "status": "failed"}),
        (4, "StepCompleted", {"attempt": 1, "cost": 0.2, "late": True}, {"step_id": "hold", "status": "succeeded"}),
        (5, "RunFailed", {"cost": 0.2, "reason": "step pay failed: card declined by issuer"}, {"status": "failed"}),
    ]:
        mesh.send("workflow_events", run, wf_event(tenant, run, wf, kind, T0 + at, body, **kw))
    entries = {e.action: e for e in mesh.wait_timeline(tenant, run, 5)}
    granted = entries["workflow.ApprovalGranted"]
    assert (granted.actor, granted.reason, granted.step_id) == ("ann", "amount checked", "pay")
    failed = entries["workflow.StepFailed"]
    assert (failed.reason, failed.decision) == ("card declined by issuer", "failed")
    assert json.loads(failed.detail_json)["detail"] == {"attempt": 2, "failure": declined}
    late = entries["workflow.StepCompleted"]
    assert (late.reason, late.cost, json.loads(late.detail_json)["detail"]["late"]) == (LATE_REASON, 0.2, True)
    assert (entries["workflow.RunFailed"].reason, entries["workflow.RunFailed"].cost) == \
        ("step pay failed: card declined by issuer", 0.2)
    assert metric("aios_workflow_runs_finished_total", workflow=wf, outcome="failed") == 1


@pytest.mark.timeout(60)
def test_a_redelivery_after_retention_dropped_the_entry_is_not_stored_again(mesh: Mesh) -> None:
    """The entries hash forgets what retention trims; the marker (the unit of work's layout) does not."""
    now = [T0]
    store = RedisAuditStore(mesh.rt.redis, retention_days=1, marker_ttl_s=600, clock_ms=lambda: now[0])
    tenant, run = uid("t"), uid("r")
    entries = [AuditEntry(event_id=uid("e"), tenant=tenant, occurred_at_ms=T0 - DAY_MS + 2000 * i, service="s",
                          action=f"a{i}", run_id=run) for i in range(3)]
    assert store.add(entries) == [True, True, True]
    now[0] = T0 + 1500  # a0 is now older than a day
    assert store.trim(tenant) == 1
    assert [e.action for e in store.timeline(tenant, run)] == ["a1", "a2"]  # a0 trimmed by retention
    assert store.add([entries[0]]) == [False]  # its redelivery is recognised, not stored or counted again
    assert [e.action for e in store.timeline(tenant, run)] == ["a1", "a2"]
    marker = marker_key(tenant, entries[0].event_id, consumer="observability")
    assert 0 < mesh.rt.redis.ttl(marker) <= 600
    # The service's own store keeps markers as long as the longest-kept consumed topic.
    longest = max(mesh.catalog.spec(role).retention_ms for role in ROLES) // 1000
    other = uid("t")
    mesh.send("workflow_events", run, {**wf_event(other, run, "wf", "RunStarted", T0), "event_id": "ev-marked"})
    mesh.wait_timeline(other, run, 1)
    assert longest - 60 < mesh.rt.redis.ttl(marker_key(other, "ev-marked", consumer="observability")) <= longest


@pytest.mark.timeout(120)
def test_tenants_never_see_each_other(mesh: Mesh) -> None:
    a, b, run = uid("ta"), uid("tb"), uid("r")
    mesh.send("workflow_events", run, wf_event(a, run, "wf", "RunStarted", T0, {"input_json": '{"secret": "A"}'}))
    mesh.send("workflow_events", run, wf_event(b, run, "wf", "RunStarted", T0 + 1))
    mesh.send("workflow_events", run, wf_event(b, run, "wf", "RunCompleted", T0 + 2, status="completed"))
    assert len(mesh.wait_timeline(a, run, 1)) == 1
    assert {e.tenant for e in mesh.wait_timeline(b, run, 2)} == {b}
    assert all("secret" not in e.detail_json for e in mesh.query(b, run_id=run))
    assert {e.tenant for e in mesh.query(a)} == {a}
    with pytest.raises(grpc.RpcError) as err:
        mesh.timeline(uid("tc"), run)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.timeout(120)
def test_undecodable_audit_record_is_dead_lettered_and_recorded(mesh: Mesh) -> None:
    run = uid("r")
    mesh.producer.send_raw(mesh.catalog.topic("audit"), run, b"not avro", {"tenant": ""})
    mesh.producer.flush()
    # The consumer loop dead-letters it; observability stores the dead letter under _system, filed by run.
    entry = mesh.wait_timeline("_system", run, 1)[0]
    assert (entry.action, entry.decision, entry.service) == ("deadletter", "BadRecord", "observability")
    assert json.loads(entry.detail_json)["source_role"] == "audit"


@pytest.mark.timeout(60)
def test_bad_requests_get_clear_errors(mesh: Mesh) -> None:
    cases = [(lambda: mesh.timeline("demo", ""), grpc.StatusCode.INVALID_ARGUMENT, "run_id is required"),
             (lambda: mesh.timeline("demo", uid("nope")), grpc.StatusCode.NOT_FOUND, "no audit entries for run"),
             (lambda: mesh.query(""), grpc.StatusCode.INVALID_ARGUMENT, "tenant is required"),
             (lambda: mesh.query("demo", limit=-1), grpc.StatusCode.INVALID_ARGUMENT, "limit must be >= 0")]
    for call, code, message in cases:
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == code and message in err.value.details()


@pytest.mark.timeout(60)
def test_retention_is_by_time_for_each_tenant(mesh: Mesh) -> None:
    """A burst of new entries never pushes out recent ones; entries past the retention leave the
    log, every index, the run's timeline and the entries hash."""
    now = [T0]
    store = RedisAuditStore(mesh.rt.redis, retention_days=90, clock_ms=lambda: now[0], trim_interval_s=0)
    tenant, other, run = uid("t"), uid("t"), uid("r")
    # Two entries 100 and 95 days old, then 5,000 of today (far more than a count cap of 100 would keep).
    old = [AuditEntry(event_id=f"old{i}", tenant=tenant, occurred_at_ms=T0 - (100 - 5 * i) * DAY_MS, service="s",
                      action="approval.approved", actor="ann", run_id=run) for i in range(2)]
    kept = AuditEntry(event_id="kept", tenant=tenant, occurred_at_ms=T0 - 89 * DAY_MS, service="s",
                      action="approval.approved", actor="ann", run_id=run)
    assert store.add([*old, kept]) == [True] * 3
    store.add([AuditEntry(event_id=f"n{i}", tenant=tenant, occurred_at_ms=T0 + i, service="s", action="usage")
               for i in range(5000)])
    store.add([AuditEntry(event_id="x", tenant=other, occurred_at_ms=T0 - 95 * DAY_MS, service="s", action="keep",
                          run_id=run)])
    store.trim_all()  # what the write path does every trim_interval_s, before its next write
    assert [e.event_id for e in store.timeline(tenant, run)] == ["kept"]
    assert mesh.rt.redis.hlen(f"aios:{{{tenant}}}:audit:entries") == 5001
    assert store.query(build_filter(tenant, actor="ann"))[2] == 1
    assert store.query(build_filter(tenant, action="approval.*"))[0] == [kept]
    assert mesh.rt.redis.zcard(f"aios:{{{tenant}}}:audit:log") == 5001
    assert [e.event_id for e in store.timeline(other, run)] == []  # the other tenant's 95-day-old entry too
    now[0] = T0 + 2 * DAY_MS  # two days on, "kept" is 91 days old
    assert store.trim(tenant) == 1
    assert store.query(build_filter(tenant, actor="ann", action="approval.approved"))[2] == 0


@pytest.mark.timeout(120)
def test_forget_erases_the_subject_from_audit_payloads_and_keeps_that_it_happened(mesh: Mesh) -> None:
    """memory's Forget publishes memory.forget; observability then erases the data subject from every
    stored entry of the tenant (payloads, reasons) and keeps the erasure, with the subject only hashed."""
    from services.common.audit import audit_record

    tenant, run, other_run, subject = uid("t"), uid("r"), uid("r"), "cust-0042"
    mesh.send("workflow_events", run, wf_event(tenant, run, "wf", "RunStarted", T0, {
        "input_json": json.dumps({"customer_id": subject, "text": "my card is lost"})}))
    mesh.send("audit", run, {**audit_record("policy", tenant, "policy.evaluate", run_id=run, decision="allow",
                                            reason=f"checked for {subject}", detail={"inputs": {"customer_id": subject}}),
                             "occurred_at": T0 + 1})
    mesh.send("workflow_events", other_run, wf_event(tenant, other_run, "wf", "RunStarted", T0 + 2, {
        "input_json": json.dumps({"customer_id": "cust-00421"})}))  # another subject, whose id starts alike
    # The subject as an actor: in the query indexes (and their key names) too.
    mesh.send("audit", run, {**audit_record("support", tenant, "case.opened", run_id=run, actor=subject),
                             "occurred_at": T0 + 2})
    mesh.wait_timeline(tenant, run, 3)
    assert mesh.stub.Query(audit_pb2.AuditQuery(tenant=tenant, actor=subject), timeout=10).total == 1
    mesh.wait_timeline(tenant, other_run, 1)
    mesh.send("audit", subject, {**audit_record("memory", tenant, "memory.forget", decision="erased",
                                                actor="user:pia", reason="data subject erasure request",
                                                detail={"subject": subject, "erased": 3, "by_kind": {"fact": 3}}),
                                 "occurred_at": T0 + 3})

    def erased() -> list[audit_pb2.AuditEntry] | None:
        entries = mesh.query(tenant, limit=100)
        forgets = [e for e in entries if e.action == "memory.forget"]
        return entries if forgets and not any(subject in str(e) for e in entries if e.run_id != other_run) else None

    entries = wait_for(erased, timeout_s=45, message="the subject erased from the audit trail")
    [forget] = [e for e in entries if e.action == "memory.forget"]
    import hashlib

    detail = json.loads(forget.detail_json)
    assert detail == {"subject_sha256": hashlib.sha256(f"{tenant}:{subject}".encode()).hexdigest(), "erased": 3,
                      "by_kind": {"fact": 3}}
    assert (forget.actor, forget.decision) == ("user:pia", "erased")
    kept = {e.action: e for e in mesh.timeline(tenant, run)}  # the entries stay, without the subject's data
    assert set(kept) == {"workflow.RunStarted", "policy.evaluate", "case.opened"}
    assert kept["case.opened"].actor == "[erased]"
    # Not findable by the old actor any more, and no Redis key names the subject.
    assert mesh.stub.Query(audit_pb2.AuditQuery(tenant=tenant, actor=subject), timeout=10).total == 0
    assert mesh.stub.Query(audit_pb2.AuditQuery(tenant=tenant, actor="[erased]"), timeout=10).total == 1
    named = [k for k in mesh.rt.redis.scan_iter(f"aios:{{{tenant}}}:*", count=1000) if subject in k]
    assert named == [] and not [k for k in mesh.rt.redis.smembers(f"aios:{{{tenant}}}:audit:keys") if subject in k]
    assert kept["policy.evaluate"].reason == "checked for [erased]"
    assert json.loads(kept["policy.evaluate"].detail_json)["erased"] == "data subject erasure"
    assert "cust-00421" in mesh.timeline(tenant, other_run)[0].detail_json
