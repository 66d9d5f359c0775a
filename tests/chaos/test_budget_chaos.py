"""Chaos for budgets: 120 runs of a workflow of costed steps against a budget that fits about
half of them, while the policy service and the planner are kill -9'd at random moments and
restarted. A tenth of the runs fail for good in a step that reserved (the leak the issue
names); that step retries after a transient failure first; one step costs three times its
estimate and one has no estimate but costs something (the ``charge`` tool reports a cost).

After recovery the budget must equal what ran: nothing stays reserved once every run is final,
and spent is the sum of the actual costs of the steps that succeeded, each once (a step charged
twice, a lost settlement, an unmetered step or a hold that leaked would each break the
equality). Tools that report no cost are charged their estimate (``adapters/runner.py``), so
what each succeeded step cost is known from the workflow. Steps above their estimate and steps
without one may take the spend past the limit by what is in flight when it runs out: the
overshoot is printed, not asserted (the 200-step concurrency test in
tests/integration/test_policy_service.py asserts none where actual costs match estimates)."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from infra.stack import Stack
from services.common.kafka import new_event_id, now_ms
from tests.chaos.checks import Mesh, dead_letter_problems, settle_and_replay
from tests.conftest import services_up
from tools import chaos

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(900)]
N_RUNS = 120
TENANT = "spend"
LIMIT = 4.0  # a good run costs 0.085: about 47 of the 108 good runs fit
TARGETS = ("policy", "planner")
WORKFLOW = """
name: metered
version: 1
description: costed steps for the budget chaos test
steps:
  - id: a
    tool: noop
    cost_estimate: 0.01
  - id: b
    tool: fail
    depends_on: [a]
    inputs: {transient_attempts: 1, permanent: "${input.bad}"}
    retry: {max_attempts: 3, initial_interval_ms: 50, max_interval_ms: 200}
    cost_estimate: 0.02
  - id: c
    tool: charge
    depends_on: [a]
    inputs: {cost: 0.03}
    cost_estimate: 0.01
  - id: d
    tool: noop
    depends_on: [b, c]
    cost_estimate: 0.01
  - id: e
    tool: charge
    depends_on: [d]
    inputs: {cost: 0.015}
"""
POLICY = f"""
id: chaos-budget
version: 1
budgets:
  "{TENANT}": {{limit: {LIMIT}, window: total}}
"""
COSTS = {"a": 0.01, "b": 0.02, "c": 0.03, "d": 0.01, "e": 0.015}  # what each step costs when it succeeds


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Broker, Redis, sandbox and the five services, with this test's workflow and budget."""
    with services_up(Path(tmp_path_factory.mktemp("chaos-budget")), topic_prefix="chaosbud.", tenant=TENANT,
                     workflows={"metered.yaml": WORKFLOW}, policies={"budget.yaml": POLICY}) as st:
        yield st


def publish(mesh: Mesh, per_second: float) -> dict[str, bool]:
    """One event per run naming the workflow (no classification); every tenth run's step b fails for good."""
    sent = {}
    for i in range(N_RUNS):
        if i:
            time.sleep(1 / per_second)
        event_id, bad = new_event_id(), i % 10 == 9
        sent[event_id] = bad
        mesh.producer.send("ingress", f"job-{i}", {
            "event_id": event_id, "tenant": TENANT, "occurred_at": now_ms(), "source": "meter",
            "type": "usage.burst", "subject": f"job-{i}", "data_json": json.dumps({"bad": bad}),
            "workflow": "metered"})
        if i % 10 == 0:
            mesh.producer.flush()
    mesh.producer.flush()
    return sent


def test_after_kill_9_of_policy_and_planner_the_budget_equals_what_ran(stack: Stack) -> None:
    mesh = Mesh.of(stack)
    monkey = chaos.ChaosMonkey(stack, targets=TARGETS, max_kills=6, max_seconds=40, interval_s=(2.0, 5.0),
                               down_s=(0.2, 1.0))
    started = time.monotonic()
    try:
        monkey.start()
        sent = publish(mesh, per_second=4.0)
        settled = settle_and_replay(stack, monkey, lambda: chaos.runs_by_event(mesh.stub, TENANT, set(sent),
                                                                                 "metered"),
                                    N_RUNS, timeout_s=420)
    finally:
        monkey.stop()
    runs = [r for rs in settled.by_event.values() for r in rs]
    client = redis.Redis.from_url(mesh.env["AIOS_REDIS_URL"], decode_responses=True)
    try:
        spent_micros, reserved_micros = (int(v or 0) for v in client.mget(
            f"aios:{{{TENANT}}}:budget:total:spent", f"aios:{{{TENANT}}}:budget:total:reserved"))
        open_holds = client.zcard(f"aios:{{{TENANT}}}:budget:total:open")
    finally:
        client.close()
    spent, reserved = spent_micros / 1e6, reserved_micros / 1e6
    # What ran: every step that succeeded, once, at what it costs.
    ran = [s.step_id for r in runs for s in r.steps if s.status == "succeeded"]
    ran_cost = round(sum(COSTS[step] for step in ran), 6)
    reported = round(sum(r.cost for r in runs), 6)
    statuses = Counter(r.status for r in runs)
    denied = sum(1 for r in runs if "budget exhausted" in (r.error or ""))
    print(f"\nbudget chaos: {len(runs)} runs {dict(statuses)} ({denied} stopped by the budget) in "
          f"{time.monotonic() - started:.0f}s; kills {dict(monkey.kills)}, exits {dict(monkey.exits)}; "
          f"spent {spent:.6f} of {LIMIT} (overshoot {max(0.0, spent - LIMIT):.6f}), reserved {reserved:.6f} ({open_holds} open holds); succeeded steps "
          f"cost {ran_cost:.6f}, runs report {reported:.6f}; dead letters {len(settled.dead)}")

    problems = dead_letter_problems(settled)
    if monkey.error is not None:
        problems.append(f"the chaos monkey failed: {monkey.error!r}")
    if set(monkey.kills) != set(TARGETS):
        problems.append(f"not every target was crashed: {dict(monkey.kills)}")
    if len(settled.by_event) != N_RUNS or any(len(rs) != 1 for rs in settled.by_event.values()):
        problems.append(f"{len(settled.by_event)} events with runs, expected {N_RUNS} each with one run")
    if not set(statuses) <= chaos.FINAL:
        problems.append(f"runs not final: {dict(statuses)}")
    if reserved_micros or open_holds:
        problems.append(f"{reserved:.6f} still reserved in {open_holds} holds once every run is final")
    if spent_micros != round(ran_cost * 1e6):
        problems.append(f"spent {spent:.6f} but the steps that ran cost {ran_cost:.6f}")
    if reported != ran_cost:
        problems.append(f"the runs report {reported:.6f}, their succeeded steps cost {ran_cost:.6f}")
    bad = {e for e, is_bad in sent.items() if is_bad}
    if not all(rs[0].status == "failed" for e, rs in settled.by_event.items() if e in bad):
        problems.append("a run whose step b fails for good did not fail")
    if not denied:
        problems.append("no run was stopped by the budget: the limit did not bind")
    assert not problems, "\n".join(problems)
