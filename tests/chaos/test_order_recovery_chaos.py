"""Chaos: 300 order-recovery runs while planner, executor, policy, memory,
observability and Redis are kill -9'd at random moments and restarted (Redis on
its port, from its append-only file). Every event must become exactly one run,
every run must reach a final state, each refund and each notification must
happen exactly once per key, as counted by the sandbox commerce API, and every
dead letter left behind must be one that a replay finishes."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.stack import Stack
from tests.chaos.checks import Mesh, guarantee_problems, run_under_chaos
from tests.conftest import services_up
from tools import chaos

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(600)]
N_RUNS = 300


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Broker, Redis, sandbox and the five services; no inference (order recovery needs none)."""
    with services_up(Path(tmp_path_factory.mktemp("chaos")), topic_prefix="chaos.", tenant="shop") as st:
        yield st


def test_every_run_finishes_and_effects_happen_once_per_key_under_kill_9(stack: Stack) -> None:
    mesh = Mesh.of(stack)
    orders = chaos.make_orders(N_RUNS)
    chaos.seed_sandbox(mesh.env["AIOS_SANDBOX_URL"], orders)
    # Transient faults on top of the crashes: 10% of refunds and notifications answer 503 first.
    chaos.SandboxClient(mesh.env["AIOS_SANDBOX_URL"]).set_faults(fail_rate=0.1, fail_status=503,
                                                                 paths=["/v1/refunds", "/v1/notifications"], seed=1)
    approver = chaos.Approver(mesh.stub, actor="finance@chaos", reason="delay refund checked")
    # Two rounds (each target crashed twice) within the ~120 s of traffic.
    monkey = chaos.ChaosMonkey(stack, targets=chaos.TARGETS, max_kills=12, max_seconds=110, interval_s=(0.5, 2.0),
                               down_s=(0.2, 1.0))
    done = run_under_chaos(stack, mesh, monkey, approver, group="chaos.approver",
                           publish=lambda: chaos.publish_orders(mesh.producer, orders, "shop", per_second=2.5),
                           poll=lambda ids: chaos.runs_by_event(mesh.stub, "shop", ids, "order-recovery"),
                           expected=N_RUNS, timeout_s=420)
    settled, runs, dead = done.settled, done.runs, done.settled.dead
    report = chaos.effect_report(mesh.env["AIOS_SANDBOX_URL"])
    statuses = Counter(r.status for r in runs)
    refunded = [r for r in runs if any(s.step_id == "refund" and s.status == "succeeded" for s in r.steps)]
    print("\n" + chaos.summary_line("order-recovery", runs=runs, elapsed_s=done.elapsed_s, monkey=monkey,
                                    outcomes=dict(statuses), effects=report["counts"], dead=dead,
                                    replayed=sum(o.action == "replayed" for o in settled.replayed),
                                    extra=f"approvals {approver.approved}; "))
    print(f"dead letters at the end:\n{chaos.describe_dead_letters(dead)}")

    problems = guarantee_problems(monkey, chaos.TARGETS, settled, approver, set(done.sent))
    if not set(statuses) <= {"completed", "failed"}:
        problems.append(f"runs that neither completed nor failed (and compensated): {dict(statuses)}")
    bad = {o.order_id for o in orders if o.refund_cents > o.amount_cents}
    failed = {json.loads(r.input_json)["order_id"]: chaos.failure_reasons(r) for r in runs if r.status == "failed"}
    if set(failed) != bad:
        problems.append("only the orders whose refund exceeds the order amount may fail (and compensate); other "
                        f"failures: { {o: why for o, why in failed.items() if o not in bad} }, bad orders that did "
                        f"not fail: {sorted(bad - set(failed))}")
    if any(report["duplicates"].values()):
        problems.append(f"effects that happened more than once per key: {report['duplicates']}")
    if not report["refund_keys"] == len(refunded) == N_RUNS - len(bad):
        problems.append(f"refunds: {report['refund_keys']} keys at the API, {len(refunded)} refund steps succeeded, "
                        f"{N_RUNS - len(bad)} expected")
    if report["notification_keys"] != N_RUNS + len(bad):  # each bad order also gets its correction notice
        problems.append(f"notifications: {report['notification_keys']} keys, {N_RUNS + len(bad)} expected")
    assert not problems, "\n\n".join(problems)
