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
  The dead letter is part of the effect: it is acknowledged by the broker before
  the offset is stored; if it cannot be written the record is not acknowledged
  and its partition retries it like a transient error.
* Transient errors pause only the failing record's partition: the partition is
  paused and rewound to that record, retried after a capped exponential backoff,
  and every other partition keeps flowing (and the loop keeps polling, so the
  group never evicts it). Order per partition is kept: nothing after the failed
  record in its partition is handled or acknowledged before it. After
  ``max_transient_s`` of failing the record is dead-lettered marked retryable,
  so ``aios dlq replay`` can finish it once the cause is fixed.
* Batches: the handler sees up to ``batch_size`` decoded records at once (so
  the planner can classify many messages in one inference call). If a batch
  fails, the loop falls back to one record at a time to isolate the culprit.
* Graceful stop: ``stop()`` lets the current batch finish, flushes the
  producer, commits stored offsets synchronously and closes the consumer. A
  record that fails transiently while stopping is left for the next owner.
* Hot standby (optional ``gate``, runtime.StandbyLease): only the replica the
  gate admits is a member of the group; the others wait outside it and one
  joins when the member dies or stops. Nothing else in this contract changes.

The producer has one publish path: ``encode`` is the only place that fills the
event id, timestamps and headers and checks the size; ``send`` is encode plus
``send_record``, which also replays encoded records from an outbox. Only a size
error makes a record bad; a fatal producer error (idempotence broken) sets
``MeshProducer.fatal`` and the runtime exits non-zero so the process restarts.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from services.common import metrics, tracing
from services.common.catalog import Catalog
from services.common.codec import AvroCodec
from services.common.errors import (
    AiosError,
    Backpressure,
    BadRecord,
    RecordTooLarge,
    TransientError,
    is_retryable,
)
from services.common.logs import log_context

log = logging.getLogger(__name__)
EXIT_LEASE_LOST = 70  # EX_SOFTWARE, as services.common.runtime.EXIT_FAILED: restart me (as a standby)
# librdkafka's own messages go through logging (structured lines), not raw stderr.
_RDKAFKA_LOG = logging.getLogger("librdkafka")
_TENANT = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # a tenant name, as the audit trail takes it
_LARGE_HINT = "store large payloads elsewhere (Redis, object storage) and send a reference"


def now_ms() -> int:
    return int(time.time() * 1000)


def new_event_id() -> str:
    """128 random bits as hex, like uuid4().hex without building a UUID."""
    return os.urandom(16).hex()


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


