"""Kafka I/O with Avro: an idempotent producer and the one consumer loop.

Delivery contract of ``ConsumerLoop`` (every service gets the same one):

* At least once. A record's offset is *stored* only after its handler returned
  and every record the handler produced was acknowledged by the broker; the
  background auto-commit then commits stored offsets. A crash anywhere before
  that redelivers the record, so handlers must be idempotent; they get an
  idempotency key per record (the event id, else topic/partition/group/offset).
* Poison records never block a partition: a record that cannot be decoded, is
  oversized, or whose handler raises a non-retryable error goes to the
  dead-letter topic with the error and the original bytes, and the loop goes on.
* Transient errors are retried in place with capped exponential backoff (order
  per key is kept: a dependency restarting must not reorder a run's events);
  after ``max_transient_s`` of failing the record is dead-lettered marked
  retryable, so ``aios dlq replay`` can finish it once the cause is fixed.
* Batches: the handler sees up to ``batch_size`` decoded records at once (so
  the planner can classify many messages in one inference call). If a batch
  fails, the loop falls back to one record at a time to isolate the culprit.
* Graceful stop: ``stop()`` lets the current batch finish, flushes the
  producer, commits stored offsets synchronously and closes the consumer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from services.common import metrics, tracing
from services.common.catalog import Catalog
from services.common.codec import AvroCodec
from services.common.errors import AiosError, BadRecord, TransientError, is_retryable
from services.common.logs import log_context

log = logging.getLogger(__name__)
# librdkafka's own messages go through logging (structured lines), not raw stderr.
_RDKAFKA_LOG = logging.getLogger("librdkafka")


def now_ms() -> int:
    return int(time.time() * 1000)


def new_event_id() -> str:
    return uuid.uuid4().hex


@dataclass
class Inbound:
    """One decoded record, as a handler sees it."""

    topic: str
    role: str
    partition: int
    offset: int
    key: str
    schema: str
    value: dict[str, Any]
    headers: dict[str, str]
    idempotency_key: str
    raw: Any = field(repr=False, default=None)

    @property
    def tenant(self) -> str:
        return str(self.value.get("tenant") or self.headers.get("tenant", ""))


class MeshProducer:
    """Idempotent, Avro-encoding producer addressed by catalog role."""

    MAX_BYTES = 1_000_000  # librdkafka's and Kafka's default message limit

    def __init__(self, bootstrap: str, catalog: Catalog, codec: AvroCodec, *, linger_ms: int = 0,
                 extra: dict[str, Any] | None = None) -> None:
        conf = {"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all",
                "linger.ms": linger_ms, "compression.type": "none", "message.max.bytes": self.MAX_BYTES,
                "logger": _RDKAFKA_LOG}
        conf.update(extra or {})
        self._producer = Producer(conf)
        self.catalog = catalog
        self.codec = codec
        # Delivery errors are kept per sending thread: the consumer loop, the timer poller and
        # gRPC handlers share this producer, and each must only see the failures of its own records.
        self._local = threading.local()

    def _bucket(self) -> list[str]:
        if not hasattr(self._local, "errors"):
            self._local.errors = []
        bucket: list[str] = self._local.errors
        return bucket

    @staticmethod
    def _on_delivery(bucket: list[str], err: KafkaError | None, _msg: Any) -> None:
        if err is not None:
            bucket.append(str(err))

    def send(self, role: str, key: str, record: dict[str, Any], *, headers: dict[str, str] | None = None) -> None:
        """Queue one record; ``flush()`` makes it durable. Fills event id,
        tenant header, schema name and the current trace context."""
        spec = self.catalog.spec(role)
        record.setdefault("event_id", new_event_id())
        record.setdefault("occurred_at", now_ms())
        value = self.codec.encode(spec.schema, record)
        hdrs = {"aios-schema": spec.schema, "event-id": record["event_id"], "tenant": record.get("tenant", "")}
        hdrs.update(tracing.inject())
        hdrs.update(headers or {})
        self.send_raw(spec.name, key, value, hdrs)

    def send_raw(self, topic: str, key: str | bytes | None, value: bytes, headers: dict[str, str]) -> None:
        bucket = self._bucket()
        while True:
            try:
                self._producer.produce(topic, key=key, value=value, headers=list(headers.items()),
                                       on_delivery=lambda err, msg: self._on_delivery(bucket, err, msg))
                break
            except BufferError:  # local queue full: let deliveries drain
                self._producer.poll(0.05)
            except KafkaException as exc:  # e.g. MSG_SIZE_TOO_LARGE: this record can never be sent
                raise BadRecord(f"cannot produce to {topic}: {exc}") from exc
        self._producer.poll(0)

    def flush(self, timeout_s: float = 30.0) -> None:
        """Block until everything sent is acknowledged; raise if any record this thread sent failed."""
        remaining = self._producer.flush(timeout_s)
        bucket = self._bucket()
        errors = list(bucket)
        bucket.clear()
        if remaining or errors:
            raise TransientError(f"{remaining} record(s) unacknowledged, errors: {errors[:3]}")

    def close(self) -> None:
        self._producer.flush(10)


Handler = Callable[[Sequence[Inbound]], None]


class ConsumerLoop:
    """The one consumer loop; see the module docstring for its contract."""

    def __init__(self, *, service: str, group: str, roles: Sequence[str], handler: Handler,
                 bootstrap: str, catalog: Catalog, codec: AvroCodec, producer: MeshProducer,
                 fetch_wait_ms: int = 10, session_timeout_ms: int = 6000, batch_size: int = 64,
                 max_transient_s: float = 60.0, max_backoff_s: float = 2.0,
                 max_record_bytes: int = 1_000_000, instance_id: str = "", assignor: str = "range",
                 extra: dict[str, Any] | None = None) -> None:
        self.service, self.group, self.handler = service, group, handler
        self.catalog, self.codec, self.producer = catalog, codec, producer
        self.topics = [catalog.topic(r) for r in roles]
        self.batch_size = batch_size
        self.max_transient_s = max_transient_s
        self.max_backoff_s = max_backoff_s
        self.max_record_bytes = max_record_bytes
        conf = {"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": True,
                "enable.auto.offset.store": False, "auto.commit.interval.ms": 200,
                "auto.offset.reset": "earliest", "fetch.wait.max.ms": fetch_wait_ms,
                "session.timeout.ms": session_timeout_ms, "heartbeat.interval.ms": max(500, session_timeout_ms // 5),
                "max.poll.interval.ms": 300000, # Eager "range": with cooperative-sticky plus static membership the embedded
                # broker leaves revoked partitions unowned when a second replica joins.
                "partition.assignment.strategy": assignor,
                "logger": _RDKAFKA_LOG}
        if instance_id:
            # Static membership: a replica restarted under the same id takes its partitions
            # back at once instead of waiting out the session timeout and a rebalance.
            conf["group.instance.id"] = instance_id
        conf.update(extra or {})
        self._consumer = Consumer(conf)
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self.assigned = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------
    def start(self) -> ConsumerLoop:
        self._consumer.subscribe(self.topics, on_assign=lambda c, p: self.assigned.set())
        self._thread = threading.Thread(target=self._run, name=f"{self.service}-consumer", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        next_lag = time.monotonic() + 5
        try:
            while not self._stopping.is_set():
                if time.monotonic() >= next_lag:
                    self._report_lag()
                    next_lag = time.monotonic() + 5
                # consume(n, timeout) waits until n records arrive or the timeout passes, so
                # block for the first record only, then take what is already fetched.
                msgs = self._consumer.consume(1, timeout=0.1)
                if msgs and self.batch_size > 1:
                    msgs += self._consumer.consume(self.batch_size - 1, timeout=0)
                if msgs:
                    self._handle_batch(msgs)
        except Exception:
            log.exception("consumer loop crashed; stopping so the supervisor restarts the service")
            raise
        finally:
            try:
                self.producer.flush()
                self._consumer.commit(asynchronous=False)
            except Exception as exc:  # nothing stored yet, or the broker is gone
                log.debug("final commit skipped: %s", exc)
            self._consumer.close()
            self._stopped.set()

    # -- handling ------------------------------------------------------------------
    def _handle_batch(self, msgs: list[Any]) -> None:
        good: list[Inbound] = []
        for msg in msgs:
            if msg.error():
                if msg.error().code() != KafkaError._PARTITION_EOF:
                    log.warning("consumer error: %s", msg.error())
                continue
            try:
                good.append(self._decode(msg))
            except BadRecord as exc:
                self._dead_letter(msg, exc, attempts=1)
        if good:
            by_topic = good[0].topic
            started = time.perf_counter()
            try:
                self._call(good)
            except Exception as exc:
                log.info("batch of %d failed (%s); retrying one record at a time", len(good), exc)
                for rec in good:
                    self._handle_one(rec)
            metrics.HANDLE_SECONDS.labels(self.service, by_topic).observe(time.perf_counter() - started)
            for rec in good:
                metrics.RECORDS.labels(self.service, rec.topic, "ok").inc()
        self.producer.flush()
        # Only now, with the effects durable, may the offsets move.
        for msg in msgs:
            if not msg.error():
                try:
                    self._consumer.store_offsets(message=msg)
                except KafkaException as exc:
                    # The partition was revoked meanwhile: its new owner redelivers; handlers are idempotent.
                    log.info("offset not stored for %s/%d: %s", msg.topic(), msg.partition(), exc)

    def _call(self, records: Sequence[Inbound]) -> None:
        first = records[0]
        with tracing.span_from_headers(f"handle {first.role}", first.headers, service=self.service) as trace_id, \
                log_context(run_id=first.key, tenant=first.tenant, trace_id=trace_id):
            self.handler(records)
            # Effects of this handler must be acknowledged before we store offsets.
            self.producer.flush()

    def _handle_one(self, rec: Inbound) -> None:
        attempt = 0
        give_up_at = time.monotonic() + self.max_transient_s
        while True:
            attempt += 1
            try:
                self._call([rec])
                return
            except Exception as exc:
                if not is_retryable(exc) or time.monotonic() >= give_up_at or self._stopping.is_set():
                    if self._stopping.is_set() and is_retryable(exc):
                        # Stopping: leave the record unacknowledged so the next owner retries it.
                        raise
                    self._dead_letter(rec.raw, exc, attempts=attempt)
                    return
                metrics.TRANSIENT_RETRIES.labels(self.service, rec.topic).inc()
                delay = min(self.max_backoff_s, 0.05 * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
                log.warning("transient error on %s@%d (attempt %d): %s; retrying in %.2fs",
                            rec.topic, rec.offset, attempt, exc, delay)
                time.sleep(delay)

    def _decode(self, msg: Any) -> Inbound:
        value = msg.value()
        if value is not None and len(value) > self.max_record_bytes:
            raise BadRecord(f"record of {len(value)} bytes exceeds the {self.max_record_bytes}-byte limit "
                            "(AIOS_MAX_RECORD_BYTES); store large payloads elsewhere and send a reference")
        headers = {k: (v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v))
                   for k, v in (msg.headers() or [])}
        schema, record = self.codec.decode(value)
        role = self.catalog.role_of(msg.topic()) or msg.topic()
        expected = self.catalog.spec(role).schema if role in self.catalog.topics else schema
        if schema != expected:
            raise BadRecord(f"topic {msg.topic()} carries {expected}, got a {schema} record")
        key = msg.key().decode("utf-8", "replace") if msg.key() else ""
        idem = record.get("event_id") or f"{msg.topic()}/{msg.partition()}/{self.group}/{msg.offset()}"
        return Inbound(topic=msg.topic(), role=role, partition=msg.partition(), offset=msg.offset(), key=key,
                       schema=schema, value=record, headers=headers, idempotency_key=idem, raw=msg)

    def _dead_letter(self, msg: Any, exc: BaseException, *, attempts: int) -> None:
        """Park the original bytes with the reason; the loop goes on."""
        headers = {k: (v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v))
                   for k, v in (msg.headers() or [])}
        error_type = exc.kind if isinstance(exc, AiosError) else type(exc).__name__
        value = msg.value() or b""
        if len(value) > self.max_record_bytes // 2:
            # Too big to travel whole: keep a prefix and say so; the source offset locates the rest.
            headers["aios-truncated"] = f"{len(value)} bytes, sha256 {hashlib.sha256(value).hexdigest()}"
            value = value[: self.max_record_bytes // 4]
        record = {"tenant": headers.get("tenant", ""), "service": self.service, "group": self.group,
                  "source_topic": msg.topic(), "partition": msg.partition(), "offset": msg.offset(),
                  "key": (msg.key() or b"")[:1024], "value": value, "headers_json": json.dumps(headers)[:20000],
                  "error_type": error_type, "error_message": str(exc)[:2000],
                  "retryable": is_retryable(exc), "attempts": attempts}
        try:
            self.producer.send("deadletters", (msg.key() or b"")[:1024].decode("utf-8", "replace"), record)
        except AiosError as send_error:  # never let a dead letter crash the loop
            log.error("cannot dead-letter %s@%d: %s", msg.topic(), msg.offset(), send_error)
        metrics.DEAD_LETTERS.labels(self.service, msg.topic(), error_type).inc()
        metrics.RECORDS.labels(self.service, msg.topic(), "dead_letter").inc()
        log.warning("dead-lettered %s@%d/%d: %s: %s", msg.topic(), msg.partition(), msg.offset(), error_type, exc)

    def _report_lag(self) -> None:
        """Records behind the high watermark per assigned partition, into aios_consumer_lag.
        Runs in the loop's own thread (the consumer is not thread-safe); cached watermarks, no I/O."""
        try:
            for tp in self._consumer.position(self._consumer.assignment()):
                _lo, hi = self._consumer.get_watermark_offsets(TopicPartition(tp.topic, tp.partition),
                                                               cached=True) or (0, 0)
                if tp.offset >= 0:
                    metrics.CONSUMER_LAG.labels(self.service, tp.topic, str(tp.partition)).set(max(0, hi - tp.offset))
        except KafkaException as exc:
            log.debug("lag not reported: %s", exc)
