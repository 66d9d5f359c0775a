"""Chaos: 300 order-recovery runs while planner, executor, policy and memory
are kill -9'd at random moments and restarted. Every run must reach a final
state, and each refund and each notification must happen exactly once per key,
as counted by the sandbox commerce API."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from aiosmesh.v1 import workflow_pb2_grpc
from infra.stack import Ports, Stack
from services.common.catalog import Catalog
from services.common.codec import AvroCodec
from services.common.grpc_server import channel
from services.common.kafka import ConsumerLoop, MeshProducer
from tests.conftest import wait_for
from tools import chaos

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(600)]
N_RUNS = 300


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Broker, Redis, sandbox and the five services; no inference (order recovery needs none)."""
    st = Stack(Ports.fresh(), run_dir=Path(tmp_path_factory.mktemp("chaos")), topic_prefix="chaos.",
               tenant="shop")
    try:
        st.up(inference=False)
        yield st
    finally:
        st.down()
        assert not [p for p in st.procs.values() if p.alive()]


def test_every_run_finishes_and_effects_happen_once_per_key_under_kill_9(stack: Stack) -> None:
    env = stack.env()
    catalog = Catalog(stack.topic_prefix)
    codec = AvroCodec(catalog.schemas)
    producer = MeshProducer(env["AIOS_KAFKA_BOOTSTRAP"], catalog, codec)
    stub = workflow_pb2_grpc.WorkflowServiceStub(channel(env["AIOS_PLANNER_ADDR"]))
    orders = chaos.make_orders(N_RUNS)
    chaos.seed_sandbox(env["AIOS_SANDBOX_URL"], orders)
    # Transient faults on top of the crashes: 10% of refunds and notifications answer 503 first.
    chaos.SandboxClient(env["AIOS_SANDBOX_URL"]).set_faults(fail_rate=0.1, fail_status=503,
                                                            paths=["/v1/refunds", "/v1/notifications"], seed=1)
    approver = chaos.FinanceApprover(stub)
    approvals = ConsumerLoop(service="chaos-approver", group="chaos.approver", roles=["approvals"],
                             handler=approver, bootstrap=env["AIOS_KAFKA_BOOTSTRAP"], catalog=catalog,
                             codec=codec, producer=producer).start()
    monkey = chaos.ChaosMonkey(stack, max_kills=10, max_seconds=90, interval_s=(1.0, 3.0), down_s=(0.2, 1.0))
    started = time.monotonic()
    try:
        monkey.start()
        sent = chaos.publish_orders(producer, orders, "shop", per_second=8)  # ~40 s of traffic under fire
        ids = set(sent)

        def all_final() -> list:  # type: ignore[type-arg]
            if monkey.error is not None:
                raise AssertionError(f"the chaos monkey failed to restart a service: {monkey.error!r}")
            try:
                runs = chaos.final_runs(stub, "shop", ids, "order-recovery")
            except Exception:
                return []  # planner restarting
            return runs if len(runs) == N_RUNS and all(r.status in chaos.FINAL for r in runs) else []

        runs = wait_for(all_final, timeout_s=420, interval_s=2, message=f"all {N_RUNS} runs final")
    finally:
        monkey.stop()
        approvals.stop()
    elapsed = time.monotonic() - started
    report = chaos.effect_report(env["AIOS_SANDBOX_URL"])
    statuses = Counter(r.status for r in runs)
    refunded = [r for r in runs if any(s.step_id == "refund" and s.status == "succeeded" for s in r.steps)]
    print(f"\nchaos: {N_RUNS} runs in {elapsed:.0f}s, kills {dict(monkey.kills)}, "
          f"restarts avg {sum(monkey.restart_s) / max(1, len(monkey.restart_s)):.1f}s; outcomes {dict(statuses)}; "
          f"approvals {approver.approved}; effects {report['counts']}")
    assert set(monkey.kills) == {"planner", "executor", "policy", "memory"}, monkey.kills
    assert set(statuses) <= {"completed", "failed"}, statuses
    bad = {o.order_id for o in orders if o.refund_cents > o.amount_cents}
    failed = {json.loads(r.input_json)["order_id"] for r in runs if r.status == "failed"}
    assert failed == bad, "only the orders whose refund exceeds the order amount may fail (and compensate)"
    assert report["duplicates"] == {k: {} for k in report["duplicates"]}, report["duplicates"]
    assert report["refund_keys"] == len(refunded) == N_RUNS - len(bad)
    assert report["notification_keys"] == N_RUNS + len(bad)  # each bad order also gets its correction notice
