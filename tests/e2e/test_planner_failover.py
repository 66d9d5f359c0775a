"""Planner failover under load, with a hot-standby planner (docs/DECISIONS.md, "hot standby").

Order-recovery events arrive at 10/s. The planner that is the planner group's member is killed
with kill -9 and restarted at once (it comes back as the standby); once it stands by, the other
planner is killed the same way; then the member is stalled (SIGSTOP) past its lease and its
session, so the standby takes over while it is still alive, and it must exit when it wakes rather
than leave the group. Every event must end in exactly one completed run and every effect must
happen once per key. Progress is read from Redis (the times the planner wrote into run state),
never through a killed process; recovery times are printed, not asserted.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from infra.stack import Stack, wait_serving
from services.common.catalog import Catalog
from services.common.codec import AvroCodec
from services.common.kafka import MeshProducer
from services.common.runtime import StandbyLease
from services.planner.domain.state import RunState
from tests.conftest import services_up, wait_for
from tools import chaos
from tools.bench import mesh_bench

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(480)]
N_ORDERS = 350  # 35 s of load at 10/s: the kills and the stall land while events arrive
TENANT = "shop"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with services_up(Path(tmp_path_factory.mktemp("failover")), topic_prefix="failover.", tenant=TENANT,
                     planner_standbys=1) as st:
        yield st


def test_standby_lease_has_one_holder_and_hands_over_on_release_and_on_lapse(stack: Stack) -> None:
    client = redis.Redis.from_url(stack.env()["AIOS_REDIS_URL"], decode_responses=True, socket_timeout=5)
    first = StandbyLease(client, "lease-test", 300, name="first")
    wait_for(first.active, timeout_s=5, message="the first replica takes the free lease")
    second = StandbyLease(client, "lease-test", 300, name="second")
    try:
        assert first.active() and not second.active()
        time.sleep(0.9)  # three lease periods: renewals keep it with the first
        assert first.active() and not second.active()
        first.close()  # a graceful stop hands over within a renewal period
        wait_for(second.active, timeout_s=5, message="the second replica takes the released lease")
        assert not first.active()
        third = StandbyLease(client, "lease-test", 300, name="third")
        assert not third.active()
        second._stop.set()  # a crash: renewals stop and nothing is released
        second._thread.join(2)
        wait_for(third.active, timeout_s=5, message="the third replica takes the lapsed lease")
        third.close()
    finally:
        first.close()
        client.close()


def test_kill_9_and_a_stall_of_the_planner_under_load_lose_no_run_and_repeat_no_effect(stack: Stack) -> None:
    env = stack.env()
    orders = [o for o in chaos.make_orders(N_ORDERS * 3, seed=23, bad_share=0.0)
              if o.refund_cents <= 10000][:N_ORDERS]  # below the approval threshold: no human in the loop
    chaos.seed_sandbox(env["AIOS_SANDBOX_URL"], orders)
    catalog = Catalog(stack.topic_prefix)
    producer = MeshProducer(env["AIOS_KAFKA_BOOTSTRAP"], catalog, AvroCodec(catalog.schemas))
    sent: dict[str, chaos.Order] = {}
    publisher = threading.Thread(target=lambda: sent.update(chaos.publish_orders(producer, orders, TENANT, 10)),
                                 daemon=True)
    publisher.start()
    kills: list[tuple[str, float]] = []
    time.sleep(4)
    for how in ("kill -9", "kill -9", "stall"):
        # What a supervisor does: a planner that exited by itself (it found its lease taken after a
        # stall of its own) is started again, so each disruption has a standby to go to.
        for name in ("planner", *stack.replicas()):
            if not stack.procs[name].alive():
                print(f"\nplanner failover: {name} had exited by itself; restarting it")
                stack.procs.pop(name)
                wait_serving(stack.start_service(name, wait=False), timeout_s=90)
        member = mesh_bench.planner_member(stack)
        proc = stack.procs[member]
        killed_ms = time.time() * 1000
        if how == "stall":  # stopped past the lease and the session, then woken up
            os.kill(proc.pid, signal.SIGSTOP)
            time.sleep(2)
            os.kill(proc.pid, signal.SIGCONT)
            wait_for(lambda p=proc: not p.alive(), timeout_s=30, message=f"{member} exits when it wakes")
            stack.procs.pop(member)
        else:
            stack.kill9(member)
        restarted = stack.start_service(member, wait=False)  # comes back as the standby
        kills.append((f"{how} of {member}", killed_ms))
        wait_serving(restarted, timeout_s=90)  # standing by: the next one has somewhere to go
        time.sleep(1)
    publisher.join(120)
    assert len(sent) == len(orders), "the publisher did not finish"

    def all_final() -> dict[str, RunState | None]:
        states = mesh_bench.run_states(stack, TENANT, list(sent))
        return states if all(r is not None and r.status in chaos.FINAL for r in states.values()) else {}

    states = wait_for(all_final, timeout_s=240, interval_s=1, message=f"a final run for each of {len(orders)} events")
    runs = [r for r in states.values() if r is not None]
    partition_of = mesh_bench.key_partitions(stack, "step_results")
    report = chaos.effect_report(env["AIOS_SANDBOX_URL"])
    for what, killed_ms in kills:
        moved = mesh_bench.moved_after(runs, killed_ms, partition_of)
        first = min((r.finished_at for r in runs if r.status == "completed" and r.finished_at > killed_ms),
                    default=None)
        print(f"\nplanner failover: {what}: runs of every partition moved again after "
              f"{moved if moved is None else round(moved, 2)} s, first run completed after "
              f"{first if first is None else round((first - killed_ms) / 1000, 2)} s")
    print(f"planner failover: {len(runs)} runs, effects {report['counts']}")
    assert kills[0][0] != kills[1][0], "the second kill must hit the standby that took over"
    assert {r.status for r in runs} == {"completed"}, [(r.run_id, r.status, r.error) for r in runs
                                                       if r.status != "completed"][:5]
    assert report["duplicates"] == {k: {} for k in report["duplicates"]}
    assert report["refund_keys"] == len(orders) and report["notification_keys"] == len(orders)
