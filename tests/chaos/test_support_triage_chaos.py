"""Chaos: 300 held-out BANKING77 support messages (never seen by the classifier)
as helpdesk events through the whole mesh, routed by the MiniLM classifier on
Ray Serve, while planner, executor, policy, memory, observability, Redis and
(once) the inference cluster are kill -9'd at random moments and restarted.

Every message must become exactly one run, every run must end, no run may fail
for an infrastructure reason (a crash, a restart, a backlog), each card block,
case and message must happen once per key at the sandbox bank API, and every
dead letter left behind must be one that a replay finishes.

Inference is crashed once, not once per round: a restart of the Ray cluster
with its Serve replicas (its whole process tree, see ``tools.chaos.crash``)
takes ~13 s on an idle 2-core machine (ray start ~4 s, the MiniLM replicas
~9 s) and 19-45 s under this load, against 1-15 s for a service and under 1 s
for Redis. One crash exercises the path (classification and recall must wait
for it) and keeps a passing run at about three minutes."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from aiosmesh.v1 import workflow_pb2
from infra.stack import Ports, Stack
from services.common.kafka import MeshProducer
from tests.chaos.checks import Mesh, guarantee_problems, run_under_chaos
from tools import chaos, triage

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(900)]
N_MESSAGES = 300
TENANT = "bank"
TARGETS = (*chaos.TARGETS, "inference")
# The workflows' steps with an effect at the bank API, and the effect the sandbox counts.
EFFECTS = {("support-card-block", "block_card"): "card.block", ("support-card-block", "notify"): "message.send",
           ("support-dispute", "open_case"): "case.open", ("support-dispute", "acknowledge"): "message.send",
           ("support-reply", "send"): "message.send"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Broker, Redis, Ray Serve inference, sandbox and the five services."""
    st = Stack(Ports.fresh(), run_dir=Path(tmp_path_factory.mktemp("chaos-triage")), topic_prefix="chaostri.",
               tenant=TENANT)
    try:
        st.up()
        yield st
    finally:
        st.down()
        assert not [p for p in st.procs.values() if p.alive()]


def publish_paced(producer: MeshProducer, messages: list[triage.Message], per_second: float,
                  chunk: int = 10) -> dict[str, triage.Message]:
    """The helpdesk's events at ``per_second``, in small batches, so crashes land on work in flight."""
    sent: dict[str, triage.Message] = {}
    for i in range(0, len(messages), chunk):
        if i:
            time.sleep(chunk / per_second)
        sent.update(triage.publish(producer, messages[i:i + chunk], TENANT))
    return sent


def expected_effects(runs: list[workflow_pb2.Run]) -> dict[str, set[str]]:
    """Effect kind -> the idempotency keys (``<run>:<step>``) of the steps that succeeded."""
    keys: dict[str, set[str]] = {kind: set() for kind in EFFECTS.values()}
    for run in runs:
        for step in run.steps:
            kind = EFFECTS.get((run.workflow, step.step_id))
            if kind and step.status == "succeeded":
                keys[kind].add(step.idempotency_key)
    return keys


def test_every_message_becomes_one_run_that_ends_without_infrastructure_failures(stack: Stack) -> None:
    mesh = Mesh.of(stack)
    messages = triage.load_holdout(N_MESSAGES, seed=13)
    approver = chaos.Approver(mesh.stub, actor="fraud-ops@chaos", reason="caller verified by phone")
    # Two rounds (inference in the first only) within the ~120 s of traffic.
    monkey = chaos.ChaosMonkey(stack, targets=TARGETS, max_kills=13, max_seconds=115, interval_s=(0.5, 2.0),
                               down_s=(0.2, 1.0), seed=11, max_per_target={"inference": 1})
    done = run_under_chaos(stack, mesh, monkey, approver, group=stack.topic_prefix + "approver",
                           publish=lambda: publish_paced(mesh.producer, messages, per_second=2.5),
                           poll=lambda ids: chaos.runs_by_event(mesh.stub, TENANT, ids),
                           expected=N_MESSAGES, timeout_s=420)
    sent, settled, runs = done.sent, done.settled, done.runs
    by_event, dead = settled.by_event, settled.dead
    report = chaos.effect_report(mesh.env["AIOS_SANDBOX_URL"])
    outcomes = {f"{wf}/{status}": n for (wf, status), n in sorted(Counter((r.workflow, r.status) for r in runs).items())}
    correct = sum(json.loads(r.input_json).get("intent") == sent[e].label for e, rs in by_event.items() for r in rs)
    print("\n" + chaos.summary_line("support-triage", runs=runs, elapsed_s=done.elapsed_s, monkey=monkey,
                                    outcomes=outcomes, effects=report["counts"], dead=dead,
                                    replayed=sum(o.action == "replayed" for o in settled.replayed),
                                    extra=f"intent accuracy {correct}/{len(runs)}; approvals {approver.approved}; "))
    print(f"dead letters at the end:\n{chaos.describe_dead_letters(dead)}")

    problems = guarantee_problems(monkey, TARGETS, settled, approver, set(sent))
    infra = chaos.infrastructure_failures(runs)
    if infra:
        problems.append(f"{len(infra)} runs failed for an infrastructure reason:\n" + "\n".join(
            f"  {run_id}: {why}" for run_id, why in infra.items()))
    # Every fraud-ops request is approved and no input is bad: any other run that did not complete is a finding.
    other = {r.run_id: f"{r.workflow} {r.status}: {chaos.failure_reasons(r)}" for r in runs
             if r.status != "completed" and r.run_id not in infra}
    if other:
        problems.append(f"{len(other)} runs did not complete:\n" + "\n".join(f"  {k}: {v}" for k, v in other.items()))
    if any(report["duplicates"].values()):
        problems.append(f"effects that happened more than once per key: {report['duplicates']}")
    for kind, keys in expected_effects(runs).items():
        found = set(report["by_key"].get(kind, {}))
        if found != keys:
            problems.append(f"{kind}: effects at the bank API differ from the runs' succeeded steps: "
                            f"{len(found - keys)} without a step, {len(keys - found)} steps without an effect")
    assert not problems, "\n\n".join(problems)
