"""Settlements policy cannot apply never strand a run, on the real services: a step whose tool
reports a cost that is not a number (NaN) and a tenant with no budget at all both run to a final
state, and the budget is charged what it can count (the NaN step its estimate).

Old code: the executor published the NaN cost, ReconcileBudget refused it (INVALID_ARGUMENT), and so
did it the tenant without a budget (NOT_FOUND); the planner turned either into a permanent error of
the step result, which was dead-lettered, and the run stayed `running` for ever."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from infra.stack import Stack
from services.common.kafka import new_event_id, now_ms
from tests.chaos.checks import Mesh
from tests.conftest import services_up
from tools import chaos

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]
FUNDED, UNFUNDED = "funded", "unfunded"
WORKFLOW = """
name: metered
version: 1
description: one metered step whose tool reports the cost it is given
steps:
  - id: a
    tool: charge
    inputs: {cost: "${input.cost}"}
    cost_estimate: 0.02
"""
POLICY = f"""
id: settle
version: 1
budgets:
  "{FUNDED}": {{limit: 1.0, window: total}}
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with services_up(Path(tmp_path_factory.mktemp("budget-settle")), topic_prefix="settle.", tenant=FUNDED,
                     workflows={"metered.yaml": WORKFLOW}, policies={"budget.yaml": POLICY}) as st:
        yield st


def test_a_nan_cost_and_a_tenant_without_a_budget_both_reach_a_final_state(stack: Stack) -> None:
    mesh = Mesh.of(stack)
    sent: dict[str, tuple[str, str]] = {}  # event id -> (tenant, cost the tool reports)
    for n, (tenant, cost) in enumerate([(FUNDED, "nan"), (UNFUNDED, "0.5"), (FUNDED, "0.03")]):
        event_id = new_event_id()
        sent[event_id] = (tenant, cost)
        mesh.producer.send("ingress", f"job-{n}", {
            "event_id": event_id, "tenant": tenant, "occurred_at": now_ms(), "source": "meter", "type": "usage",
            "subject": f"job-{n}", "data_json": json.dumps({"cost": cost}), "workflow": "metered"})
    mesh.producer.flush()

    def runs() -> dict[str, str]:
        found = {}
        for tenant in (FUNDED, UNFUNDED):
            ids = {e for e, (t, _c) in sent.items() if t == tenant}
            found.update({e: rs[0].status for e, rs in chaos.runs_by_event(mesh.stub, tenant, ids, "metered").items()})
        return found

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (len(runs()) == 3 and set(runs().values()) <= chaos.FINAL):
        time.sleep(1)
    statuses = runs()
    assert {sent[e]: s for e, s in statuses.items()} == {(FUNDED, "nan"): "completed",
                                                         (UNFUNDED, "0.5"): "completed",
                                                         (FUNDED, "0.03"): "completed"}, statuses
    client = redis.Redis.from_url(mesh.env["AIOS_REDIS_URL"], decode_responses=True)
    try:
        spent, reserved = (int(v or 0) for v in client.mget(f"aios:{{{FUNDED}}}:budget:total:spent",
                                                             f"aios:{{{FUNDED}}}:budget:total:reserved"))
        unfunded_keys = client.keys(f"aios:{{{UNFUNDED}}}:budget:*")
    finally:
        client.close()
    assert (spent, reserved) == (50_000, 0)  # the NaN step charged its estimate 0.02, the other 0.03
    assert unfunded_keys == []
