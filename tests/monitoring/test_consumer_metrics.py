"""The consumer loop's admission queue, on the real embedded broker: records deferred for
capacity show as ``aios_admission_queue_records`` and a paused partition (reason
backpressure) until the handler admits them; transient retries are counted by class."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import pytest
from prometheus_client import REGISTRY

from services.common.errors import Backpressure, TransientError
from services.common.kafka import Inbound
from tests.conftest import wait_for
from tests.integration.test_delivery_contract import Wiring

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def sample(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


class Gate:
    """Defers every record until ``open`` is set."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.handled: list[str] = []

    def __call__(self, records: Sequence[Inbound]) -> None:
        if not self.open.is_set():
            raise Backpressure("full", [(r.topic, r.partition, r.offset) for r in records], retry_after_s=0.05)
        self.handled += [r.key for r in records]


def test_deferred_records_are_the_admission_queue(wiring: Wiring) -> None:
    gate = Gate()
    wiring.consume("adm", ["ingress"], gate, lag_interval_s=0.2)
    for i in range(3):
        wiring.to_partition(0, f"p0-{i}")
    wait_for(lambda: sample("aios_admission_queue_records", service="test") == 3, timeout_s=60,
             message="three records in the admission queue")
    assert sample("aios_consumer_paused_partitions", service="test", reason="backpressure") == 1
    gate.open.set()
    wait_for(lambda: len(gate.handled) == 3, timeout_s=60, message="records admitted")
    wait_for(lambda: sample("aios_admission_queue_records", service="test") == 0, timeout_s=30,
             message="the admission queue drained")
    assert sample("aios_consumer_paused_partitions", service="test", reason="backpressure") == 0


class Flaky(TransientError):
    """A transient error of its own class."""


def test_transient_retries_are_counted_by_class(wiring: Wiring) -> None:
    tries: list[str] = []

    def handler(records: Sequence[Inbound]) -> None:
        tries.extend(r.key for r in records)
        if len(tries) < 3:
            raise Flaky("not yet")

    topic = wiring.catalog.topic("ingress")
    wiring.consume("retry", ["ingress"], handler)
    wiring.to_partition(0, "r0")
    wait_for(lambda: len(tries) >= 3, timeout_s=60, message="the record retried until it succeeds")
    counted = [s for m in REGISTRY.collect() if m.name == "aios_transient_retries" for s in m.samples
               if s.name.endswith("_total") and s.labels["service"] == "test" and s.labels["error_type"] == "Flaky"
               and s.labels["topic"] == topic]
    assert counted and sum(s.value for s in counted) >= 2