@dataclass(frozen=True)
class OutRecord:
    """One encoded Kafka record, ready to produce: what ``encode`` returns and what an outbox stores."""

    topic: str
    key: str
    value: bytes
    headers: dict[str, str]
    event_id: str

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe dict (value in base64), e.g. for an outbox in Redis."""
        return {"topic": self.topic, "key": self.key, "value": base64.b64encode(self.value).decode(),
                "headers": self.headers, "event_id": self.event_id}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> OutRecord:
        return cls(topic=raw["topic"], key=raw["key"], value=base64.b64decode(raw["value"]),
                   headers=dict(raw["headers"]), event_id=raw["event_id"])


class MeshProducer:
    """Idempotent, Avro-encoding producer addressed by catalog role."""

    MAX_BYTES = 1_000_000  # librdkafka's and Kafka's default message limit
    QUEUE_FULL_WAIT_S = 30.0  # how long send waits for room in librdkafka's local queue

    def __init__(self, bootstrap: str, catalog: Catalog, codec: AvroCodec, *, linger_ms: int = 0,
                 client_config: Mapping[str, str] | None = None, extra: dict[str, Any] | None = None) -> None:
        conf = {"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all",
                "linger.ms": linger_ms, "compression.type": "none", "message.max.bytes": self.MAX_BYTES,
                "logger": _RDKAFKA_LOG, "error_cb": self.on_error}
        # SASL/TLS (MeshSettings.kafka_client_config()): how to reach this cluster, never how to deliver.
        conf.update(client_config or {})
        conf.update(extra or {})
        self._producer = Producer(conf)
        self.catalog = catalog
        self.codec = codec
        # Why this producer can no longer produce (empty while it can). librdkafka reports a
        # fatal error when idempotence is broken (fenced, out of sequence): every later produce
        # fails, so the process must restart; ServiceRuntime checks this and exits non-zero.
        self.fatal = ""
        # Delivery errors are kept per sending thread: the consumer loop, the timer poller and
        # gRPC handlers share this producer, and each must only see the failures of its own records.
        self._local = threading.local()

    def _bucket(self) -> list[KafkaError]:
        if not hasattr(self._local, "errors"):
            self._local.errors = []
        bucket: list[KafkaError] = self._local.errors
        return bucket

    def thread_errors(self) -> list[KafkaError]:
        """This thread's delivery-error list, to share with helper threads (``use_errors``)."""
        return self._bucket()

    def use_errors(self, bucket: list[KafkaError] | None) -> None:
        """Report this thread's delivery errors into ``bucket`` (another thread's), so that thread's one
        ``flush`` covers records its helpers sent; None gives this thread its own list again."""
        self._local.errors = bucket if bucket is not None else []

    @staticmethod
    def _on_delivery(bucket: list[KafkaError], err: KafkaError | None, _msg: Any) -> None:
        if err is not None:
            bucket.append(err)

    def on_error(self, err: KafkaError) -> None:
        """librdkafka's error callback: a fatal error marks the producer unusable; others are logged
        (librdkafka retries them itself: a broker away, a connection reset)."""
        if err.fatal():
            self._mark_fatal(str(err))
        else:
            log.warning("kafka producer error (librdkafka retries): %s", err)

    def _mark_fatal(self, why: str) -> None:
        if not self.fatal:
            self.fatal = why
            log.critical("the Kafka producer hit a fatal error and cannot produce any more; the process must "
                         "restart: %s", why)

    def encode(self, role: str, key: str, record: dict[str, Any], *,
               headers: dict[str, str] | None = None) -> OutRecord:
        """The one place a record is made: fills event id and occurred_at (unless set), encodes it,
        sets the headers (schema, event id, tenant, W3C trace context, then ``headers``) and checks
        the size. Raises RecordTooLarge (a BadRecord) for a record over the limit."""
        spec = self.catalog.spec(role)
        record.setdefault("event_id", new_event_id())
        record.setdefault("occurred_at", now_ms())
        value = self.codec.encode(spec.schema, record)
        hdrs = {"aios-schema": spec.schema, "event-id": record["event_id"], "tenant": record.get("tenant") or ""}
        hdrs.update(tracing.inject())
        hdrs.update(headers or {})
        # Key and headers travel in the same message and count against the same limit.
        size = len(value) + len(key.encode()) + sum(len(k) + len(v.encode()) for k, v in hdrs.items())
        if size > self.MAX_BYTES:
            raise RecordTooLarge(f"a {spec.schema} record for topic {spec.name} is {size} bytes, over the "
                                 f"{self.MAX_BYTES}-byte message limit; {_LARGE_HINT}")
        return OutRecord(spec.name, key, value, hdrs, record["event_id"])

    def send(self, role: str, key: str, record: dict[str, Any], *,
             headers: dict[str, str] | None = None) -> OutRecord:
        """Encode and queue one record; ``flush()`` makes it durable."""
        out = self.encode(role, key, record, headers=headers)
        self.send_record(out)
        return out

    def send_record(self, rec: OutRecord) -> None:
        """Queue an already encoded record (an outbox being replayed); ``flush()`` makes it durable."""
        if self.fatal:
            raise TransientError(f"the producer is unusable after a fatal error ({self.fatal}); "
                                 "the process is restarting")
        bucket = self._bucket()
        # surrogateescape: a key that came in as arbitrary bytes (a dead letter's original key)
        # goes out as the same bytes. An empty key is a null key: librdkafka's default
        # partitioner spreads both at random.
        key = rec.key.encode("utf-8", "surrogateescape") if rec.key else None
        give_up = time.monotonic() + self.QUEUE_FULL_WAIT_S
        while True:
            try:
                self._producer.produce(rec.topic, key=key, value=rec.value, headers=list(rec.headers.items()),
                                       on_delivery=lambda err, msg: self._on_delivery(bucket, err, msg))
                break
            except BufferError:  # local queue full: let deliveries drain, for a bounded time
                if time.monotonic() >= give_up:
                    raise TransientError(f"producer queue still full after {self.QUEUE_FULL_WAIT_S:.0f}s; "
                                         "the broker is not taking records") from None
                self._producer.poll(0.05)
            except KafkaException as exc:
                raise self._produce_error(rec, exc.args[0]) from exc
        self._producer.poll(0)

    def send_raw(self, topic: str, key: str | bytes | None, value: bytes, headers: dict[str, str]) -> None:
        """Queue bytes the mesh did not encode (``aios dlq replay``, tests) as they are."""
        text = key.decode("utf-8", "surrogateescape") if isinstance(key, bytes) else (key or "")
        self.send_record(OutRecord(topic, text, value, dict(headers), headers.get("event-id", "")))

    def _produce_error(self, rec: OutRecord, err: KafkaError) -> AiosError:
        """Only a size error makes a record bad; anything else is about the producer or the broker."""
        if err.code() == KafkaError.MSG_SIZE_TOO_LARGE:
            return RecordTooLarge(f"a {len(rec.value)}-byte record for topic {rec.topic} "
                                  f"({rec.headers.get('aios-schema', 'no schema header')}) is over the "
                                  f"{self.MAX_BYTES}-byte message limit; {_LARGE_HINT}")
        if err.fatal():
            self._mark_fatal(str(err))
        return TransientError(f"cannot produce to {rec.topic}: {err}")

    def flush(self, timeout_s: float = 30.0) -> None:
        """Block until everything sent is acknowledged; raise if any record this thread sent failed:
        RecordTooLarge if the broker refused one for its size, else TransientError."""
        bucket = self._bucket()
        try:
            remaining = self._producer.flush(timeout_s)
        except KafkaException as exc:  # e.g. a fatal (fenced) state surfacing in flush
            err = exc.args[0]
            if err.fatal():
                self._mark_fatal(str(err))
            bucket.clear()
            raise TransientError(f"flush failed: {err}") from exc
        errors = list(bucket)
        bucket.clear()
        for err in errors:
            if err.fatal():
                self._mark_fatal(str(err))
        if any(err.code() == KafkaError.MSG_SIZE_TOO_LARGE for err in errors):
            raise RecordTooLarge(f"the broker refused a record for its size: {errors[:3]}; {_LARGE_HINT}")
        if remaining or errors:
            raise TransientError(f"{remaining} record(s) unacknowledged, errors: {[str(e) for e in errors[:3]]}")

    def close(self) -> None:
        try:
            self._producer.flush(10)
        except KafkaException as exc:  # a fatal producer: nothing more can be delivered
            log.warning("producer close: %s", exc)


