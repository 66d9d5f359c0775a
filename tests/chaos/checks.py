"""The end of every chaos test: wait until the runs settle, read the dead-letter
topic, replay what a replay can finish (``aios dlq replay``'s code), wait again,
and check that nothing was left that a replay would not finish."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiosmesh.v1 import workflow_pb2
from infra.stack import Stack
from tools import chaos
from tools.aios import dlq

RunsByEvent = dict[str, list[workflow_pb2.Run]]


@dataclass
class Settled:
    by_event: RunsByEvent
    dead: list[Any]  # the dead-letter topic once the runs settled
    replayed: list[Any] = field(default_factory=list)  # the dlq tool's outcomes
    after_replay: list[Any] = field(default_factory=list)  # dead letters that appeared after the replay


def settle_and_replay(stack: Stack, monkey: chaos.ChaosMonkey, poll: Callable[[], RunsByEvent], expected: int, *,
                      timeout_s: float, replay_timeout_s: float = 180) -> Settled:
    """Runs settled under chaos; then the monkey stops, and any retryable dead letter is replayed
    and the runs waited for again."""
    by_event = chaos.wait_settled(poll, expected, monkey=monkey, timeout_s=timeout_s)
    monkey.stop()
    dead = chaos.dead_letters(stack)
    if not dead:
        return Settled(by_event, dead)
    outcomes = chaos.replay_dead_letters(stack, [e for e in dead if replayable(e)])
    by_event = chaos.wait_settled(poll, expected, monkey=None, timeout_s=replay_timeout_s)
    before = {e.member for e in dead}
    return Settled(by_event, dead, outcomes, [e for e in chaos.dead_letters(stack) if e.member not in before])


def replayable(entry: Any) -> bool:
    """A dead letter a replay can finish: decodable, parked for a transient cause, not a manual task."""
    return entry.record is not None and bool(entry.get("retryable")) and entry.source_topic not in dlq.MANUAL_SOURCES


def check_dead_letters(settled: Settled) -> None:
    """These workloads send no bad input, so every dead letter must be a retryable one that the
    replay re-published, and the replay must leave no new dead letter behind."""
    stuck = [e for e in settled.dead if not replayable(e)]
    assert not stuck, f"dead letters a replay cannot finish:\n{chaos.describe_dead_letters(stuck)}"
    not_sent = [o for o in settled.replayed if o.action != "replayed"]
    assert not not_sent, "dead letters not replayed: " + "; ".join(f"{o.entry.member}: {o.detail}" for o in not_sent)
    assert not settled.after_replay, ("the replay dead-lettered again:\n"
                                      f"{chaos.describe_dead_letters(settled.after_replay)}")
