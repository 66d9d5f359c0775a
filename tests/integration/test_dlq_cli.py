"""`aios dlq` against the real embedded broker and Redis: list, show, replay once."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import pytest
from confluent_kafka import Consumer, TopicPartition

from services.common.catalog import Catalog
from services.common.codec import AvroCodec
from services.common.kafka import MeshProducer
from services.common.settings import MeshSettings
from tools.aios import dlq
from tools.aios.cli import main

pytestmark = pytest.mark.integration


def _ingress(codec: AvroCodec) -> tuple[bytes, str]:
    event_id = uuid.uuid4().hex
    record = {"event_id": event_id, "tenant": "demo", "occurred_at": int(time.time() * 1000), "source": "helpdesk",
              "type": "support.message.received", "subject": "cust-1",
              "data_json": json.dumps({"text": "my card was stolen"}), "workflow": None}
    return codec.encode("aiosmesh.v1.IngressEvent", record), event_id


def _publish_dead_letters(settings: MeshSettings) -> tuple[bytes, dict[str, str]]:
    catalog = Catalog(settings.topic_prefix)
    codec = AvroCodec(catalog.schemas)
    original, event_id = _ingress(codec)
    headers = {"aios-schema": "aiosmesh.v1.IngressEvent", "event-id": event_id, "tenant": "demo"}
    producer = MeshProducer(settings.kafka_bootstrap, catalog, codec)
    base = {"tenant": "demo", "service": "planner", "group": settings.topic_prefix + "planner", "attempts": 8}
    producer.send("deadletters", "cust-1", {
        **base, "source_topic": catalog.topic("ingress"), "partition": 2, "offset": 7, "key": b"cust-1",
        "value": original, "headers_json": json.dumps(headers), "error_type": "TransientError",
        "error_message": "inference unavailable after 8 attempts", "retryable": True})
    producer.send("deadletters", "run-xyz", {
        **base, "source_topic": "compensation", "partition": -1, "offset": -1, "key": b"run-xyz",
        "value": json.dumps({"run_id": "run-xyz", "step_id": "block_card"}).encode(), "headers_json": "{}",
        "error_type": "CompensationFailed", "error_message": "unblock failed", "retryable": True, "attempts": 0})
    producer.flush(30)
    return original, headers


def _count(settings: MeshSettings, topic: str) -> int:
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": uuid.uuid4().hex})
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        return sum(consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in parts)
    finally:
        consumer.close()


def _replayed_records(settings: MeshSettings, topic: str, want: int, timeout_s: float = 30) -> list[Any]:
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": uuid.uuid4().hex,
                         "enable.auto.commit": False, "fetch.wait.max.ms": 10})
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, 0) for p in parts])
        found: list[Any] = []
        deadline = time.monotonic() + timeout_s
        while len(found) < want and time.monotonic() < deadline:
            found += [m for m in consumer.consume(100, timeout=0.2) if not m.error()]
        assert len(found) >= want, f"only {len(found)} of {want} records on {topic}"
        return found
    finally:
        consumer.close()


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    code = main(list(argv))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


@pytest.mark.timeout(120)
def test_dlq_list_show_and_replay_once(mesh_env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    settings = MeshSettings()
    ingress_topic = Catalog(settings.topic_prefix).topic("ingress")
    original, headers = _publish_dead_letters(settings)

    listing = _run(capsys, "dlq", "list")
    assert ingress_topic in listing and "TransientError" in listing and "inference unavailable" in listing
    assert "compensation" in listing and "CompensationFailed" in listing
    rows = json.loads(_run(capsys, "dlq", "list", "--json", "--topic", "ingress.events"))
    assert [(r["offset"], r["source_topic"], r["retryable"]) for r in rows] == [(0, ingress_topic, True)]

    detail = _run(capsys, "dlq", "show", "0")
    assert "value (aiosmesh.v1.IngressEvent)" in detail and "my card was stolen" in detail

    dry = _run(capsys, "dlq", "replay", "--all", "--dry-run")
    assert "would replay" in dry and "manual: see run run-xyz" in dry
    assert _count(settings, ingress_topic) == 0

    replayed = _run(capsys, "dlq", "replay", "--all")
    assert "replayed" in replayed and "manual: see run run-xyz" in replayed
    [msg] = _replayed_records(settings, ingress_topic, 1)
    assert msg.value() == original and msg.key() == b"cust-1"
    got_headers = {k: v.decode() for k, v in msg.headers()}
    assert got_headers[dlq.REPLAY_HEADER] == "0"
    assert all(got_headers[k] == v for k, v in headers.items())

    again = _run(capsys, "dlq", "replay", "--all")
    assert "already replayed" in again
    assert _count(settings, ingress_topic) == 1


@pytest.mark.timeout(120)
def test_dlq_replay_by_offset_and_force(mesh_env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    settings = MeshSettings()
    ingress_topic = Catalog(settings.topic_prefix).topic("ingress")
    _publish_dead_letters(settings)

    assert "replayed" in _run(capsys, "dlq", "replay", "--offset", "0")
    assert "already replayed" in _run(capsys, "dlq", "replay", "--offset", "0")
    assert _count(settings, ingress_topic) == 1
    forced = json.loads(_run(capsys, "dlq", "replay", "--offset", "0", "--force", "--json"))
    assert [o["action"] for o in forced] == ["replayed"]
    assert _count(settings, ingress_topic) == 2
    manual = json.loads(_run(capsys, "dlq", "replay", "--offset", "1", "--json"))
    assert [o["action"] for o in manual] == ["manual"]


@pytest.mark.timeout(60)
def test_dlq_list_on_empty_topic(mesh_env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(capsys, "dlq", "list").strip() == "no dead letters"
