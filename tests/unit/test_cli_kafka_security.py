"""Every Kafka client the CLI builds (status, dlq list/show/replay) carries the deployment's
SASL/TLS settings, as the services' clients do. No broker: the clients are recorded, or refused
by librdkafka's own configuration check before they connect."""

from __future__ import annotations

from typing import Any

import confluent_kafka.admin
import pytest
from confluent_kafka import KafkaException

from services.common.settings import MeshSettings
from tools.aios import clients, dlq

pytestmark = pytest.mark.timeout(60)
SECURE = {"kafka_security_protocol": "SASL_PLAINTEXT", "kafka_sasl_mechanism": "SCRAM-SHA-256",
          "kafka_sasl_username": "cli", "kafka_sasl_password": "s3cret"}


@pytest.fixture
def settings() -> MeshSettings:
    return MeshSettings(kafka_bootstrap="127.0.0.1:9", **SECURE)


class _Recorder:
    """Stands in for a confluent-kafka client class; keeps the configurations it was built with."""

    def __init__(self) -> None:
        self.confs: list[dict[str, Any]] = []

    def __call__(self, conf: dict[str, Any]) -> _Recorder:
        self.confs.append(conf)
        return self

    def list_topics(self, *_args: Any, **_kwargs: Any) -> Any:
        return type("Meta", (), {"topics": {}})()


def _security(conf: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in conf.items() if k.startswith(("security.", "sasl.", "ssl."))}


def test_dlq_reader_and_topic_lookup_use_the_security_settings(settings: MeshSettings,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    consumer, admin = _Recorder(), _Recorder()
    monkeypatch.setattr(dlq, "Consumer", consumer)
    monkeypatch.setattr(confluent_kafka.admin, "AdminClient", admin)
    dlq._consumer(settings)
    dlq.existing_topics(settings)
    expected = settings.kafka_client_config()
    assert expected["sasl.password"] == "s3cret"
    assert [_security(c) for c in consumer.confs + admin.confs] == [expected, expected]


def test_dlq_replay_producer_uses_the_security_settings(settings: MeshSettings,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[dict[str, Any]] = []

    class Producer:
        def __init__(self, *_args: Any, **kwargs: Any) -> None:
            built.append(kwargs)

        def close(self) -> None:
            pass

    monkeypatch.setattr(dlq, "MeshProducer", Producer)
    monkeypatch.setattr(dlq, "existing_topics", lambda _settings: set())
    assert dlq.replay(settings, [], redis_client=None) == []
    assert built and built[0]["client_config"] == settings.kafka_client_config()


def test_status_checks_the_broker_with_the_security_settings(settings: MeshSettings,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Any] = []
    down = clients.Check("x", "", False, "")
    monkeypatch.setattr(clients, "grpc_health", lambda *_a, **_k: down)
    monkeypatch.setattr(clients, "redis_health", lambda *_a, **_k: down)
    monkeypatch.setattr(clients, "inference_health", lambda *_a, **_k: down)
    monkeypatch.setattr(clients, "broker_health", lambda *_a, **kwargs: seen.append(kwargs) or down)
    clients.all_checks(settings)
    assert seen == [{"client_config": settings.kafka_client_config()}]
    # ... and broker_health hands them to librdkafka, which checks them when the client is built.
    monkeypatch.undo()
    with pytest.raises(KafkaException, match="security.protocol"):
        clients.broker_health("127.0.0.1:9", "aios.", client_config={"security.protocol": "carrier-pigeon"})
