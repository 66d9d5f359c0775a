"""The delivery contract without holes, on the real embedded broker: one publish path
that encodes and size-checks every record, only size errors make a record bad, a fatal
producer error or a dead consumer loop stops the process with a non-zero exit, a dead
letter is durable before the offset moves, and a transient error pauses only its own
partition."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Sequence
from dataclasses import FrozenInstanceError
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition

from infra.stack import REPO
from services.common import tracing
from services.common.catalog import Catalog
from services.common.codec import AvroCodec
from services.common.errors import BadRecord, RecordTooLarge, TransientError
from services.common.kafka import ConsumerLoop, Inbound, MeshProducer, OutRecord
from tests.conftest import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def ingress(subject: str, text: str = "") -> dict[str, Any]:
    return {"tenant": "t1", "source": "test", "type": "support.message.received", "subject": subject,
            "data_json": json.dumps({"text": text or subject}), "workflow": None}


class Wiring:
    """Catalog, codec, producer and consumer loops of one test; loops stopped at the end."""

    def __init__(self, env: dict[str, str], prefix: str) -> None:
        self.bootstrap = env["AIOS_KAFKA_BOOTSTRAP"]
        self.prefix = prefix
        self.catalog = Catalog(prefix)
        self.codec = AvroCodec(self.catalog.schemas)
        self.producer = MeshProducer(self.bootstrap, self.catalog, self.codec)
        self.loops: list[ConsumerLoop] = []
        self._raw = Producer({"bootstrap.servers": self.bootstrap, "log_level": 0})

    def consume(self, group: str, roles: list[str], handler: Any, *, producer: MeshProducer | None = None,
                **kw: Any) -> ConsumerLoop:
        loop = ConsumerLoop(service="test", group=self.prefix + group, roles=roles, handler=handler,
                            bootstrap=self.bootstrap, catalog=self.catalog, codec=self.codec,
                            producer=producer or self.producer, **kw)
        self.loops.append(loop.start())
        return loop

    def to_partition(self, partition: int, subject: str) -> None:
        """One ingress record on an explicit partition (the test needs two partitions for sure)."""
        value = self.codec.encode("aiosmesh.v1.IngressEvent", {
            **ingress(subject), "event_id": uuid.uuid4().hex, "occurred_at": 0})
        self._raw.produce(self.catalog.topic("ingress"), key=subject, value=value, partition=partition,
                          headers=[("aios-schema", "aiosmesh.v1.IngressEvent"), ("tenant", "t1")])
        assert self._raw.flush(10) == 0

    def committed(self, group: str, role: str, partition: int) -> int:
        """The group's committed offset of one partition (negative: nothing committed)."""
        probe = Consumer({"bootstrap.servers": self.bootstrap, "group.id": self.prefix + group, "log_level": 0})
        try:
            [tp] = probe.committed([TopicPartition(self.catalog.topic(role), partition)], timeout=10)
            return int(tp.offset)
        finally:
            probe.close()

    def close(self) -> None:
        for loop in self.loops:
            loop.stop()
        self.producer.close()


# -- 1. one publish path ----------------------------------------------------------------------------------
def test_encode_fills_event_id_headers_and_trace_context_and_send_record_replays_it(wiring: Wiring) -> None:
    tracing.configure_tracing("test")
    with tracing.tracer().start_as_current_span("publish") as span:
        out = wiring.producer.encode("ingress", "cust-1", ingress("hello"), headers={"x-extra": "1"})
        trace_id = format(span.get_span_context().trace_id, "032x")
    assert isinstance(out, OutRecord) and out.topic == wiring.catalog.topic("ingress") and out.key == "cust-1"
    assert out.event_id and out.headers["event-id"] == out.event_id
    assert out.headers["aios-schema"] == "aiosmesh.v1.IngressEvent" and out.headers["tenant"] == "t1"
    assert out.headers["x-extra"] == "1" and trace_id in out.headers["traceparent"]
    schema, decoded = wiring.codec.decode(out.value)
    assert schema == "aiosmesh.v1.IngressEvent" and decoded["event_id"] == out.event_id and decoded["occurred_at"]
    with pytest.raises(FrozenInstanceError):
        out.key = "other"  # type: ignore[misc]
    # The outbox form: JSON-safe, value base64, and back to the same record.
    stored = json.loads(json.dumps(out.to_json()))
    assert OutRecord.from_json(stored) == out

    seen: list[Inbound] = []
    sent = wiring.producer.send("ingress", "cust-1", ingress("direct"))
    wiring.producer.send_record(OutRecord.from_json(stored))  # replaying an outbox
    wiring.producer.flush()
    wiring.consume("main", ["ingress"], seen.extend)
    wait_for(lambda: len(seen) == 2, message="the sent and the replayed record")
    by_subject = {r.value["subject"]: r for r in seen}
    assert by_subject["hello"].idempotency_key == out.event_id and by_subject["hello"].headers["x-extra"] == "1"
    assert by_subject["direct"].value["event_id"] == sent.event_id


