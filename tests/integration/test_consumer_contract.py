"""The one consumer loop's delivery contract, on the real embedded broker."""

from __future__ import annotations

import json
import struct
import threading
from collections.abc import Sequence

import pytest

from services.common.catalog import Catalog
from services.common.codec import MARKER, AvroCodec
from services.common.errors import TransientError
from services.common.kafka import ConsumerLoop, Inbound, MeshProducer
from tests.conftest import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


def ingress(subject: str) -> dict[str, object]:
    return {"tenant": "t1", "source": "test", "type": "support.message.received", "subject": subject,
            "data_json": json.dumps({"text": subject}), "workflow": None}


@pytest.fixture
def wiring(mesh_env: dict[str, str], prefix: str):  # type: ignore[no-untyped-def]
    catalog = Catalog(prefix)
    codec = AvroCodec(catalog.schemas)
    producer = MeshProducer(mesh_env["AIOS_KAFKA_BOOTSTRAP"], catalog, codec)
    loops: list[ConsumerLoop] = []

    def consume(group: str, roles: list[str], handler, **kw) -> ConsumerLoop:  # type: ignore[no-untyped-def]
        loop = ConsumerLoop(service="test", group=prefix + group, roles=roles, handler=handler,
                            bootstrap=mesh_env["AIOS_KAFKA_BOOTSTRAP"], catalog=catalog, codec=codec,
                            producer=producer, **kw)
        loops.append(loop.start())
        return loop

    yield catalog, codec, producer, consume
    for loop in loops:
        loop.stop()


def test_bad_records_are_dead_lettered_with_reason_and_the_next_good_one_is_processed(wiring) -> None:  # type: ignore[no-untyped-def]
    catalog, codec, producer, consume = wiring
    topic = catalog.topic("ingress")
    unknown_fp = MARKER + struct.pack("<Q", 12345) + b"\x00"
    producer.send_raw(topic, "a", b"this is not avro", {"tenant": "t1"})
    producer.send_raw(topic, "a", unknown_fp, {"tenant": "t1"})
    producer.send_raw(topic, "a", codec.encode("aiosmesh.v1.StepResult", {
        "event_id": "x", "tenant": "t1", "occurred_at": 0, "run_id": "r", "step_id": "s", "attempt": 1,
        "idempotency_key": "k", "status": "ok", "output_json": None, "error_type": None, "error_message": None,
        "retryable": False, "duration_ms": 0.0, "cost": 0.0, "executor": "e", "replayed": False}), {})
    producer.send("ingress", "a", ingress("good"))
    producer.flush()
    seen: list[Inbound] = []
    dead: list[Inbound] = []
    consume("main", ["ingress"], seen.extend)
    consume("dlq", ["deadletters"], dead.extend)
    wait_for(lambda: len(seen) == 1 and len(dead) == 3, message="1 good record and 3 dead letters")
    assert seen[0].value["subject"] == "good"
    by_value = {bytes(d.value["value"]): (d.value["error_type"], d.value["error_message"]) for d in dead}
    assert by_value[b"this is not avro"][0] == "BadRecord"
    assert "not an Avro single-object record" in by_value[b"this is not avro"][1]
    assert by_value[unknown_fp][0] == "UnknownSchema"
    assert "unknown writer schema fingerprint" in by_value[unknown_fp][1]
    assert all(d.value["source_topic"] == topic for d in dead)
    wrong = [d for d in dead if "carries" in d.value["error_message"]]
    assert wrong and "aiosmesh.v1.IngressEvent" in wrong[0].value["error_message"]


def test_oversized_record_is_dead_lettered(wiring) -> None:  # type: ignore[no-untyped-def]
    catalog, codec, producer, consume = wiring
    big = ingress("big")
    big["data_json"] = json.dumps({"text": "x" * 5000})
    producer.send("ingress", "a", big)
    producer.send("ingress", "a", ingress("small"))
    producer.flush()
    seen: list[Inbound] = []
    dead: list[Inbound] = []
    consume("main", ["ingress"], seen.extend, max_record_bytes=2048)
    consume("dlq", ["deadletters"], dead.extend)
    wait_for(lambda: seen and dead, message="small record handled and big one dead-lettered")
    assert [s.value["subject"] for s in seen] == ["small"]
    assert "exceeds the 2048-byte limit" in dead[0].value["error_message"]


def test_transient_errors_are_retried_then_succeed_and_keep_order(wiring) -> None:  # type: ignore[no-untyped-def]
    catalog, codec, producer, consume = wiring
    for i in range(3):
        producer.send("ingress", "same-key", ingress(f"m{i}"))
    producer.flush()
    calls: list[str] = []
    failures = {"m1": 2}
    lock = threading.Lock()

    def handler(records: Sequence[Inbound]) -> None:
        with lock:
            for rec in records:
                subject = rec.value["subject"]
                if failures.get(subject, 0) > 0:
                    failures[subject] -= 1
                    raise TransientError("redis briefly down")
                calls.append(subject)

    consume("main", ["ingress"], handler)
    wait_for(lambda: "m2" in calls, message="all three handled")
    assert [c for c in calls if c != "m0"][-2:] == ["m1", "m2"]  # m1 before m2: order per key kept