Handler = Callable[[Sequence[Inbound]], None]


class MembershipGate(Protocol):
    """Whether this replica may be a member of its consumer group now (hot standby). A gated loop
    stands by outside the group until ``active()``, then subscribes; if ``active()`` turns false
    while it is a member, another replica is taking over and the process exits at once (see
    ``ConsumerLoop._follow_gate``). ``close()`` gives membership up for good, after the loop left
    the group, so that a standby joins at once. See runtime.StandbyLease."""

    def active(self) -> bool: ...

    def close(self) -> None: ...


@dataclass
class _Retry:
    """A partition waiting to retry the record at ``offset``: paused and rewound to it until ``retry_at``."""

    offset: int
    attempts: int  # failed attempts of that record so far
    first_failed: float  # monotonic time of its first failure: bounds the retrying by max_transient_s
    retry_at: float
    paused: bool = True
    backpressure: bool = False  # waiting for capacity, not failing: never dead-lettered for it


class ConsumerLoop:
    """The one consumer loop; see the module docstring for its contract."""

    DEAD_LETTER_FLUSH_S = 10.0  # a dead letter not acknowledged within this is retried later

    def __init__(self, *, service: str, group: str, roles: Sequence[str], handler: Handler,
                 bootstrap: str, catalog: Catalog, codec: AvroCodec, producer: MeshProducer,
                 fetch_wait_ms: int = 10, session_timeout_ms: int = 6000, batch_size: int = 64,
                 max_transient_s: float = 60.0, max_backoff_s: float = 2.0,
                 max_record_bytes: int = 1_000_000, instance_id: str = "", assignor: str = "range",
                 client_config: Mapping[str, str] | None = None, lag_interval_s: float = 5.0,
                 heartbeat_interval_ms: int = 0, gate: MembershipGate | None = None,
                 extra: dict[str, Any] | None = None) -> None:
        self.service, self.group, self.handler = service, group, handler
        self.catalog, self.codec, self.producer = catalog, codec, producer
        self.topics = [catalog.topic(r) for r in roles]
        self.batch_size = batch_size
        self.max_transient_s = max_transient_s
        self.max_backoff_s = max_backoff_s
        self.max_record_bytes = max_record_bytes
        self.lag_interval_s = lag_interval_s  # how often aios_consumer_lag_records is refreshed
        conf = {"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": True,
                "enable.auto.offset.store": False, "auto.commit.interval.ms": 200,
                "auto.offset.reset": "earliest", "fetch.wait.max.ms": fetch_wait_ms,
                "session.timeout.ms": session_timeout_ms,
                "heartbeat.interval.ms": heartbeat_interval_ms or max(100, session_timeout_ms // 5),
                # The loop polls at least every 100 ms even while partitions wait out a backoff;
                # only a single handler call or flush can approach this bound.
                "max.poll.interval.ms": 300000,
                # Eager "range": with cooperative-sticky plus static membership the embedded
                # broker leaves revoked partitions unowned when a second replica joins.
                "partition.assignment.strategy": assignor,
                "logger": _RDKAFKA_LOG}
        if instance_id:
            # Static membership: a replica restarted under the same id takes its partitions
            # back at once instead of waiting out the session timeout and a rebalance.
            conf["group.instance.id"] = instance_id
        conf.update(client_config or {})  # SASL/TLS, as in MeshProducer
        conf.update(extra or {})
        self._consumer = Consumer(conf)
        self._stopping = threading.Event()
        self.assigned = threading.Event()
        # Hot standby (``gate``): subscribed only while the gate says this replica is the active one;
        # ``standing_by`` is set while it waits outside the group (ready, not a member).
        self.gate = gate
        self.standing_by = threading.Event()
        self._subscribed = False
        self._thread: threading.Thread | None = None
        # Partitions retrying a record, by (topic, partition). Only the loop's thread touches
        # this (rebalance callbacks run inside consume(), on that thread too).
        self._retries: dict[tuple[str, int], _Retry] = {}

    # -- lifecycle -----------------------------------------------------------------
    def start(self) -> ConsumerLoop:
        if self.gate is None:
            self._subscribe()
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

    @property
    def ready(self) -> bool:
        """Joined the group and got an assignment, or standing by outside it (hot standby)."""
        return self.assigned.is_set() or self.standing_by.is_set()

    def _subscribe(self) -> None:
        self._consumer.subscribe(self.topics, on_assign=self._on_assign, on_revoke=self._on_revoke,
                                 on_lost=self._on_revoke)
        self._subscribed = True

    def _follow_gate(self) -> bool:
        """Join the group when the gate opens; True while this replica is a member."""
        assert self.gate is not None
        active = self.gate.active()
        if active and not self._subscribed:
            log.info("%s: this replica holds the group's standby lease; joining the group", self.group)
            self._subscribe()
            self.standing_by.clear()
        elif not active and self._subscribed:
            # Another replica took the lease (this one stalled past it) and is joining the group. Leaving
            # now would leave the embedded broker's group waiting for a leader that is gone (a leader that
            # leaves while another member joins; docs/DECISIONS.md, "hot standby"), so exit as if crashed:
            # the broker drops a silent member after the session timeout, what this replica handled is
            # stored, the rest is redelivered to the new member, and the supervisor restarts this one.
            log.critical("%s: another replica holds the group's standby lease; exiting without leaving the "
                         "group (it takes over once the session times out)", self.group)
            logging.shutdown()
            os._exit(EXIT_LEASE_LOST)
        if self._subscribed:
            return True
        self.standing_by.set()
        # Serves the revoke callback after unsubscribe; returns nothing while not subscribed.
        self._consumer.consume(1, timeout=0.05)
        return False

    def _run(self) -> None:
        next_lag = time.monotonic() + self.lag_interval_s
        try:
            while not self._stopping.is_set():
                if self.producer.fatal:
                    # Nothing handled from now on could be made durable: stop without storing more
                    # offsets; the runtime exits non-zero and the next owner redelivers.
                    log.error("consumer loop of %s stops: the producer is unusable (%s)", self.group,
                              self.producer.fatal)
                    return
                if self.gate is not None and not self._follow_gate():
                    continue
                if time.monotonic() >= next_lag:
                    self._report_lag()
                    next_lag = time.monotonic() + self.lag_interval_s
                self._resume_due()
                # consume(n, timeout) waits until n records arrive or the timeout passes, so
                # block for the first record only, then take what is already fetched; and no
                # longer than until a paused partition is due to resume (a record deferred for
                # 20 ms must not wait out a 100 ms poll).
                msgs = self._consumer.consume(1, timeout=self._poll_timeout())
                if msgs and self.batch_size > 1:
                    msgs += self._consumer.consume(self.batch_size - 1, timeout=0)
                if msgs:
                    self._handle_batch(msgs)
        except BaseException:
            log.exception("consumer loop of %s crashed; the service exits so that it is restarted", self.group)
            raise
        finally:
            try:
                self.producer.flush()
                self._consumer.commit(asynchronous=False)
            except Exception as exc:  # nothing stored yet, or the broker is gone
                log.debug("final commit skipped: %s", exc)
            self._consumer.close()
            if self.gate is not None:
                self.gate.close()  # after leaving the group: a standby takes over at once

    # -- rebalance -----------------------------------------------------------------
    def _on_assign(self, _consumer: Any, partitions: list[TopicPartition]) -> None:
        log.info("%s: %d partition(s) assigned", self.group, len(partitions))
        self._forget(partitions)
        self.assigned.set()

    def _on_revoke(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        log.info("%s: %d partition(s) revoked", self.group, len(partitions))
        # The next owner starts from the committed offset, which never passed a waiting record.
        # Resume what we paused so a later assignment of the same partition is not left paused.
        paused = [TopicPartition(tp.topic, tp.partition) for tp in partitions
                  if (r := self._retries.get((tp.topic, tp.partition))) is not None and r.paused]
        if paused:
            try:
                consumer.resume(paused)
            except KafkaException as exc:
                log.debug("resume on revoke: %s", exc)
        self._forget(partitions)
        # A partition that moved away must stop reporting its last lag from this replica: the
        # autoscaler and the alerts sum the gauge per group, so a stale series would count the
        # new owner's backlog twice, or keep a drained backlog alive forever.
        for tp in partitions:
            metrics.clear_consumer_lag(self.service, tp.topic, tp.partition)

    def _forget(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self._retries.pop((tp.topic, tp.partition), None)

    # -- handling ------------------------------------------------------------------
    def _handle_batch(self, msgs: list[Any]) -> None:
        # Acknowledged = the effect (or the dead letter) is durable. Per partition only the run of
        # acknowledged records from the start of the batch is stored, and a record left waiting
        # (``held``: partition -> its offset) holds back everything after it in its partition:
        # order per partition is kept. Batch order within a partition is offset order.
        acked: set[tuple[str, int, int]] = set()
        held: dict[tuple[str, int], int] = {}
        todo: list[Inbound] = []
        for msg in msgs:
            if msg.error():
                if msg.error().code() != KafkaError._PARTITION_EOF:
                    log.warning("consumer error: %s", msg.error())
                continue
            tp = (msg.topic(), msg.partition())
            if tp in held or self._waiting(tp):
                continue  # after a held record, or fetched before its partition paused: comes again
            try:
                todo.append(self._decode(msg))
            except BadRecord as exc:
                if self._give_up(msg, exc):
                    acked.add((*tp, msg.offset()))
                else:
                    held[tp] = msg.offset()
        if todo:
            self._handle_records(todo, acked, held)
        self._store(msgs, acked)

    def _handle_records(self, records: list[Inbound], acked: set[tuple[str, int, int]],
                        held: dict[tuple[str, int], int]) -> None:
        started = time.perf_counter()
        if len(records) > 1:
            try:
                self._call(records)
            except Backpressure as bp:
                self._handled(self._defer(records, bp, acked, held), started)
                return
            except Exception as exc:
                log.info("batch of %d failed (%s); retrying one record at a time", len(records), exc)
            else:
                acked.update((r.topic, r.partition, r.offset) for r in records)
                self._handled(records, started)
                return
        done = []
        for rec in records:
            tp = (rec.topic, rec.partition)
            if rec.offset > held.get(tp, rec.offset):
                continue  # an earlier record of this partition waits
            if self._handle_one(rec):
                acked.add((*tp, rec.offset))
                done.append(rec)
            else:
                held[tp] = min(rec.offset, held.get(tp, rec.offset))
        self._handled(done, started)

    def _handled(self, records: Sequence[Inbound], started: float) -> None:
        if not records:
            return
        metrics.HANDLE_SECONDS.labels(self.service, records[0].topic).observe(time.perf_counter() - started)
        for rec in records:
            metrics.RECORDS.labels(self.service, rec.topic, "ok").inc()
            retry = self._retries.get((rec.topic, rec.partition))
            if retry is not None and retry.offset == rec.offset:
                del self._retries[(rec.topic, rec.partition)]  # its waiting record is done

    def _call(self, records: Sequence[Inbound]) -> None:
        first = records[0]
        # A batch span can continue only one trace (the first record's); it links the others', and
        # handlers give each record (or each run) a span in its own trace.
        with tracing.span_from_headers(f"handle {first.role}", first.headers, service=self.service,
                                       links=tracing.links_to(r.headers for r in records[1:])) as trace_id, \
                log_context(run_id=first.key, tenant=first.tenant, trace_id=trace_id):
            self.handler(records)
            # Effects of this handler must be acknowledged before we store offsets.
            self.producer.flush()

    def _defer(self, records: list[Inbound], bp: Backpressure, acked: set[tuple[str, int, int]],
               held: dict[tuple[str, int], int]) -> list[Inbound]:
        """The handler handled all but ``bp.deferred``: acknowledge the others (in each partition only
        those before its first deferred record) and pause and rewind the deferred partitions."""
        first: dict[tuple[str, int], int] = {}
        for topic, partition, offset in bp.deferred:
            first[(topic, partition)] = min(offset, first.get((topic, partition), offset))
        done = [r for r in records if r.offset < first.get((r.topic, r.partition), r.offset + 1)]
        acked.update((r.topic, r.partition, r.offset) for r in done)
        for (topic, partition), offset in first.items():
            held[(topic, partition)] = offset
            self._wait_for_capacity(topic, partition, offset, bp.retry_after_s)
        return done

    def _wait_for_capacity(self, topic: str, partition: int, offset: int, delay_s: float) -> None:
        tp = TopicPartition(topic, partition, offset)
        self._consumer.pause([tp])
        self._consumer.seek(tp)  # see _retry_later: rewound, and what was prefetched is dropped
        self._retries[(topic, partition)] = _Retry(offset, 0, time.monotonic(), time.monotonic() + delay_s,
                                                   backpressure=True)
        metrics.BACKPRESSURE_PAUSES.labels(self.service, topic).inc()

    def _handle_one(self, rec: Inbound) -> bool:
        """Handle one record; True if acknowledged (handled, or dead-lettered durably)."""
        try:
            self._call([rec])
            return True
        except Backpressure as bp:
            self._wait_for_capacity(rec.topic, rec.partition, rec.offset, bp.retry_after_s)
            return False
        except Exception as exc:
            if is_retryable(exc) and self._stopping.is_set():
                # Stopping: leave it unacknowledged; the next owner of the partition retries it.
                log.info("stopping: %s@%d/%d left for the next owner (%s)", rec.topic, rec.partition,
                         rec.offset, exc, extra=self._about(rec.raw))
                return False
            if is_retryable(exc) and not self._retried_too_long(rec.raw):
                self._retry_later(rec.raw, exc)
                return False
            return self._give_up(rec.raw, exc)

    def _retried_too_long(self, msg: Any) -> bool:
        retry = self._retry_of(msg)
        return retry is not None and not retry.backpressure and \
            time.monotonic() - retry.first_failed >= self.max_transient_s

    def _retry_of(self, msg: Any) -> _Retry | None:
        retry = self._retries.get((msg.topic(), msg.partition()))
        return retry if retry is not None and retry.offset == msg.offset() else None

    def _give_up(self, msg: Any, exc: BaseException) -> bool:
        """Dead-letter the record; True once the dead letter is durable. If it cannot be written
        the record stays unacknowledged: its partition retries it later (unless stopping: then
        the next owner does), so a record is never skipped without a trace."""
        retry = self._retry_of(msg)
        if self._dead_letter(msg, exc, attempts=(retry.attempts if retry else 0) + 1):
            self._retries.pop((msg.topic(), msg.partition()), None)
            return True
        if not self._stopping.is_set():
            self._retry_later(msg, exc)
        return False

    def _retry_later(self, msg: Any, exc: BaseException) -> None:
        """Pause the record's partition and rewind it to the record; ``_resume_due`` resumes it after
        a capped exponential backoff. The loop keeps polling meanwhile, so the other partitions
        flow and the group does not evict us for exceeding max.poll.interval.ms (sleeping in
        place, as this loop once did, stalled every partition for up to max_transient_s)."""
        topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
        retry = self._retry_of(msg)
        attempts = (retry.attempts if retry else 0) + 1
        first_failed = retry.first_failed if retry else time.monotonic()
        delay = min(self.max_backoff_s, 0.05 * 2 ** (attempts - 1)) * random.uniform(0.5, 1.0)
        tp = TopicPartition(topic, partition, offset)
        self._consumer.pause([tp])
        # Rewind: librdkafka's position is already past this record (and seek purges what was
        # prefetched). If seek fails the position cannot be trusted, so the loop must die rather
        # than risk resuming after the record: KafkaException propagates, the process restarts
        # and the next owner starts from the committed offset, which is never past this record.
        self._consumer.seek(tp)
        self._retries[(topic, partition)] = _Retry(offset, attempts, first_failed, time.monotonic() + delay)
        metrics.transient_retry(self.service, topic, exc)
        log.warning("transient error on %s@%d/%d (attempt %d): %s; partition paused, retry in %.2fs",
                    topic, partition, offset, attempts, exc, delay, extra=self._about(msg))

    def _waiting(self, tp: tuple[str, int]) -> bool:
        retry = self._retries.get(tp)
        return retry is not None and retry.paused

    def _poll_timeout(self, longest: float = 0.1) -> float:
        """How long the next poll may block: ``longest``, or less when a paused partition is due sooner."""
        due = min((r.retry_at for r in self._retries.values() if r.paused), default=None)
        if due is None:
            return longest
        return max(0.001, min(longest, due - time.monotonic()))

    def _resume_due(self) -> None:
        now = time.monotonic()
        due = [(tp, r) for tp, r in self._retries.items() if r.paused and r.retry_at <= now]
        if due:
            self._consumer.resume([TopicPartition(t, p) for (t, p), _r in due])
            for _tp, retry in due:
                retry.paused = False  # kept (attempts, first failure) until its record is acknowledged

    def _store(self, msgs: list[Any], acked: set[tuple[str, int, int]]) -> None:
        """Store, per partition, the offset after the last record of the acknowledged prefix."""
        upto: dict[tuple[str, int], int] = {}
        stopped: set[tuple[str, int]] = set()
        for msg in msgs:
            if msg.error():
                continue
            tp = (msg.topic(), msg.partition())
            if tp in stopped:
                continue
            if (*tp, msg.offset()) in acked:
                upto[tp] = msg.offset() + 1
            else:
                stopped.add(tp)
        if not upto:
            return
        try:
            self._consumer.store_offsets(offsets=[TopicPartition(t, p, o) for (t, p), o in upto.items()])
        except KafkaException as exc:
            # The partition was revoked meanwhile: its new owner redelivers; handlers are idempotent.
            log.info("offsets not stored (%s): %s", upto, exc)

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

    def _verified_tenant(self, msg: Any) -> str:
        """The tenant a dead letter is filed under, which decides who may read and replay its bytes.

        Not the ``tenant`` header: any producer may write any header, so a record could file
        itself (and its bytes) under another tenant. The tenant is the one of the record as it
        decodes under its topic's schema, which is the tenant its handler acted for: on the mesh's
        own topics a service wrote it from an authenticated principal, and only principals the
        topic ACLs admit write ingress. A record that does not decode, or names no valid tenant,
        has none: it goes to the platform's own dead letters (``_system``), claim kept in its headers."""
        try:
            tenant = self._decode(msg).value.get("tenant")
        except Exception:  # undecodable, oversized, wrong schema: nobody vouches for its tenant
            return ""
        # Names starting with '_' are the platform's own (``_system``): no record may file itself there.
        return tenant if isinstance(tenant, str) and _TENANT.match(tenant) and not tenant.startswith("_") else ""

    def _dead_letter(self, msg: Any, exc: BaseException, *, attempts: int) -> bool:
        """Park the original bytes with the reason; True once the broker acknowledged the dead letter."""
        headers = {k: (v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v))
                   for k, v in (msg.headers() or [])}
        error_type = exc.kind if isinstance(exc, AiosError) else type(exc).__name__
        value = msg.value() or b""
        limit = min(self.max_record_bytes, self.producer.MAX_BYTES)
        if len(value) > limit // 2:
            # Too big to travel whole: keep a prefix and say so; the source offset locates the rest.
            headers["aios-truncated"] = f"{len(value)} bytes, sha256 {hashlib.sha256(value).hexdigest()}"
            value = value[: limit // 4]
        record = {"tenant": self._verified_tenant(msg), "service": self.service, "group": self.group,
                  "source_topic": msg.topic(), "partition": msg.partition(), "offset": msg.offset(),
                  "key": (msg.key() or b"")[:1024], "value": value, "headers_json": json.dumps(headers)[:20000],
                  "error_type": error_type, "error_message": str(exc)[:2000],
                  "retryable": is_retryable(exc), "attempts": attempts}
        try:
            with tracing.in_context_of(headers):  # the dead letter stays in its record's (run's) trace
                self.producer.send("deadletters", (msg.key() or b"")[:1024].decode("utf-8", "replace"), record)
            # Acknowledged before the offset may move: a dead letter lost in a crash would be a
            # record skipped without a trace.
            self.producer.flush(self.DEAD_LETTER_FLUSH_S)
        except AiosError as send_error:
            log.error("cannot dead-letter %s@%d/%d (%s: %s): %s; the record stays unacknowledged",
                      msg.topic(), msg.partition(), msg.offset(), error_type, exc, send_error, extra=self._about(msg))
            return False
        metrics.DEAD_LETTERS.labels(self.service, msg.topic(), metrics.bounded("error_type", error_type)).inc()
        metrics.RECORDS.labels(self.service, msg.topic(), "dead_letter").inc()
        log.warning("dead-lettered %s@%d/%d: %s: %s", msg.topic(), msg.partition(), msg.offset(), error_type, exc,
                    extra=self._about(msg))
        return True

    def _about(self, msg: Any) -> dict[str, str]:
        """The run id (on a run-keyed topic), claimed tenant and trace id of a raw record, for a log
        line about it: such lines are written outside the handler's log context, and a log query
        for the run must find them beside its trace."""
        if msg is None:  # a record handed over without its raw message (tests)
            return {}
        headers = {k: (v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v))
                   for k, v in (msg.headers() or [])}
        role = self.catalog.role_of(msg.topic())
        run_keyed = role is not None and self.catalog.spec(role).key == "run_id"
        parts = headers.get("traceparent", "").split("-")
        return {"run_id": (msg.key() or b"").decode("utf-8", "replace")[:200] if run_keyed else "",
                "tenant": headers.get("tenant", ""), "trace_id": parts[1] if len(parts) == 4 else ""}

    def _report_lag(self) -> None:
        """Records behind the high watermark per assigned partition, into aios_consumer_lag_records;
        paused partitions by reason and the records held back for capacity (the admission queue).
        Runs in the loop's own thread (the consumer is not thread-safe); cached watermarks, no I/O."""
        paused = {"backpressure": 0, "retry": 0}
        queued = 0
        try:
            for tp in self._consumer.position(self._consumer.assignment()):
                lo, hi = self._consumer.get_watermark_offsets(TopicPartition(tp.topic, tp.partition),
                                                              cached=True) or (0, 0)
                if hi < 0:
                    continue  # not fetched yet: nothing known
                # Nothing consumed yet on this assignment: everything retained is behind.
                position = tp.offset if tp.offset >= 0 else max(lo, 0)
                lag = max(0, hi - position)
                metrics.CONSUMER_LAG.labels(self.service, tp.topic, str(tp.partition)).set(lag)
                retry = self._retries.get((tp.topic, tp.partition))
                if retry is not None and retry.paused:
                    # A paused partition is rewound to its waiting record: its lag is what waits.
                    paused["backpressure" if retry.backpressure else "retry"] += 1
                    queued += lag if retry.backpressure else 0
            metrics.report_paused(self.service, paused["backpressure"], paused["retry"], queued)
        except KafkaException as exc:
            log.debug("lag not reported: %s", exc)