def test_a_record_over_the_limit_is_refused_at_encode_with_a_message_that_says_how_to_fix_it(
        wiring: Wiring) -> None:
    big = ingress("big", text="x" * (MeshProducer.MAX_BYTES + 10))
    with pytest.raises(RecordTooLarge) as caught:
        wiring.producer.encode("ingress", "k", big)
    message = str(caught.value)
    assert isinstance(caught.value, BadRecord)
    for part in (wiring.catalog.topic("ingress"), "aiosmesh.v1.IngressEvent", str(MeshProducer.MAX_BYTES),
                 "reference"):
        assert part in message, (part, message)
    # The size is named too (whatever the encoding added to the text).
    assert any(tok.isdigit() and int(tok) > MeshProducer.MAX_BYTES for tok in message.split()), message


# -- 2. only a size error makes a record bad --------------------------------------------------------------
def test_librdkafka_size_error_is_a_bad_record(wiring: Wiring) -> None:
    huge = OutRecord(wiring.catalog.topic("ingress"), "k", b"x" * (MeshProducer.MAX_BYTES + 100), {}, "e1")
    with pytest.raises(RecordTooLarge):
        wiring.producer.send_record(huge)


def test_a_produce_error_that_is_not_about_size_is_transient_not_a_bad_record(wiring: Wiring) -> None:
    """A real librdkafka error other than size: a second producer with the same transactional id
    fences the first, whose next produce or flush fails (fatal or "erroneous state", depending on
    when the fence is seen). The record is fine; the producer is not."""
    txn = f"{wiring.prefix}txn"
    fenced = MeshProducer(wiring.bootstrap, wiring.catalog, wiring.codec, extra={"transactional.id": txn})
    fenced._producer.init_transactions(10)  # the test reaches in: MeshProducer itself is not transactional
    fenced._producer.begin_transaction()
    fenced.send("ingress", "k", ingress("before"))
    fenced.flush(10)
    newer = Producer({"bootstrap.servers": wiring.bootstrap, "transactional.id": txn, "log_level": 0})
    newer.init_transactions(10)
    with pytest.raises(TransientError) as caught:
        fenced.send("ingress", "k", ingress("after"))
        fenced.flush(5)
    assert not isinstance(caught.value, BadRecord)
    with pytest.raises(TransientError):
        fenced.send("ingress", "k", ingress("after, again"))


def test_error_callback_marks_only_fatal_errors(wiring: Wiring) -> None:
    wiring.producer.on_error(KafkaError(KafkaError._TRANSPORT, "broker went away"))
    assert not wiring.producer.fatal
    wiring.producer.on_error(KafkaError(KafkaError._FATAL, "out of sequence", fatal=True))
    assert wiring.producer.fatal and "out of sequence" in wiring.producer.fatal


