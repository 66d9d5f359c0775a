"""PolicyService in-process on a real gRPC port, against the embedded broker
and Redis: decisions, audit records, budgets under concurrency, errors."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest

from aiosmesh.v1 import policy_pb2, policy_pb2_grpc
from infra.stack import procs
from services.common.catalog import Catalog
from services.common.codec import AvroCodec
from services.common.settings import load_settings
from services.policy.main import bootstrap
from services.policy.settings import PolicySettings
from tests.conftest import topic_from_start, wait_for

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]

POLICY = """
id: test
version: 7
budgets:
  "*": {limit: 1.0, window: total}
rules:
  - id: card-block-needs-human
    match: {action: run_step, tool: bank.block_card}
    effect: require_approval
    role: fraud-ops
    reason: "Blocking a card locks the customer out; a person confirms."
  - id: no-shell
    match: {tool: "shell.*"}
    effect: deny
pii: {mask_fields: [email, card_number], mask_patterns: [email, card_number, phone]}
"""


class Policy:
    def __init__(self, stub: policy_pb2_grpc.PolicyServiceStub, env: dict[str, str], prefix: str) -> None:
        self.stub, self.env, self.prefix = stub, env, prefix
        self.tenant = f"t{uuid.uuid4().hex[:10]}"

    def evaluate(self, **kw: Any) -> policy_pb2.Decision:
        kw.setdefault("tenant", self.tenant)
        kw.setdefault("action", "run_step")
        return self.stub.Evaluate(policy_pb2.EvaluateRequest(**kw), timeout=10)

    def budget(self) -> policy_pb2.Budget:
        return self.stub.GetBudget(policy_pb2.GetBudgetRequest(tenant=self.tenant), timeout=10)

    def reconcile(self, reservation_id: str, cost: float) -> policy_pb2.Budget:
        return self.stub.ReconcileBudget(policy_pb2.ReconcileRequest(
            tenant=self.tenant, reservation_id=reservation_id, actual_cost=cost), timeout=10)


@pytest.fixture
def service(mesh_env: dict[str, str], prefix: str, tmp_path: Path,
            monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Policy, Any]]:
    yield from _serve(mesh_env, prefix, tmp_path, monkeypatch, POLICY)


def _serve(mesh_env: dict[str, str], prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
           policy: str) -> Iterator[tuple[Policy, Any]]:
    (tmp_path / "test.yaml").write_text(policy)
    monkeypatch.setenv("AIOS_POLICY_ADDR", f"127.0.0.1:{procs.free_port()}")
    monkeypatch.setenv("AIOS_POLICY_METRICS_PORT", "0")
    monkeypatch.setenv("AIOS_POLICY_DIR", str(tmp_path))
    monkeypatch.setenv("AIOS_GRPC_MAX_CONCURRENT_CALLS", "400")  # 200 concurrent callers are a test below
    settings = load_settings(PolicySettings)
    rt = bootstrap(settings)
    channel = grpc.insecure_channel(settings.policy_addr)
    try:
        yield Policy(policy_pb2_grpc.PolicyServiceStub(channel), mesh_env, prefix), rt
    finally:
        channel.close()
        rt.shutdown()


def audit_records(env: dict[str, str], prefix: str, tenant: str, count: int, timeout_s: float = 30) -> list[dict]:
    """Read the audit topic from the beginning until ``count`` records of ``tenant`` arrived."""
    catalog = Catalog(prefix)
    codec = AvroCodec(catalog.schemas)
    topic = catalog.topic("audit")
    with topic_from_start(env["AIOS_KAFKA_BOOTSTRAP"], topic, f"g{uuid.uuid4().hex}") as consumer:
        found: list[dict] = []

        def enough() -> bool:
            for msg in consumer.consume(100, timeout=0.2):
                if not msg.error():
                    record = codec.decode(msg.value())[1]
                    if record["tenant"] == tenant:
                        found.append(record)
            return len(found) >= count

        wait_for(enough, timeout_s=timeout_s, message=f"{count} audit records of {tenant}")
        return found


@pytest.mark.timeout(90)
def test_mask_inputs_applies_the_pii_block_and_refuses_bad_json(service: tuple[Policy, Any]) -> None:
    p, _rt = service
    answer = p.stub.MaskInputs(policy_pb2.MaskRequest(items=[
        policy_pb2.MaskItem(tenant=p.tenant, inputs_json=json.dumps({"text": "mail jane@corp.io", "email": "x@y.org"})),
        policy_pb2.MaskItem(tenant=p.tenant, inputs_json='"call +1 555-123-4567"')]), timeout=10)
    assert [json.loads(m) for m in answer.masked_json] == [{"text": "mail j***@corp.io", "email": "x***@y.org"},
                                                           "call +* ***-***-**67"]
    with pytest.raises(grpc.RpcError) as err:
        p.stub.MaskInputs(policy_pb2.MaskRequest(items=[policy_pb2.MaskItem(tenant=p.tenant, inputs_json="{no")]),
                          timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "items[0].inputs_json is not JSON" in err.value.details()


@pytest.mark.timeout(90)
def test_decision_masks_inputs_and_is_audited(service: tuple[Policy, Any]) -> None:
    p, _rt = service
    inputs = {"customer": {"email": "john.doe@example.com", "card_number": "4111 1111 1111 1234"},
              "note": "call +1 555-123-4567"}
    d = p.evaluate(tool="bank.block_card", principal="workflow:fraud", workflow="fraud", run_id="r1",
                   step_id="block", inputs_json=json.dumps(inputs))
    assert d.effect == "require_approval"
    assert d.approval_role == "fraud-ops"
    assert d.policy_id == "test@v7:card-block-needs-human"
    assert list(d.reasons) == ["card-block-needs-human: require_approval: Blocking a card locks the customer out; "
                               "a person confirms."]
    assert json.loads(d.masked_inputs_json) == {
        "customer": {"email": "j***@example.com", "card_number": "**** **** **** 1234"},
        "note": "call +* ***-***-**67"}
    denied = p.evaluate(tool="shell.exec", run_id="r1", step_id="sh")
    assert (denied.effect, denied.policy_id) == ("deny", "test@v7:no-shell")
    allowed = p.evaluate(action="start_workflow", workflow="fraud", run_id="r1")
    assert (allowed.effect, allowed.policy_id) == ("allow", "test@v7:default")

    records = audit_records(p.env, p.prefix, p.tenant, 3)
    by_step = {r["step_id"]: r for r in records}
    first = by_step["block"]
    assert (first["service"], first["action"], first["decision"], first["run_id"], first["policy_id"],
            first["actor"]) == ("policy", "policy.evaluate", "require_approval", "r1",
                                "test@v7:card-block-needs-human", "workflow:fraud")
    assert "card-block-needs-human" in first["reason"]
    assert first["cost"] == 0.0 and first["model_version"] is None
    detail = json.loads(first["detail_json"])
    assert detail["tool"] == "bank.block_card" and "john.doe" not in first["detail_json"]
    assert (detail["approval_role"], detail["inputs_truncated"]) == ("fraud-ops", False)
    assert by_step["sh"]["decision"] == "deny"


@pytest.mark.timeout(90)
def test_budget_never_overshot_under_concurrency(service: tuple[Policy, Any]) -> None:
    p, _rt = service  # limit 1.0; each step needs 0.1, so exactly 10 of 50 fit

    def one(i: int) -> policy_pb2.Decision:
        return p.evaluate(tool="llm.reply", cost_estimate=0.1, run_id=f"run{i}", step_id="s")

    with ThreadPoolExecutor(max_workers=50) as pool:
        decisions = list(pool.map(one, range(50)))
    allowed = [d for d in decisions if d.effect == "allow"]
    denied = [d for d in decisions if d.effect == "deny"]
    assert (len(allowed), len(denied)) == (10, 40)
    assert len({d.reservation_id for d in allowed}) == 10
    assert all(d.reservation_id.startswith("run") and d.reservation_id.endswith(":s") for d in allowed)
    assert all(d.reservation_id == "" for d in denied)
    assert all(d.policy_id == "test@v7:budget" for d in denied)
    assert denied[0].reasons[-1] == f"budget exhausted: tenant {p.tenant} has 0 remaining of 1, step needs 0.1"
    budget = p.budget()
    assert (budget.limit, budget.reserved, budget.spent, budget.remaining) == (1.0, 1.0, 0.0, 0.0)
    # The last allowed decisions saw less than 20% left: the cheaper tier.
    assert sum(d.model_tier == "high_throughput" for d in allowed) == 2


def test_a_batch_decides_in_order_as_single_calls_would_and_reserves_once_each(
        service: tuple[Policy, Any]) -> None:
    p, _rt = service  # limit 1.0: 10 steps of 0.1 fit
    reqs = [policy_pb2.EvaluateRequest(tenant=p.tenant, action="run_step", tool="llm.reply", cost_estimate=0.1,
                                       run_id=f"b{i}", step_id="s", reservation_id=f"b{i}:s") for i in range(12)]
    batch = p.stub.EvaluateBatch(policy_pb2.EvaluateBatchRequest(requests=reqs), timeout=10).decisions
    assert [d.effect for d in batch] == ["allow"] * 10 + ["deny"] * 2
    assert [d.reservation_id for d in batch[:10]] == [f"b{i}:s" for i in range(10)]
    again = p.stub.EvaluateBatch(policy_pb2.EvaluateBatchRequest(requests=reqs[:3]), timeout=10).decisions
    assert [d.effect for d in again] == ["allow"] * 3  # the same reservations, not new ones
    assert p.budget().reserved == pytest.approx(1.0)


@pytest.mark.timeout(90)
def test_reservations_are_idempotent_and_reconcile_once(service: tuple[Policy, Any]) -> None:
    p, _rt = service
    first = p.evaluate(tool="llm.reply", cost_estimate=0.3, reservation_id="res-1")
    again = p.evaluate(tool="llm.reply", cost_estimate=0.3, reservation_id="res-1")  # the planner retried
    assert (first.effect, again.effect, first.reservation_id, again.reservation_id) == \
        ("allow", "allow", "res-1", "res-1")
    assert p.budget().reserved == pytest.approx(0.3)
    derived = p.evaluate(tool="llm.reply", cost_estimate=0.2, run_id="r", step_id="s")
    assert derived.reservation_id == "r:s"

    after = p.reconcile("res-1", 0.25)
    assert (after.reserved, after.spent, after.remaining) == pytest.approx((0.2, 0.25, 0.55))
    assert p.reconcile("res-1", 0.25).spent == pytest.approx(0.25)     # a duplicate changes nothing
    assert p.reconcile("r:s", 0.0).reserved == pytest.approx(0.0)      # a released hold
    assert p.reconcile("no-estimate", 0.05).spent == pytest.approx(0.3)  # unreserved spend still counts
    # A reservation that was reconciled is not booked again by a late retry of Evaluate.
    assert p.evaluate(tool="llm.reply", cost_estimate=0.3, reservation_id="res-1").effect == "allow"
    assert p.budget().reserved == pytest.approx(0.0)
    records = audit_records(p.env, p.prefix, p.tenant, 8)
    reconciles = [r for r in records if r["action"] == "budget.reconcile"]
    assert len(reconciles) == 4
    spent = next(r for r in reconciles if r["decision"] == "spent" and "res-1" in r["reason"])
    assert (spent["service"], spent["cost"], spent["reason"], spent["actor"], spent["policy_id"]) == \
        ("policy", 0.25, "reservation res-1 reconciled at 0.25", None, None)
    assert json.loads(spent["detail_json"])["reservation_id"] == "res-1"
    assert json.loads(spent["detail_json"])["budget"]["spent"] == pytest.approx(0.25)
    duplicate = next(r for r in reconciles if r["decision"] == "duplicate")
    assert (duplicate["cost"], duplicate["reason"]) == (0.0, "reservation res-1 was already reconciled")
    # Built by the one audit builder; the producer filled the envelope once.
    assert all(r["event_id"] and r["occurred_at"] > 0 for r in records)
    assert len({r["event_id"] for r in records}) == len(records)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("kw", "message"), [
    ({"tenant": ""}, "tenant is required"),
    ({"action": "launch"}, "unknown action 'launch'"),
    ({"amount": -5.0, "tool": "x"}, "amount must be a finite number >= 0"),
    ({"inputs_json": "{oops", "tool": "x"}, "inputs_json is not valid JSON"),
])
def test_invalid_arguments(service: tuple[Policy, Any], kw: dict[str, Any], message: str) -> None:
    p, _rt = service
    with pytest.raises(grpc.RpcError) as err:
        p.evaluate(**kw)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()


@pytest.mark.timeout(60)
def test_reconcile_arguments(service: tuple[Policy, Any]) -> None:
    p, _rt = service
    for req, message in [(dict(reservation_id="", actual_cost=1.0), "reservation_id is required"),
                         (dict(reservation_id="x", actual_cost=-1.0), "actual_cost must be")]:
        with pytest.raises(grpc.RpcError) as err:
            p.stub.ReconcileBudget(policy_pb2.ReconcileRequest(tenant=p.tenant, **req), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in err.value.details()


@pytest.mark.timeout(90)
def test_graceful_stop_loses_no_audit_record(service: tuple[Policy, Any]) -> None:
    p, rt = service
    for i in range(200):
        p.evaluate(tool="support.reply", run_id=f"r{i}", step_id="s")
    rt.shutdown()  # straight after the last answer: queued records must still reach the broker
    assert len(audit_records(p.env, p.prefix, p.tenant, 200)) == 200


@pytest.mark.timeout(60)
def test_bad_policy_file_stops_the_process(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("id: bad\nversion: 1\nrules:\n  - id: r\n    effect: perhaps\n")
    env = {"PATH": "/usr/bin:/bin", "AIOS_POLICY_DIR": str(tmp_path), "AIOS_POLICY_METRICS_PORT": "0",
           "AIOS_KAFKA_BOOTSTRAP": "127.0.0.1:1", "AIOS_REDIS_URL": "redis://127.0.0.1:1/0"}
    proc = subprocess.run([sys.executable, "-m", "services.policy"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=50)
    assert proc.returncode == 1
    assert f"{tmp_path / 'bad.yaml'}: rules[0].effect: expected one of" in proc.stderr


@pytest.mark.timeout(90)
def test_a_cost_above_the_estimate_is_charged_and_stops_the_next_step(service: tuple[Policy, Any]) -> None:
    """Old code: a step without an estimate reserved nothing and was allowed on an exhausted budget."""
    p, _rt = service  # limit 1.0
    assert p.evaluate(tool="llm.reply", cost_estimate=0.1, run_id="r", step_id="a").effect == "allow"
    assert p.reconcile("r:a", 0.95).spent == pytest.approx(0.95)   # it cost far more than estimated
    assert p.evaluate(tool="llm.reply", cost_estimate=0.1, run_id="r", step_id="b").effect == "deny"
    assert p.evaluate(tool="llm.reply", run_id="r", step_id="c").effect == "allow"  # 0.05 is left
    assert p.reconcile("r:c", 0.05).remaining == 0.0              # an unestimated step is metered too
    d = p.evaluate(tool="llm.reply", run_id="r", step_id="d")
    assert (d.effect, d.policy_id) == ("deny", "test@v7:budget")
    assert "a step without an estimate is still charged" in d.reasons[-1]
    # Starting a workflow costs nothing by itself: only its steps are stopped.
    assert p.evaluate(action="start_workflow", workflow="w", run_id="r2").effect == "allow"


@pytest.mark.timeout(120)
def test_200_concurrent_steps_never_spend_more_than_a_budget_that_fits_50(service: tuple[Policy, Any]) -> None:
    """200 threads each evaluate a step estimated at 0.02 against a limit of 1.0, and the allowed ones
    settle at their actual cost while a reader polls the budget: neither spent nor spent + reserved
    ever passes the limit, and exactly 50 steps run."""
    p, _rt = service
    seen: list[tuple[float, float]] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            b = p.budget()
            seen.append((b.spent, b.reserved))

    def step(i: int) -> str:
        d = p.evaluate(tool="llm.reply", cost_estimate=0.02, run_id=f"c{i}", step_id="s")
        if d.effect == "allow":
            b = p.reconcile(d.reservation_id, 0.02)  # the state right after its own atomic settle
            seen.append((b.spent, b.reserved))
        return d.effect

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(max_workers=200) as pool:
            effects = list(pool.map(step, range(200)))
    finally:
        stop.set()
        watcher.join()
    budget = p.budget()
    peak_spent = max(s for s, _r in seen)
    peak_committed = max(s + r for s, r in seen)
    print(f"\n200 concurrent steps, limit 1.0, 0.02 each: {effects.count('allow')} allowed, spent {budget.spent:.6f}, "
          f"reserved {budget.reserved:.6f}; over {len(seen)} reads the peak spent was {peak_spent:.6f} and the peak "
          f"spent + reserved {peak_committed:.6f}")
    assert effects.count("allow") == 50 and effects.count("deny") == 150
    assert (budget.spent, budget.reserved) == pytest.approx((1.0, 0.0))
    assert peak_spent <= 1.0 + 1e-9 and peak_committed <= 1.0 + 1e-9


@pytest.fixture
def short_holds(mesh_env: dict[str, str], prefix: str, tmp_path: Path,
                monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Policy, Any]]:
    """The service with holds that expire after 1 s, and a budget only for its test tenant."""
    monkeypatch.setenv("AIOS_POLICY_RESERVATION_TTL_S", "1")
    tenant = f"t{uuid.uuid4().hex[:10]}"
    for p, rt in _serve(mesh_env, prefix, tmp_path, monkeypatch, POLICY.replace('"*": {limit', f'"{tenant}": {{limit')):
        p.tenant = tenant
        yield p, rt


def _batch(p: Policy, *items: tuple[str, str, float]) -> Any:
    return p.stub.ReconcileBudgetBatch(policy_pb2.ReconcileBatchRequest(requests=[
        policy_pb2.ReconcileRequest(tenant=tenant, reservation_id=rid, actual_cost=cost, run_id="r", step_id=rid)
        for tenant, rid, cost in items]), timeout=10)


@pytest.mark.timeout(90)
def test_an_approved_step_whose_hold_expired_is_held_again_or_denied(short_holds: tuple[Policy, Any]) -> None:
    """Old code: the approval dispatched with nothing held (the expired hold's `res` hash answered
    "duplicate, ok"), so spend could pass the limit by that step."""
    p, _rt = short_holds
    gate = dict(tool="bank.block_card", cost_estimate=0.6, run_id="r1", step_id="block")
    assert p.evaluate(**gate).effect == "require_approval" and p.budget().reserved == pytest.approx(0.6)
    time.sleep(1.2)  # the gate stays open past the hold's TTL (1 s here, 1 h by default)
    assert p.evaluate(tool="llm.reply", cost_estimate=0.5, run_id="r2", step_id="a").effect == "allow"
    d = p.evaluate(recheck_budget=True, **gate)                   # a person approves now
    assert (d.effect, d.policy_id) == ("deny", "test@v7:budget") and "budget exhausted" in d.reasons[-1]
    p.reconcile("r2:a", 0.0)
    d = p.evaluate(recheck_budget=True, **gate)
    assert d.effect == "allow" and d.reservation_id == "r1:block"  # the rules are not asked again
    assert p.budget().reserved == pytest.approx(0.6)
    assert p.evaluate(recheck_budget=True, **gate).effect == "allow"  # asked again: held once
    assert p.budget().reserved == pytest.approx(0.6)


@pytest.mark.timeout(90)
def test_settling_for_a_tenant_without_a_budget_is_a_no_op(short_holds: tuple[Policy, Any]) -> None:
    """Old code answered NOT_FOUND, which the planner took for a permanent error of the step result:
    the record was dead-lettered and the run never ended."""
    p, _rt = short_holds
    budget = p.stub.ReconcileBudget(policy_pb2.ReconcileRequest(tenant="nobudget", reservation_id="r:a",
                                                                actual_cost=0.3), timeout=10)
    assert (budget.tenant, budget.spent, budget.reserved) == ("nobudget", 0.0, 0.0)


@pytest.mark.timeout(90)
def test_a_batch_settles_each_item_on_its_own(service: tuple[Policy, Any]) -> None:
    p, _rt = service
    assert p.evaluate(tool="llm.reply", cost_estimate=0.2, run_id="r", step_id="a").effect == "allow"
    out = _batch(p, (p.tenant, "r:a", 0.25), (p.tenant, "r:b", float("nan")), (p.tenant, "", 0.1),
                 (p.tenant, "r:c", 0.05), (p.tenant, "r:a", 0.25))
    assert [r.error != "" for r in out.results] == [False, True, True, False, False]
    assert "actual_cost must be a finite number" in out.results[1].error
    assert "reservation_id is required" in out.results[2].error
    assert out.results[3].budget.spent == pytest.approx(0.3)
    assert (p.budget().spent, p.budget().reserved) == pytest.approx((0.3, 0.0))  # r:a charged once
