"""aios_consumer_lag_records follows partition ownership, on the real embedded broker: when a second
consumer joins the group, the first one's series for the partitions it gave away disappear
(the autoscaler and the alerts sum this gauge per group; a stale series would count twice)."""

from __future__ import annotations

import json

import pytest

from services.common import metrics
from services.common.catalog import Catalog
from services.common.codec import AvroCodec
from services.common.kafka import ConsumerLoop, MeshProducer
from tests.conftest import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def _lag_partitions(service: str, topic: str) -> set[int]:
    return {int(s.labels["partition"]) for m in metrics.CONSUMER_LAG.collect() for s in m.samples
            if s.labels["service"] == service and s.labels["topic"] == topic}


def test_a_partition_that_moves_to_another_consumer_leaves_the_first_ones_lag(
        mesh_env: dict[str, str], prefix: str) -> None:
    catalog = Catalog(prefix)
    codec = AvroCodec(catalog.schemas)
    topic = catalog.topic("ingress")
    partitions = set(range(catalog.spec("ingress").partitions))
    producer = MeshProducer(mesh_env["AIOS_KAFKA_BOOTSTRAP"], catalog, codec)

    def send_to_every_partition() -> None:
        for i in range(40):  # enough keys to put records in every partition
            producer.send("ingress", f"subject-{i}", {"tenant": "t1", "source": "test", "type": "t",
                                                      "subject": str(i), "data_json": json.dumps({}),
                                                      "workflow": None})
        producer.flush()

    send_to_every_partition()
    # A service label per consumer (unique to this test) tells their series apart.
    first, second = f"{prefix}first", f"{prefix}second"
    loops: list[ConsumerLoop] = []

    def join(service: str) -> ConsumerLoop:
        loop = ConsumerLoop(service=service, group=prefix + "lag", roles=["ingress"], handler=lambda _r: None,
                            bootstrap=mesh_env["AIOS_KAFKA_BOOTSTRAP"], catalog=catalog, codec=codec,
                            producer=producer, lag_interval_s=0.1)
        loops.append(loop.start())
        return loop

    try:
        join(first)
        wait_for(lambda: _lag_partitions(first, topic) == partitions,
                 message="the only consumer reports lag for every partition")
        joined = join(second)
        wait_for(joined.assigned.is_set, message="the second consumer joins the group")
        # A consumer reports a partition once it has consumed from it since it was assigned.
        send_to_every_partition()
        wait_for(lambda: _lag_partitions(second, topic), message="the second consumer reports its partitions")
        # Both report only what they own now: together every partition, none twice.
        wait_for(lambda: not (_lag_partitions(first, topic) & _lag_partitions(second, topic))
                 and _lag_partitions(first, topic) | _lag_partitions(second, topic) == partitions,
                 message="the first consumer's series for the partitions it gave away are gone")
        assert _lag_partitions(first, topic) and len(_lag_partitions(first, topic)) < len(partitions)
    finally:
        for loop in loops:
            loop.stop()
        producer.close()
        for service in (first, second):
            for partition in partitions:
                metrics.clear_consumer_lag(service, topic, partition)
