"""Admission backpressure on the real embedded broker: a handler at capacity
defers records; the loop pauses and rewinds only their partition, acknowledges
the rest, keeps the other partitions flowing, and never dead-letters a record
for waiting, however long it waits."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import pytest

from services.common.errors import Backpressure
from services.common.kafka import Inbound
from tests.conftest import wait_for
from tests.integration.test_delivery_contract import Wiring

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


class Gate:
    """Admits records of partition 0 only once ``open`` is set; partition 1 always."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.handled: list[tuple[int, str]] = []
        self.deferrals = 0

    def __call__(self, records: Sequence[Inbound]) -> None:
        deferred = []
        for rec in records:
            if rec.partition == 0 and not self.open.is_set():
                deferred.append(rec)
            elif not [d for d in deferred if d.partition == rec.partition]:
                self.handled.append((rec.partition, rec.key))
        if deferred:
            self.deferrals += 1
            raise Backpressure("full", [(r.topic, r.partition, r.offset) for r in deferred], retry_after_s=0.05)


def test_a_deferred_partition_waits_without_blocking_others_or_being_dead_lettered(wiring: Wiring) -> None:
    gate = Gate()
    dead: list[Inbound] = []
    wiring.consume("bp", ["ingress"], gate, max_transient_s=0.5)  # waiting must never count as failing
    wiring.consume("bp-dlq", ["deadletters"], lambda recs: dead.extend(recs))
    for i in range(3):
        wiring.to_partition(0, f"p0-{i}")
        wiring.to_partition(1, f"p1-{i}")
    wait_for(lambda: [k for p, k in gate.handled if p == 1] == ["p1-0", "p1-1", "p1-2"], timeout_s=60,
             message="partition 1 flowing while partition 0 waits")
    wait_for(lambda: gate.deferrals >= 10, timeout_s=30, message="partition 0 deferred repeatedly")
    assert not [k for p, k in gate.handled if p == 0]
    wait_for(lambda: wiring.committed("bp", "ingress", 1) == 3, timeout_s=30, message="partition 1 committed")
    assert wiring.committed("bp", "ingress", 0) < 0  # nothing of the waiting partition acknowledged
    gate.open.set()
    wait_for(lambda: [k for p, k in gate.handled if p == 0] == ["p0-0", "p0-1", "p0-2"], timeout_s=60,
             message="partition 0 handled in order once there is room")
    wait_for(lambda: wiring.committed("bp", "ingress", 0) == 3, timeout_s=30, message="partition 0 committed")
    assert dead == []