def test_permanent_handler_error_dead_letters_only_that_record(wiring) -> None:  # type: ignore[no-untyped-def]
    catalog, codec, producer, consume = wiring
    for name in ("ok1", "poison", "ok2"):
        producer.send("ingress", "k", ingress(name))
    producer.flush()
    handled: list[str] = []
    dead: list[Inbound] = []

    def handler(records: Sequence[Inbound]) -> None:
        for rec in records:
            if rec.value["subject"] == "poison":
                raise ValueError("cannot handle this record")
        handled.extend(r.value["subject"] for r in records)

    consume("main", ["ingress"], handler)
    consume("dlq", ["deadletters"], dead.extend)
    wait_for(lambda: "ok2" in handled and dead, message="poison dead-lettered, neighbours handled")
    assert "poison" not in handled and set(handled) >= {"ok1", "ok2"}
    assert dead[0].value["error_type"] == "ValueError" and "cannot handle" in dead[0].value["error_message"]
    assert codec.decode(bytes(dead[0].value["value"]))[1]["subject"] == "poison"


def test_consumer_lag_is_reported_per_partition(wiring) -> None:  # type: ignore[no-untyped-def]
    from prometheus_client import REGISTRY

    catalog, codec, producer, consume = wiring
    producer.send("ingress", "k", ingress("one"))
    producer.flush()
    seen: list[Inbound] = []
    consume("lag", ["ingress"], seen.extend)
    topic = catalog.topic("ingress")

    def lag_samples() -> list[float]:
        return [s.value for metric in REGISTRY.collect() if metric.name == "aios_consumer_lag_records"
                for s in metric.samples if s.labels.get("topic") == topic]

    samples = wait_for(lag_samples, timeout_s=30, message="aios_consumer_lag_records samples for the test topic")
    assert seen and min(samples) == 0.0  # everything consumed: no partition behind


def test_a_dead_letter_is_filed_under_the_tenant_the_platform_verified(wiring) -> None:  # type: ignore[no-untyped-def]
    """The ``tenant`` header is the producer's claim; the tenant a dead letter is filed under (and
    so who may read and replay its bytes) is the one of the record as it decoded under its topic's
    schema, which is the tenant its handler acted for; none when it does not decode."""
    catalog, codec, producer, consume = wiring
    topic = catalog.topic("ingress")
    forged = codec.encode(catalog.spec("ingress").schema, {
        "event_id": "forged", "occurred_at": 0, **ingress("poison")})
    producer.send_raw(topic, "a", forged, {"tenant": "victim"})
    producer.send_raw(topic, "a", b"not avro, claims a tenant", {"tenant": "victim"})
    # A record naming the platform's own dead-letter tenant may not file itself there.
    platform = codec.encode(catalog.spec("ingress").schema, {
        "event_id": "platform", "occurred_at": 0, **ingress("poison"), "tenant": "_system"})
    producer.send_raw(topic, "a", platform, {"tenant": "_system"})
    producer.flush()
    dead: list[Inbound] = []

    def handler(records: Sequence[Inbound]) -> None:
        if any(r.value["subject"] == "poison" for r in records):
            raise ValueError("cannot handle this record")

    consume("main", ["ingress"], handler)
    consume("dlq", ["deadletters"], dead.extend)
    wait_for(lambda: len(dead) == 3, message="the three records dead-lettered")
    tenants = sorted((d.value["error_type"], d.value["tenant"]) for d in dead)
    assert tenants == [("BadRecord", ""), ("ValueError", ""), ("ValueError", "t1")], tenants
    assert all(d.headers["tenant"] == d.value["tenant"] for d in dead)  # the envelope says the same
    claims = sorted(json.loads(d.value["headers_json"])["tenant"] for d in dead)  # the claim is kept
    assert claims == ["_system", "victim", "victim"], claims


def test_a_dead_letter_stays_in_its_run_and_its_log_line_names_the_run(wiring, caplog) -> None:  # type: ignore[no-untyped-def]
    """A dead letter is about a run: its log line carries the run id, tenant and trace id (a log query
    and the trace meet), and the dead letter record continues the run's trace."""
    from services.planner import wire

    catalog, codec, producer, consume = wiring
    trace_id = "5a" * 16
    producer.send("commands", "run-dead-1", wire.command("t1", "run-dead-1", "api:ann", "CancelRun", {"reason": "x"}),
                  headers={"traceparent": f"00-{trace_id}-{'7b' * 8}-01"})
    producer.flush()
    dead: list[Inbound] = []

    def handler(records: Sequence[Inbound]) -> None:
        raise ValueError("cannot handle this command")

    caplog.set_level("WARNING", logger="services.common.kafka")
    consume("main", ["commands"], handler)
    consume("dlq", ["deadletters"], dead.extend)
    wait_for(lambda: dead, message="the command dead-lettered")
    [line] = [r for r in caplog.records if r.getMessage().startswith("dead-lettered")]
    assert (line.run_id, line.tenant, line.trace_id) == ("run-dead-1", "t1", trace_id)  # type: ignore[attr-defined]
    assert dead[0].headers["traceparent"].split("-")[1] == trace_id
