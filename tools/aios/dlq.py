"""Dead letters: read the dead-letter topic from the beginning with a throw-away
consumer (assigned partitions, no group commits), filter, and replay the
original bytes, key and headers to the topic they came from.

Replays are recorded in the Redis set ``aios:dlq:replayed`` (members
``<dlq topic>:<partition>:<offset>``) only after the broker acknowledged them,
so a dead letter is replayed at most once unless ``--force`` (a crash between
the two may replay one twice; consumers are idempotent by event id)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from services.common.catalog import Catalog
from services.common.codec import AvroCodec
from services.common.errors import AiosError
from services.common.kafka import MeshProducer
from services.common.settings import MeshSettings
from tools.aios.clients import CliError, kafka_unreachable

REPLAYED_KEY = "aios:dlq:replayed"
REPLAY_HEADER = "aios-replayed-from"
MANUAL_SOURCES = frozenset({"compensation"})
READ_DEADLINE_S = 30.0


@dataclass
class DeadLetter:
    """One record of the dead-letter topic; ``record`` is None when it does not decode."""

    topic: str
    partition: int
    offset: int
    record: dict[str, Any] | None
    raw: bytes = field(repr=False, default=b"")
    decode_error: str = ""

    def get(self, name: str, default: Any = None) -> Any:
        return (self.record or {}).get(name, default)

    @property
    def source_topic(self) -> str:
        return str(self.get("source_topic", ""))

    @property
    def error_type(self) -> str:
        return str(self.get("error_type", "")) if self.record is not None else "UndecodableDeadLetter"

    @property
    def message(self) -> str:
        return str(self.get("error_message", "")) if self.record is not None else self.decode_error

    @property
    def occurred_at(self) -> float:
        return float(self.get("occurred_at") or 0)

    @property
    def headers(self) -> dict[str, str]:
        try:
            headers = json.loads(self.get("headers_json") or "{}")
        except ValueError:
            return {}
        return {str(k): str(v) for k, v in headers.items()} if isinstance(headers, dict) else {}

    @property
    def member(self) -> str:
        """This dead letter's id in the replayed set."""
        return f"{self.topic}:{self.partition}:{self.offset}"

    def run_hint(self) -> str:
        """The run a planner-written dead letter is about (its key, or run_id in its JSON value)."""
        key = self.get("key")
        if isinstance(key, bytes) and key:
            return key.decode("utf-8", "replace")
        try:
            return str(json.loads(self.get("value") or b"{}").get("run_id", "?"))
        except (ValueError, AttributeError):
            return "?"


def dlq_topic(settings: MeshSettings) -> str:
    return Catalog(settings.topic_prefix).topic("deadletters")


def new_codec(settings: MeshSettings) -> AvroCodec:
    return AvroCodec(Catalog(settings.topic_prefix).schemas)


def _consumer(settings: MeshSettings) -> Consumer:
    return Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": f"aios-cli-{uuid.uuid4().hex}",
                     "enable.auto.commit": False, "enable.auto.offset.store": False,
                     "auto.offset.reset": "earliest", "fetch.wait.max.ms": 10, "enable.partition.eof": True,
                     "log_level": 0, **settings.kafka_client_config()})


def _start_offsets(consumer: Consumer, topic: str, settings: MeshSettings) -> dict[int, tuple[int, int]]:
    """(low, high) watermark of every partition that holds records."""
    try:
        meta = consumer.list_topics(topic, timeout=5).topics.get(topic)
    except KafkaException as exc:
        raise kafka_unreachable(settings.kafka_bootstrap, exc) from None
    if meta is None or meta.error is not None:
        raise CliError(f"NOT_FOUND: dead-letter topic {topic} does not exist at {settings.kafka_bootstrap}; "
                       "check AIOS_TOPIC_PREFIX or start the stack with `make up` (it creates the topics)")
    marks = {}
    for part in meta.partitions:
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, part), timeout=5)
        if high > low:
            marks[part] = (low, high)
    return marks


def _decode(msg: Any, codec: AvroCodec) -> DeadLetter:
    raw = msg.value() or b""
    try:
        _schema, record = codec.decode(raw)
        return DeadLetter(msg.topic(), msg.partition(), msg.offset(), record, raw)
    except AiosError as exc:
        return DeadLetter(msg.topic(), msg.partition(), msg.offset(), None, raw, decode_error=str(exc))


def _take(msg: Any, codec: AvroCodec, marks: dict[int, tuple[int, int]], found: list[DeadLetter],
          done: set[int]) -> None:
    """One consumed message: a dead letter, or the end of a partition."""
    err = msg.error()
    if err is not None:
        if err.code() == KafkaError._PARTITION_EOF:
            done.add(msg.partition())
        return
    found.append(_decode(msg, codec))
    if msg.offset() + 1 >= marks[msg.partition()][1]:
        done.add(msg.partition())


def _drain(consumer: Consumer, codec: AvroCodec, marks: dict[int, tuple[int, int]],
           deadline_s: float) -> list[DeadLetter]:
    found: list[DeadLetter] = []
    done: set[int] = set()
    deadline = time.monotonic() + deadline_s
    while done != set(marks):
        if time.monotonic() > deadline:
            raise CliError(f"DEADLINE_EXCEEDED: read {len(found)} dead letters but not up to the end of the topic "
                           f"within {deadline_s:.0f}s; retry with a larger --deadline")
        for msg in consumer.consume(500, timeout=0.2):
            _take(msg, codec, marks, found, done)
    return sorted(found, key=lambda d: (d.partition, d.offset))