# -- 3. the dead letter is part of the effect ---------------------------------------------------------------
class DeadLetterOutage(MeshProducer):
    """A producer whose dead-letter writes fail while ``down`` is set (the topic unreachable)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.down = threading.Event()
        self.down.set()
        self.refused = 0

    def send(self, role: str, key: str, record: dict[str, Any], **kw: Any) -> Any:
        if role == "deadletters" and self.down.is_set():
            self.refused += 1
            raise TransientError("dead-letter topic unavailable (test)")
        return super().send(role, key, record, **kw)


def _poison_then_good(wiring: Wiring) -> tuple[int, int]:
    """A non-Avro record, then a good one, on partition 0; their offsets."""
    topic = wiring.catalog.topic("ingress")
    offsets: list[int] = []
    raw = Producer({"bootstrap.servers": wiring.bootstrap, "log_level": 0})
    for value in (b"not avro at all", wiring.codec.encode("aiosmesh.v1.IngressEvent", {
            **ingress("after-poison"), "event_id": uuid.uuid4().hex, "occurred_at": 0})):
        raw.produce(topic, key="k", value=value, partition=0, headers=[("tenant", "t1")],
                    on_delivery=lambda err, msg: offsets.append(msg.offset()))
        raw.flush(10)
    assert len(offsets) == 2
    return offsets[0], offsets[1]


def test_offset_does_not_move_past_a_record_whose_dead_letter_was_not_written(wiring: Wiring) -> None:
    poison, good = _poison_then_good(wiring)
    outage = DeadLetterOutage(wiring.bootstrap, wiring.catalog, wiring.codec)
    handled: list[str] = []
    dead: list[Inbound] = []
    wiring.consume("main", ["ingress"], lambda recs: handled.extend(r.value["subject"] for r in recs),
                   producer=outage, max_backoff_s=0.2)
    # Retried (the partition waits), not skipped: several attempts while the topic is down.
    wait_for(lambda: outage.refused >= 3, message="repeated dead-letter attempts while the topic is down")
    assert handled == [], "nothing after the poison record may be handled before its dead letter is written"
    assert wiring.committed("main", "ingress", 0) <= poison
    outage.down.clear()
    wiring.consume("dlq", ["deadletters"], dead.extend)
    wait_for(lambda: handled and dead, message="dead letter written, then the next record handled")
    assert bytes(dead[0].value["value"]) == b"not avro at all" and dead[0].value["offset"] == poison
    wait_for(lambda: wiring.committed("main", "ingress", 0) == good + 1, message="offset past both records")
    outage.close()


def test_a_dead_letter_not_written_while_stopping_is_left_for_the_next_owner(wiring: Wiring) -> None:
    poison, good = _poison_then_good(wiring)
    outage = DeadLetterOutage(wiring.bootstrap, wiring.catalog, wiring.codec)
    first = wiring.consume("main", ["ingress"], lambda recs: None, producer=outage)
    wait_for(lambda: outage.refused >= 1, message="a dead-letter attempt")
    first.stop()
    assert wiring.committed("main", "ingress", 0) <= poison
    outage.close()
    dead: list[Inbound] = []
    handled: list[str] = []
    wiring.consume("main", ["ingress"], lambda recs: handled.extend(r.value["subject"] for r in recs))
    wiring.consume("dlq", ["deadletters"], dead.extend)
    wait_for(lambda: handled == ["after-poison"] and len(dead) == 1, message="the next owner finishes the work")
    assert dead[0].value["offset"] == poison


# -- 4. a transient error pauses only its own partition -----------------------------------------------------
def test_a_partition_retrying_a_transient_error_does_not_stall_the_others(wiring: Wiring) -> None:
    successes: list[str] = []
    failures: list[str] = []
    dead: list[Inbound] = []
    lock = threading.Lock()

    def handler(records: Sequence[Inbound]) -> None:
        with lock:
            for rec in records:
                subject = rec.value["subject"]
                if subject == "slow" and "other" not in successes:
                    failures.append(subject)
                    raise TransientError("dependency restarting (test)")
                successes.append(subject)

    wiring.to_partition(0, "slow")
    wiring.consume("main", ["ingress"], handler, max_transient_s=25.0, max_backoff_s=0.5)
    wiring.consume("dlq", ["deadletters"], dead.extend)
    wait_for(lambda: failures, message="'slow' failing")
    wiring.to_partition(1, "other")  # arrives while "slow" is failing
    wait_for(lambda: "slow" in successes, timeout_s=20, message="'other' handled while 'slow' waited, then 'slow'")
    assert successes == ["other", "slow"] and not dead


def test_same_batch_other_partitions_are_acked_while_one_waits_and_its_order_is_kept(wiring: Wiring) -> None:
    gate = threading.Event()
    successes: list[str] = []
    lock = threading.Lock()

    def handler(records: Sequence[Inbound]) -> None:
        with lock:
            for rec in records:  # in order, stopping at the first failure, like a real handler
                subject = rec.value["subject"]
                if subject == "a1" and not gate.is_set():
                    raise TransientError("dependency restarting (test)")
                successes.append(subject)

    for partition, subject in ((0, "a1"), (0, "a2"), (1, "b1"), (1, "b2")):
        wiring.to_partition(partition, subject)
    wiring.consume("main", ["ingress"], handler, max_transient_s=25.0, max_backoff_s=0.3)
    # b1 and b2 are acknowledged (committed) while a1 keeps failing; a2 waits behind a1.
    wait_for(lambda: wiring.committed("main", "ingress", 1) == 2, timeout_s=15,
             message="partition 1 committed while partition 0 retries")
    assert "a2" not in successes and wiring.committed("main", "ingress", 0) <= 0
    gate.set()
    wait_for(lambda: wiring.committed("main", "ingress", 0) == 2, message="partition 0 done after the cure")
    assert [s for s in successes if s.startswith("a")] == ["a1", "a2"]
    # b1 and b2 may have been handled twice (a failed batch is redone one record at a time:
    # at least once), but never b2 before b1.
    assert list(dict.fromkeys(s for s in successes if s.startswith("b"))) == ["b1", "b2"]


def test_a_record_failing_past_max_transient_is_dead_lettered_retryable_and_the_partition_goes_on(
        wiring: Wiring) -> None:
    successes: list[str] = []
    dead: list[Inbound] = []

    def handler(records: Sequence[Inbound]) -> None:
        for rec in records:
            if rec.value["subject"] == "doomed":
                raise TransientError("never comes back (test)")
            successes.append(rec.value["subject"])

    wiring.to_partition(0, "doomed")
    wiring.to_partition(0, "next")
    wiring.consume("main", ["ingress"], handler, max_transient_s=1.0, max_backoff_s=0.2)
    wiring.consume("dlq", ["deadletters"], dead.extend)
    wait_for(lambda: successes == ["next"] and dead, message="doomed dead-lettered, next handled")
    assert dead[0].value["retryable"] is True and dead[0].value["attempts"] >= 2
    assert dead[0].value["error_type"] == "TransientError"


# -- 6. a dead consumer loop or a fatal producer stops the process non-zero ----------------------------------
_SERVICE = """
import sys, threading
from confluent_kafka import KafkaError
from services.common.runtime import ServiceRuntime
from services.common.settings import MeshSettings

