"""The end of every chaos test: wait until the runs settle, read the dead-letter
topic, replay what a replay can finish (``aios dlq replay``'s code), wait again,
and check that nothing was left that a replay would not finish."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiosmesh.v1 import workflow_pb2, workflow_pb2_grpc
from infra.stack import Stack
from services.common.catalog import Catalog
from services.common.codec import AvroCodec
from services.common.grpc_server import channel
from services.common.kafka import ConsumerLoop, MeshProducer
from tools import chaos
from tools.aios import dlq

RunsByEvent = dict[str, list[workflow_pb2.Run]]


@dataclass
class Mesh:
    """What a chaos workload talks to: the stack's settings, a producer for upstream events and the
    planner's gRPC API."""
    env: dict[str, str]
    catalog: Catalog
    codec: AvroCodec
    producer: MeshProducer
    stub: workflow_pb2_grpc.WorkflowServiceStub

    @classmethod
    def of(cls, stack: Stack) -> Mesh:
        env = stack.env()
        catalog = Catalog(stack.topic_prefix)
        codec = AvroCodec(catalog.schemas)
        return cls(env, catalog, codec, MeshProducer(env["AIOS_KAFKA_BOOTSTRAP"], catalog, codec),
                   workflow_pb2_grpc.WorkflowServiceStub(channel(env["AIOS_PLANNER_ADDR"])))


@dataclass
class Settled:
    by_event: RunsByEvent
    dead: list[Any]  # the dead-letter topic once the runs settled
    replayed: list[Any] = field(default_factory=list)  # the dlq tool's outcomes
    after_replay: list[Any] = field(default_factory=list)  # dead letters that appeared after the replay


def settle_and_replay(stack: Stack, monkey: chaos.ChaosMonkey, poll: Callable[[], RunsByEvent], expected: int, *,
                      timeout_s: float, replay_timeout_s: float = 180) -> Settled:
    """Runs settled under chaos; then the monkey stops, every dead letter the dlq tool can replay
    (decodable, not a manual task) is replayed, and the runs are waited for again. Non-retryable
    ones are replayed too, so that the summary shows whether a replay would finish them;
    ``check_dead_letters`` still fails on them."""
    by_event = chaos.wait_settled(poll, expected, monkey=monkey, timeout_s=timeout_s)
    monkey.stop()
    dead = chaos.dead_letters(stack)
    if not dead:
        return Settled(by_event, dead)
    outcomes = chaos.replay_dead_letters(stack, [e for e in dead if e.record is not None
                                                 and e.source_topic not in dlq.MANUAL_SOURCES])
    by_event = chaos.wait_settled(poll, expected, monkey=None, timeout_s=replay_timeout_s)
    before = {e.member for e in dead}
    return Settled(by_event, dead, outcomes, [e for e in chaos.dead_letters(stack) if e.member not in before])


@dataclass
class ChaosRun:
    sent: dict[str, Any]  # event id -> what was published
    settled: Settled
    elapsed_s: float

    @property
    def runs(self) -> list[workflow_pb2.Run]:
        return [r for rs in self.settled.by_event.values() for r in rs]


def run_under_chaos(stack: Stack, mesh: Mesh, monkey: chaos.ChaosMonkey, approver: chaos.Approver, *, group: str,
                    publish: Callable[[], dict[str, Any]], poll: Callable[[set[str]], RunsByEvent], expected: int,
                    timeout_s: float) -> ChaosRun:
    """The shape of every chaos workload: an approver answers the human gates, the monkey starts
    crashing, the events are published, and the runs are waited for (``settle_and_replay``); the
    monkey and the approver are stopped whatever happens."""
    approvals = ConsumerLoop(service="chaos-approver", group=group, roles=["approvals"], handler=approver,
                             bootstrap=mesh.env["AIOS_KAFKA_BOOTSTRAP"], catalog=mesh.catalog, codec=mesh.codec,
                             producer=mesh.producer).start()
    started = time.monotonic()
    try:
        monkey.start()
        sent = publish()
        ids = set(sent)
        settled = settle_and_replay(stack, monkey, lambda: poll(ids), expected, timeout_s=timeout_s)
    finally:
        monkey.stop()
        approvals.stop()
    return ChaosRun(sent, settled, time.monotonic() - started)


def replayable(entry: Any) -> bool:
    """A dead letter these workloads may leave: decodable, parked for a transient cause (so a replay
    finishes it), not a manual task."""
    return entry.record is not None and bool(entry.get("retryable")) and entry.source_topic not in dlq.MANUAL_SOURCES


def dead_letter_problems(settled: Settled) -> list[str]:
    """These workloads send no bad input, so every dead letter must be a retryable one that the
    replay re-published, and the replay must leave no new dead letter behind."""
    problems = []
    stuck = [e for e in settled.dead if not replayable(e)]
    if stuck:
        problems.append("dead letters that are not retryable although the input was good, or that no replay "
                        f"can finish:\n{chaos.describe_dead_letters(stuck)}")
    not_sent = [o for o in settled.replayed if o.action != "replayed"]
    if not_sent:
        problems.append("dead letters not replayed: " + "; ".join(f"{o.entry.member}: {o.detail}" for o in not_sent))
    if settled.after_replay:
        problems.append(f"the replay dead-lettered again:\n{chaos.describe_dead_letters(settled.after_replay)}")
    return problems


def guarantee_problems(monkey: chaos.ChaosMonkey, targets: tuple[str, ...], settled: Settled,
                       approver: chaos.Approver, event_ids: set[str]) -> list[str]:
    """What every chaos workload must show: every target crashed and restarted, no dead letter a
    replay cannot finish, every approval answered, every event exactly one run, every run ended.
    A list, so that one run of a chaos test reports every broken guarantee at once."""
    problems = []
    if monkey.error is not None:
        problems.append(f"the chaos monkey failed: {monkey.error!r}")
    if set(monkey.kills) != set(targets):
        problems.append(f"not every target was crashed: {dict(monkey.kills)} of {targets}")
    problems += dead_letter_problems(settled)
    if approver.gave_up:
        problems.append(f"approvals never answered: {approver.gave_up}")
    missing = event_ids - set(settled.by_event)
    if missing:
        problems.append(f"{len(missing)} events became no run: {sorted(missing)[:10]}")
    doubled = {e: [r.run_id for r in rs] for e, rs in settled.by_event.items() if len(rs) > 1}
    if doubled:
        problems.append(f"events that became more than one run: {doubled}")
    unfinished = {r.run_id: r.status for rs in settled.by_event.values() for r in rs if r.status not in chaos.FINAL}
    if unfinished:
        problems.append(f"{len(unfinished)} runs never ended: {unfinished}")
    return problems
