"""Observability domain: record -> audit entry conversions (workflow events
as typed WorkflowEvent v2 records), metric signals, query rules. Pure and fast."""

from __future__ import annotations

import json
from typing import Any

import pytest

from services.common.errors import BadRecord, InvalidArgument
from services.observability.domain.entries import (
    LATE_REASON,
    AuditEntry,
    from_audit_record,
    from_dead_letter,
    from_usage,
    from_workflow_event,
)
from services.observability.domain.query import DEFAULT_LIMIT, MAX_LIMIT, build_filter, check_timeline
from services.observability.domain.signals import (
    ApprovalDecided,
    BudgetSeen,
    Compensation,
    Cost,
    HumanIntervention,
    RunFinished,
    RunStarted,
    StepFailure,
    StepRetried,
    StepSettled,
    audit_signals,
    dlq_replay,
    step_tool,
    usage_signals,
    workflow_signals,
)

pytestmark = pytest.mark.timeout(10)


def wf_event(kind: str, body: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
    """A decoded WorkflowEvent v2: ``type`` a plain string, ``body`` as (full record name, fields)."""
    rec = {"event_id": f"e-{kind}", "tenant": "demo", "occurred_at": 1_700_000_000_123, "run_id": "r1",
           "workflow": "refund", "workflow_version": 2, "type": kind, "step_id": None, "status": None,
           "duration_ms": None, "body": (f"aiosmesh.v1.{kind}", body or {})}
    rec.update(kw)
    return rec


def test_audit_record_kept_as_is() -> None:
    rec = {"event_id": "a1", "tenant": "demo", "occurred_at": 5, "service": "policy", "run_id": None,
           "step_id": "s", "action": "policy.evaluate", "decision": "deny", "actor": None, "reason": "why",
           "policy_id": "default@v1:x", "model_version": None, "cost": None, "detail_json": "{}"}
    e = from_audit_record(rec)
    assert e == AuditEntry(event_id="a1", tenant="demo", occurred_at_ms=5.0, service="policy",
                           action="policy.evaluate", step_id="s", decision="deny", reason="why",
                           policy_id="default@v1:x", detail_json="{}")
    assert AuditEntry.from_json(e.to_json()) == e


def test_workflow_event_becomes_planner_entry() -> None:
    failure = {"type": "PermanentError", "message": "boom", "retryable": False}
    e = from_workflow_event(wf_event("StepFailed", {"attempt": 2, "failure": failure}, step_id="s1",
                                     status="failed", duration_ms=12.5))
    assert (e.service, e.action, e.decision, e.step_id, e.reason, e.cost) == \
        ("planner", "workflow.StepFailed", "failed", "s1", "boom", 0.0)
    detail = json.loads(e.detail_json)
    assert detail == {"workflow": "refund", "workflow_version": 2, "type": "StepFailed", "status": "failed",
                      "duration_ms": 12.5, "detail": {"attempt": 2, "failure": failure}}
    retrying = from_workflow_event(wf_event("StepRetrying", {"attempt": 1, "delay_ms": 200, "failure": {
        "type": "StepTimeout", "message": "no answer in 5 s", "retryable": True}}))
    assert retrying.reason == "no answer in 5 s" and json.loads(retrying.detail_json)["detail"]["delay_ms"] == 200
    approval = from_workflow_event(wf_event("ApprovalGranted", {"actor": "ann", "reason": "ok"}))
    assert (approval.actor, approval.reason) == ("ann", "ok")
    cancel = from_workflow_event(wf_event("CancelRequested", {"actor": "bob", "reason": "customer withdrew"}))
    assert (cancel.actor, cancel.reason) == ("bob", "customer withdrew")
    failed = from_workflow_event(wf_event("RunFailed", {"cost": 0.7, "reason": "step pay failed"}, status="failed"))
    assert (failed.reason, failed.cost, failed.decision) == ("step pay failed", 0.7, "failed")
    down = {"type": "Error", "message": "refund api down", "retryable": False}
    comp = from_workflow_event(wf_event("CompensationFailed", {"failure": down}))
    assert comp.reason == "refund api down"


def test_workflow_event_timeline_keeps_tool_attempt_cost_and_late_flag() -> None:
    dispatched = from_workflow_event(wf_event("StepDispatched", {"attempt": 3, "tool": "bank.pay"}, step_id="pay"))
    assert json.loads(dispatched.detail_json)["detail"] == {"attempt": 3, "tool": "bank.pay"}
    done = from_workflow_event(wf_event("StepCompleted", {"attempt": 1, "cost": 0.25, "late": False}))
    assert (done.cost, done.reason) == (0.25, "")
    late = from_workflow_event(wf_event("StepCompleted", {"attempt": 1, "cost": 0.25, "late": True}))
    assert late.reason == LATE_REASON and json.loads(late.detail_json)["detail"]["late"] is True
    started = from_workflow_event(wf_event("RunStarted", {"input_json": '{"order": "o-1"}', "workflow_digest": "d"}))
    assert json.loads(started.detail_json)["detail"] == {"input": {"order": "o-1"}, "workflow_digest": "d"}
    odd = from_workflow_event(wf_event("RunCompleted", {"cost": 0.0, "output_json": "not json"}))
    assert json.loads(odd.detail_json)["detail"]["output"] == "not json"
    with pytest.raises(BadRecord, match="record name, fields"):
        from_workflow_event({**wf_event("RunStarted"), "body": '{"input": {}}'})


def test_usage_and_dead_letter_entries() -> None:
    u = from_usage({"event_id": "u1", "tenant": "demo", "occurred_at": 9, "run_id": "r1", "step_id": "s1",
                    "tool": "llm.reply", "model": "small@3", "units": 120.0, "cost": 0.02,
                    "latency_class": "interactive", "duration_ms": 40.0})
    assert (u.action, u.service, u.actor, u.model_version, u.cost) == ("usage", "executor", "llm.reply",
                                                                        "small@3", 0.02)
    dl = {"event_id": "d1", "tenant": "", "occurred_at": 9, "service": "executor", "group": "g",
          "source_topic": "t.step.requests", "partition": 0, "offset": 7, "key": b"r9", "value": b"\x00secret",
          "headers_json": "{}", "error_type": "BadRecord", "error_message": "bad", "retryable": False,
          "attempts": 1}
    e = from_dead_letter(dl, source_role="step_requests", run_keyed=True)
    assert (e.tenant, e.action, e.run_id, e.decision, e.reason) == ("_system", "deadletter", "r9", "BadRecord",
                                                                    "bad")
    assert "secret" not in e.detail_json and json.loads(e.detail_json)["value_bytes"] == 7
    assert from_dead_letter({**dl, "tenant": "acme"}, source_role="ingress", run_keyed=False).run_id == ""
    assert from_dead_letter({**dl, "tenant": "acme"}, source_role="ingress", run_keyed=False).tenant == "acme"


@pytest.mark.parametrize("tenant", ["", None, "a{b}", "x" * 65])
def test_bad_tenant_is_a_bad_record(tenant: Any) -> None:
    with pytest.raises(BadRecord, match="tenant"):
        from_workflow_event(wf_event("RunStarted", tenant=tenant))


def test_workflow_signals() -> None:
    assert workflow_signals(wf_event("RunStarted"), "") == [RunStarted("refund")]
    assert workflow_signals(wf_event("RunCompleted", status="completed", duration_ms=1500.0), "") == \
        [RunFinished("refund", "completed", 1.5)]
    assert workflow_signals(wf_event("RunFailed", status="compensation_failed"), "") == \
        [RunFinished("refund", "compensation_failed", None)]
    assert workflow_signals(wf_event("RunCancelled", status="cancelled", duration_ms=10), "") == \
        [RunFinished("refund", "cancelled", 0.01)]
    assert workflow_signals(wf_event("StepCompleted", duration_ms=20.0, step_id="s1"), "bank.x") == \
        [StepSettled("refund", "s1", "bank.x", "succeeded", 0.02)]
    failure = {"attempt": 2, "failure": {"type": "StepTimeout", "message": "slow", "retryable": True}}
    assert workflow_signals(wf_event("StepFailed", failure, step_id="s1"), "") == \
        [StepSettled("refund", "s1", "unknown", "failed", None), StepFailure("refund", "s1", "unknown", "StepTimeout")]
    assert workflow_signals(wf_event("StepRetrying", {**failure, "delay_ms": 5}, step_id="s1"), "t") == \
        [StepRetried("refund", "s1", "t", "StepTimeout")]
    assert workflow_signals(wf_event("StepRetrying"), "t") == [StepRetried("refund", "unknown", "t", "unknown")]
    assert [workflow_signals(wf_event(k), "") for k in ("ApprovalRequested", "ApprovalGranted", "ApprovalRejected")] \
        == [[HumanIntervention("refund", "requested")],
            [HumanIntervention("refund", "approved"), ApprovalDecided("refund", "approved", None)],
            [HumanIntervention("refund", "rejected"), ApprovalDecided("refund", "rejected", None)]]
    requested = 1_700_000_000_123 - 90_000
    assert workflow_signals(wf_event("ApprovalTimedOut"), requested_at_ms=requested) == \
        [HumanIntervention("refund", "timed_out"), ApprovalDecided("refund", "timed_out", 90.0)]
    assert workflow_signals(wf_event("CompensationFailed"), "") == [Compensation("refund", "failed")]
    assert workflow_signals(wf_event("StepDispatched"), "") == []
    assert workflow_signals(wf_event("SomethingNew"), "") == []
    assert step_tool(wf_event("StepDispatched", {"tool": "bank.x", "attempt": 1})) == "bank.x"
    assert step_tool(wf_event("StepCompleted", {"attempt": 1, "cost": 0.0, "late": False})) == ""


def test_usage_and_budget_signals() -> None:
    usage = {"tenant": "demo", "tool": "llm.reply", "cost": 0.25}
    assert usage_signals(usage, "refund") == [Cost("demo", "refund", "llm.reply", "none", 0.25)]
    assert usage_signals({**usage, "cost": 0.0}, "refund") == []
    assert usage_signals({**usage, "cost": 0.0, "units": 120.0, "model": "small@3"}, "refund") == \
        [Cost("demo", "refund", "llm.reply", "small@3", 0.0, 120.0)]
    assert usage_signals(usage, "") == [Cost("demo", "unknown", "llm.reply", "none", 0.25)]
    decision = {"service": "policy", "tenant": "demo", "action": "policy.evaluate", "policy_id": "d@v1:r",
                "detail_json": json.dumps({"budget": {"limit": 50, "remaining": 10}})}
    assert audit_signals(decision) == [BudgetSeen("demo", 0.2, 0.0, exhausted=False)]
    denied = {**decision, "policy_id": "d@v1:budget"}
    assert audit_signals(denied) == [BudgetSeen("demo", 0.2, 0.0, exhausted=True)]
    spent = {"service": "policy", "tenant": "demo", "action": "budget.reconcile", "decision": "spent", "cost": 1.5,
             "detail_json": json.dumps({"budget": {"limit": 10, "remaining": 5}})}
    assert audit_signals(spent) == [BudgetSeen("demo", 0.5, 1.5, exhausted=False)]
    assert audit_signals({**spent, "decision": "duplicate"}) == []
    assert audit_signals({**decision, "service": "planner"}) == []
    replay = {"action": "dlq.replayed", "detail_json": '{"source_role": "ingress", "error_type": "X", "count": 3}'}
    assert dlq_replay(replay) is not None and dlq_replay(replay).count == 3  # type: ignore[union-attr]
    assert dlq_replay({"action": "other"}) is None


def test_query_rules() -> None:
    assert build_filter("demo").limit == DEFAULT_LIMIT
    assert build_filter("demo", limit=10**6).limit == MAX_LIMIT
    flt = build_filter("demo", action="workflow.*", limit=5)
    entry = AuditEntry(event_id="e", tenant="demo", occurred_at_ms=1, service="planner", action="workflow.RunStarted")
    assert flt.accepts(entry)
    assert not build_filter("demo", action="workflow").accepts(entry)
    assert not build_filter("demo", run_id="r2").accepts(entry)
    for call, message in [(lambda: build_filter(""), "tenant is required"),
                          (lambda: build_filter("demo", limit=-1), "limit must be >= 0"),
                          (lambda: check_timeline("demo", ""), "run_id is required"),
                          (lambda: check_timeline("a b", "r"), "is invalid")]:
        with pytest.raises(InvalidArgument, match=message):
            call()