mode = sys.argv[1]
rt = ServiceRuntime("exit-test", MeshSettings())

class Crash(BaseException):
    '''Escapes the loop's error handling: a bug in the loop itself.'''

def handler(records):
    if mode == "crash":
        raise Crash("the consumer loop dies")

rt.consume("exit-test", ["ingress"], handler)
if mode == "fatal":
    def fence():
        rt.consumers[0].assigned.wait(30)
        rt.producer.on_error(KafkaError(KafkaError._FATAL, "test: producer fenced", fatal=True))
    threading.Thread(target=fence, daemon=True).start()
rt.run_until_stopped()
"""


def _run_service(env: dict[str, str], mode: str, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-c", _SERVICE, mode], cwd=REPO, stdout=out,
                                stderr=subprocess.STDOUT, env={**os.environ, **env, "AIOS_LOG_FORMAT": "text"})


def _exit_code(proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 60) -> int:
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        raise AssertionError(f"still running after {timeout_s}s:\n{log.read_text()[-3000:]}") from None


@pytest.mark.parametrize("mode", ["crash", "fatal"])
def test_a_dead_consumer_loop_or_a_fatal_producer_exits_non_zero(
        wiring: Wiring, mesh_env: dict[str, str], tmp_path: Path, mode: str) -> None:
    if mode == "crash":
        wiring.producer.send("ingress", "k", ingress("kills the loop"))
        wiring.producer.flush()
    log = tmp_path / "service.log"
    proc = _run_service(mesh_env, mode, log)
    code = _exit_code(proc, log)
    assert code == 70, f"exit {code}:\n{log.read_text()[-3000:]}"
    why = "consumer loop" if mode == "crash" else "fenced"
    assert why in log.read_text(), log.read_text()[-3000:]


def test_sigterm_still_exits_zero(mesh_env: dict[str, str], tmp_path: Path) -> None:
    log = tmp_path / "service.log"
    proc = _run_service(mesh_env, "idle", log)
    try:
        wait_for(lambda: "exit-test ready" in log.read_text(), timeout_s=45, message="service ready")
        os.kill(proc.pid, signal.SIGTERM)
        code = _exit_code(proc, log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert code == 0, log.read_text()[-3000:]