def read_all(settings: MeshSettings, *, deadline_s: float = READ_DEADLINE_S) -> list[DeadLetter]:
    """Every dead letter from the beginning up to the high watermarks seen at the start."""
    topic = dlq_topic(settings)
    consumer = _consumer(settings)
    try:
        marks = _start_offsets(consumer, topic, settings)
        if not marks:
            return []
        consumer.assign([TopicPartition(topic, p, low) for p, (low, _high) in marks.items()])
        return _drain(consumer, new_codec(settings), marks, deadline_s)
    finally:
        consumer.close()


def select(entries: Sequence[DeadLetter], *, prefix: str = "", service: str | None = None,
           topic: str | None = None, error_type: str | None = None,
           offsets: Sequence[int] | None = None) -> list[DeadLetter]:
    """Filter; ``topic`` matches the source topic with or without the deployment prefix."""
    out = []
    for e in entries:
        if service and e.get("service") != service:
            continue
        if topic and e.source_topic not in (topic, prefix + topic):
            continue
        if error_type and e.error_type.lower() != error_type.lower():
            continue
        if offsets is not None and e.offset not in offsets:
            continue
        out.append(e)
    return out


def find(entries: Sequence[DeadLetter], offset: int, partition: int | None = None) -> DeadLetter:
    for e in entries:
        if e.offset == offset and (partition is None or e.partition == partition):
            return e
    raise CliError(f"NOT_FOUND: no dead letter at offset {offset}; list them with `aios dlq list`")


def decode_original(codec: AvroCodec, entry: DeadLetter) -> tuple[str, dict[str, Any]] | None:
    try:
        return codec.decode(entry.get("value") or b"")
    except AiosError:
        return None


def replayed_members(redis_client: Any, entries: Sequence[DeadLetter]) -> set[str]:
    if not entries:
        return set()
    flags = redis_client.smismember(REPLAYED_KEY, [e.member for e in entries])
    return {e.member for e, flag in zip(entries, flags, strict=True) if flag}


@dataclass
class Outcome:
    entry: DeadLetter
    action: str  # replayed | would replay | skipped | manual
    detail: str


def plan(entries: Sequence[DeadLetter], *, done: set[str], existing_topics: set[str],
         force: bool) -> list[Outcome]:
    """What replay would do with each dead letter, before anything is sent."""
    outcomes = []
    for e in entries:
        if e.record is None:
            outcomes.append(Outcome(e, "skipped", f"undecodable dead letter; inspect with `aios dlq show {e.offset}`"))
        elif e.source_topic in MANUAL_SOURCES:
            outcomes.append(Outcome(e, "manual", f"manual: see run {e.run_hint()}"))
        elif e.member in done and not force:
            outcomes.append(Outcome(e, "skipped", "already replayed (use --force to replay again)"))
        elif e.source_topic not in existing_topics:
            outcomes.append(Outcome(e, "skipped", f"source topic {e.source_topic!r} does not exist"))
        else:
            outcomes.append(Outcome(e, "would replay", f"-> {e.source_topic}"))
    return outcomes


def publish(producer: MeshProducer, outcomes: Sequence[Outcome], redis_client: Any) -> None:
    """Send every planned record, wait for the broker, then remember them as replayed."""
    todo = [o for o in outcomes if o.action == "would replay"]
    if not todo:
        return
    for o in todo:
        headers = {**o.entry.headers, REPLAY_HEADER: str(o.entry.offset)}
        producer.send_raw(o.entry.source_topic, o.entry.get("key"), o.entry.get("value") or b"", headers)
    try:
        producer.flush(30)
    except AiosError as exc:
        raise CliError(f"UNAVAILABLE: replay not acknowledged by the broker ({exc}); nothing was marked "
                       "replayed, so running the replay again is safe (consumers dedupe by event id)") from None
    redis_client.sadd(REPLAYED_KEY, *[o.entry.member for o in todo])
    for o in todo:
        o.action = "replayed"


def existing_topics(settings: MeshSettings) -> set[str]:
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap, "log_level": 0,
                         **settings.kafka_client_config()})
    try:
        return set(admin.list_topics(timeout=5).topics)
    except KafkaException as exc:
        raise kafka_unreachable(settings.kafka_bootstrap, exc) from None


def replay(settings: MeshSettings, entries: Sequence[DeadLetter], redis_client: Any, *,
           dry_run: bool = False, force: bool = False) -> list[Outcome]:
    """Re-publish the selected dead letters to their source topics (see the module docstring)."""
    outcomes = plan(entries, done=replayed_members(redis_client, entries),
                    existing_topics=existing_topics(settings), force=force)
    if dry_run:
        return outcomes
    catalog = Catalog(settings.topic_prefix)
    producer = MeshProducer(settings.kafka_bootstrap, catalog, AvroCodec(catalog.schemas),
                            client_config=settings.kafka_client_config(),
                            extra={"message.timeout.ms": 20000, "log_level": 0})
    try:
        publish(producer, outcomes, redis_client)
    finally:
        producer.close()
    return outcomes
