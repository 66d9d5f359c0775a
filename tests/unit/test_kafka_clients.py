"""The Kafka clients take the deployment's SASL/TLS settings, and a consumer forgets the lag of a
partition it gave away. No broker: librdkafka checks its configuration when a client is built,
before it connects anywhere."""

from __future__ import annotations

import pytest
from confluent_kafka import KafkaException, TopicPartition

from services.common import metrics
from services.common.catalog import Catalog
from services.common.codec import AvroCodec
from services.common.kafka import ConsumerLoop, MeshProducer

pytestmark = pytest.mark.timeout(60)
NOWHERE = "127.0.0.1:9"  # discard port: nothing in these tests connects


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return Catalog("unit.")


def _loop(catalog: Catalog, producer: MeshProducer | None = None, **kwargs: object) -> ConsumerLoop:
    codec = AvroCodec(catalog.schemas)
    return ConsumerLoop(service="lagtest", group="unit.g", roles=["ingress"], handler=lambda _records: None,
                        bootstrap=NOWHERE, catalog=catalog, codec=codec,
                        producer=producer or MeshProducer(NOWHERE, catalog, codec), **kwargs)  # type: ignore[arg-type]


def test_the_producer_hands_client_config_to_librdkafka(catalog: Catalog) -> None:
    codec = AvroCodec(catalog.schemas)
    MeshProducer(NOWHERE, catalog, codec, client_config={"security.protocol": "plaintext"}).close()
    # A value librdkafka refuses proves the mapping reached its configuration.
    with pytest.raises(KafkaException, match="security.protocol"):
        MeshProducer(NOWHERE, catalog, codec, client_config={"security.protocol": "carrier-pigeon"})


def test_the_consumer_loop_hands_client_config_to_librdkafka(catalog: Catalog) -> None:
    _loop(catalog, client_config={"security.protocol": "plaintext"})._consumer.close()
    with pytest.raises(KafkaException, match="security.protocol"):
        _loop(catalog, client_config={"security.protocol": "carrier-pigeon"})


def _lag_partitions(service: str) -> set[tuple[str, str]]:
    return {(s.labels["topic"], s.labels["partition"]) for m in metrics.CONSUMER_LAG.collect() for s in m.samples
            if s.labels["service"] == service}


def test_revoking_partitions_removes_their_lag_series(catalog: Catalog) -> None:
    loop = _loop(catalog)
    topic = catalog.topic("ingress")
    for partition in range(4):
        metrics.CONSUMER_LAG.labels("lagtest", topic, str(partition)).set(10 + partition)
    try:
        loop._on_revoke(loop._consumer, [TopicPartition(topic, 1), TopicPartition(topic, 3)])
        assert _lag_partitions("lagtest") == {(topic, "0"), (topic, "2")}
        # Revoking a partition that never reported (or was already cleared) is not an error.
        loop._on_revoke(loop._consumer, [TopicPartition(topic, 1), TopicPartition("unit.other", 7)])
        assert _lag_partitions("lagtest") == {(topic, "0"), (topic, "2")}
    finally:
        for partition in range(4):
            metrics.clear_consumer_lag("lagtest", topic, partition)
        loop._consumer.close()
