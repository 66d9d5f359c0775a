"""Pure rules of the memory service: validation, key naming, memory-write
interpretation (the typed MemoryWrite v2 body), episode shaping, erasure plans
and the knowledge-base file."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path
from typing import Any

import fastavro
import pytest
import yaml
from fastavro.schema import to_parsing_canonical_form

from services.common.catalog import SCHEMA_DIR, Catalog
from services.common.codec import MARKER, AvroCodec, crc64_avro
from services.common.errors import BadRecord, InvalidArgument
from services.common.uow import marker_key
from services.memory import domain
from services.memory.domain import Episode, FactWrite, WorkingWrite
from services.planner import wire
from services.planner.domain.state import RunEnded, RunState, StepState

KB_FILE = Path(__file__).resolve().parents[2] / "services/memory/knowledge/banking_kb.yaml"
CATEGORIES = Path(__file__).resolve().parents[2] / "tools" / "data" / "banking77" / "categories.json"

pytestmark = pytest.mark.timeout(10)


def test_keys_carry_the_tenant_as_a_hash_tag() -> None:
    keys = [domain.vector_set_key("acme", "kb"), domain.item_key("acme", "kb", "a:1"),
            domain.subject_key("acme", "customer:9"), domain.fact_key("acme", "x"),
            domain.fact_history_key("acme", "x"), domain.episodes_key("acme"),
            domain.working_key("acme", "w"), marker_key("acme", "e1")]
    assert all(k.startswith("aios:{acme}:") for k in keys)
    assert len(set(keys)) == len(keys)
    assert domain.vector_set_key("a", "kb") != domain.vector_set_key("b", "kb")


@pytest.mark.parametrize("bad", ["", "a{b}", "a:b", "x" * 65, "with space"])
def test_names_reject_what_would_break_key_isolation(bad: str) -> None:
    with pytest.raises(InvalidArgument, match="tenant"):
        domain.require_name(bad, "tenant")


def test_names_accept_ordinary_names() -> None:
    assert domain.require_name("acme-bank_1.eu", "collection") == "acme-bank_1.eu"


@pytest.mark.parametrize("k", [0, -1, 51])
def test_k_out_of_range_says_the_range(k: int) -> None:
    with pytest.raises(InvalidArgument, match="between 1 and 50"):
        domain.require_k(k)


def test_query_latency_class_and_limits() -> None:
    with pytest.raises(InvalidArgument, match="query is required"):
        domain.require_query("   ")
    assert domain.latency_class_or_default("") == "interactive"
    assert domain.latency_class_or_default("bulk") == "bulk"
    with pytest.raises(InvalidArgument, match="interactive, bulk"):
        domain.latency_class_or_default("fast")
    assert domain.episode_limit_or_default(0) == domain.DEFAULT_EPISODE_LIMIT
    with pytest.raises(InvalidArgument):
        domain.episode_limit_or_default(100_000)
    with pytest.raises(InvalidArgument, match="-1"):
        domain.require_expected_version(-2)


def test_json_fields_must_parse_and_be_objects() -> None:
    assert domain.parse_json_field("metadata_json", "") == {}
    assert domain.parse_json_field("value_json", "[1, 2]", want_object=False) == [1, 2]
    with pytest.raises(InvalidArgument, match="metadata_json is not valid JSON"):
        domain.parse_json_field("metadata_json", "{nope")
    with pytest.raises(InvalidArgument, match="must be a JSON object"):
        domain.parse_json_field("provenance_json", "[]")


def test_prepare_item_generates_ids_and_validates() -> None:
    item = domain.prepare_item("", "hello", '{"b": 1, "a": 2}', "customer:1", "", new_id=lambda: "gen1")
    assert item.id == "gen1"
    assert item.metadata_json == '{"a":2,"b":1}'
    assert json.loads(domain.vector_attributes(item)) == {"a": 2, "b": 1, "subject": "customer:1"}
    with pytest.raises(InvalidArgument, match="text is required"):
        domain.prepare_item("x", " ", "", "", "")
    with pytest.raises(InvalidArgument, match="item id"):
        domain.prepare_item("bad id", "t", "", "", "")
    with pytest.raises(InvalidArgument, match="whitespace"):
        domain.prepare_item("x", "t", "", "two words", "")


def test_item_count_and_unique_ids() -> None:
    with pytest.raises(InvalidArgument, match="at least one"):
        domain.require_item_count(0)
    with pytest.raises(InvalidArgument, match="at most"):
        domain.require_item_count(domain.MAX_ITEMS_PER_REMEMBER + 1)
    a = domain.prepare_item("a", "t", "", "", "")
    with pytest.raises(InvalidArgument, match="twice"):
        domain.require_unique_ids([a, a])


def test_vectors_must_match_texts_and_dimension() -> None:
    domain.check_vectors([[0.0] * 384, [0.0] * 384], 2)
    with pytest.raises(ValueError, match="2 texts"):
        domain.check_vectors([[0.0] * 384], 2)
    with pytest.raises(ValueError, match="768-dim"):
        domain.check_vectors([[0.0] * 768], 1)


NS = "aiosmesh.v1"
PROVENANCE = {"service": "planner", "run_id": "r1", "step_id": None}


def _write(kind: str, body: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A decoded MemoryWrite v2: the body union as (full record name, fields)."""
    record: dict[str, Any] = {"event_id": "e1", "tenant": "acme", "occurred_at": 1700, "run_id": None,
                              "subject": None, "provenance": dict(PROVENANCE), "body": (f"{NS}.{kind}", body)}
    record.update(extra)
    return record


def _episode(**fields: Any) -> dict[str, Any]:
    body = {"run_id": "r1", "workflow": "refund", "workflow_version": 3, "outcome": "completed", "failure": None,
            "steps": [], "cost": 0.0, "duration_ms": 10, "trigger": None}
    body.update(fields)
    return body


def test_episode_keeps_the_typed_fields_and_the_failure_reason() -> None:
    declined = {"type": "PermanentError", "message": "card declined", "retryable": False}
    body = _episode(outcome="failed", failure={"type": "RunFailed", "message": "step pay failed: card declined",
                                               "retryable": False},
                    steps=[{"step_id": "pay", "status": "failed", "attempts": 2, "failure": declined, "cost": 0.5},
                           {"step_id": "notify", "status": "skipped", "attempts": 0, "failure": None, "cost": 0.0}],
                    cost=0.5, duration_ms=1234, trigger="card.blocked")
    ep = domain.interpret_write(_write("Episode", body, subject="customer:7"))
    assert isinstance(ep, Episode)
    assert (ep.run_id, ep.workflow, ep.workflow_version, ep.outcome, ep.recorded_at_ms, ep.subject) == \
        ("r1", "refund", 3, "failed", 1700, "customer:7")
    assert ep.failure == domain.Failure("RunFailed", "step pay failed: card declined")
    assert ep.steps[0] == domain.EpisodeStep("pay", "failed", 2, domain.Failure("PermanentError", "card declined"),
                                             0.5)
    assert ep.provenance == domain.Provenance("planner", "r1")
    kept = json.loads(ep.content_json)
    assert kept["failure_reason"] == "step pay failed: card declined"
    assert kept["failure"] == {"type": "RunFailed", "message": "step pay failed: card declined", "retryable": False}
    assert kept["steps"][0]["failure"]["message"] == "card declined" and kept["steps"][1]["failure"] is None
    assert (kept["cost"], kept["duration_ms"], kept["trigger"], kept["workflow_version"]) == \
        (0.5, 1234, "card.blocked", 3)
    assert "subject" not in kept and "provenance" not in kept


def test_failure_reason_falls_back_to_the_failed_step_and_is_empty_on_success() -> None:
    step = {"step_id": "pay", "status": "failed", "attempts": 1, "cost": 0.0,
            "failure": {"type": "StepTimeout", "message": "no answer in 30 s", "retryable": True}}
    ep = domain.interpret_write(_write("Episode", _episode(outcome="failed", steps=[step])))
    assert isinstance(ep, Episode) and ep.failure_reason == "no answer in 30 s"
    ok = domain.interpret_write(_write("Episode", _episode()))
    assert isinstance(ok, Episode) and ok.failure is None and json.loads(ok.content_json)["failure_reason"] == ""


def test_episode_written_by_the_planner_keeps_its_failure_reason_through_the_codec() -> None:
    """The planner's own memory write (wire.records_for a RunEnded), encoded and decoded as on Kafka:
    before the typed contract the planner wrote ``error`` and memory read ``failure_reason``."""
    run = RunState(run_id="r9", tenant="acme", workflow="refund", version=2, input={"card": "4111"},
                   status="failed", created_at=1000.0, finished_at=1800.0, cost=0.25, trigger="refund.requested",
                   steps={"pay": StepState(id="pay", tool="bank.pay", status="failed", attempt=3,
                                           error="card declined", error_type="PermanentError", cost=0.25)})
    [(role, record)] = [r for r in wire.records_for(run, RunEnded("failed", "step pay failed: card declined"))
                        if r[0] == "memory_writes"]
    codec = AvroCodec(Catalog("").schemas)
    schema, decoded = codec.decode(codec.encode("aiosmesh.v1.MemoryWrite",
                                                {"event_id": "e9", "occurred_at": 1800, **record}))
    assert (role, schema, decoded["body"][0]) == ("memory_writes", "aiosmesh.v1.MemoryWrite", f"{NS}.Episode")
    ep = domain.interpret_write(decoded)
    assert isinstance(ep, Episode)
    assert ep.failure_reason == "step pay failed: card declined"
    assert ep.steps[0].failure == domain.Failure("PermanentError", "card declined")
    kept = json.loads(ep.content_json)
    assert (kept["outcome"], kept["failure_reason"], kept["duration_ms"], kept["trigger"]) == \
        ("failed", "step pay failed: card declined", 800, "refund.requested")
    assert "4111" not in ep.content_json  # never the run input


def test_episode_written_by_the_v1_planner_keeps_its_failure_reason() -> None:
    """A v1 record still on the topic at upgrade (content_json with ``error``) is upcast and keeps the reason."""
    v1 = fastavro.parse_schema(json.loads((SCHEMA_DIR / "history" / "MemoryWrite.v1.avsc").read_text()))
    content = {"run_id": "r1", "workflow": "refund", "version": 2, "outcome": "failed", "error": "card declined",
               "steps": {"pay": {"status": "failed", "error": "card declined"}}, "cost": 0.1, "duration_ms": 5}
    buf = io.BytesIO(MARKER + struct.pack("<Q", crc64_avro(to_parsing_canonical_form(v1).encode())))
    buf.seek(0, io.SEEK_END)
    fastavro.schemaless_writer(buf, v1, {
        "event_id": "e1", "tenant": "acme", "occurred_at": 1700, "kind": "episode", "run_id": "r1",
        "key": "refund", "content_json": json.dumps(content),
        "provenance_json": json.dumps({"service": "planner", "run_id": "r1"})})
    _name, decoded = AvroCodec(Catalog("").schemas).decode(buf.getvalue())
    ep = domain.interpret_write(decoded)
    assert isinstance(ep, Episode)
    assert (ep.outcome, ep.workflow_version, ep.failure_reason) == ("failed", 2, "card declined")
    assert json.loads(ep.content_json)["failure_reason"] == "card declined"


def test_episode_without_workflow_is_a_bad_record() -> None:
    with pytest.raises(BadRecord, match="workflow"):
        domain.interpret_write(_write("Episode", _episode(workflow="")))


def test_fact_and_working_writes() -> None:
    fact = domain.interpret_write(_write("FactWrite", {"key": "customer:7:city", "value_json": '{"city": "Oslo"}'},
                                         subject="customer:7"))
    assert fact == FactWrite(key="customer:7:city", value_json='{"city":"Oslo"}',
                             provenance_json='{"run_id":"r1","service":"planner"}', subject="customer:7")
    wm = domain.interpret_write(_write("WorkingWrite", {"key": "run:r1:draft", "value_json": '"draft reply"'}))
    assert wm == WorkingWrite(key="run:r1:draft", value_json='"draft reply"')


@pytest.mark.parametrize("record,match", [
    (_write("FactWrite", {"key": "", "value_json": "1"}), "needs a key"),
    (_write("Gossip", {}), "unknown"),
    (_write("FactWrite", {"key": "k", "value_json": "{oops"}), "not valid JSON"),
    (_write("Episode", _episode(), tenant="a{b}"), "tenant"),
    (_write("Episode", _episode(), provenance=None), "provenance.service"),
    (_write("Episode", _episode(), subject="two words"), "subject"),
    (_write("Episode", _episode(failure="declined")), "Failure record"),
    ({**_write("Episode", _episode()), "body": {"run_id": "r1"}}, "record name, fields"),
])
def test_bad_memory_writes_say_why(record: dict[str, Any], match: str) -> None:
    with pytest.raises(BadRecord, match=match):
        domain.interpret_write(record)


def test_outcome_label_is_bounded() -> None:
    assert domain.outcome_label("failed") == "failed"
    assert domain.outcome_label("exploded") == "other"


def test_erasure_plan_names_every_key_of_a_member() -> None:
    members = ["item:kb:a:1", "fact:customer:7:city", "episode:1700-0", "wm:run:r1:draft", "junk"]
    plan = {s.member: s for s in domain.erasure_plan("acme", members)}
    assert "junk" not in plan
    assert plan["item:kb:a:1"].commands == (("VREM", "aios:{acme}:vs:kb", "a:1"),
                                            ("DEL", "aios:{acme}:item:kb:a:1"))
    assert plan["fact:customer:7:city"].commands == (
        ("DEL", "aios:{acme}:fact:customer:7:city", "aios:{acme}:facthist:customer:7:city"),)
    assert plan["episode:1700-0"].commands == (("XDEL", "aios:{acme}:episodes", "1700-0"),)
    assert plan["wm:run:r1:draft"].commands == (("DEL", "aios:{acme}:wm:run:r1:draft"),)


def test_count_erased_counts_members_that_removed_something() -> None:
    plan = domain.erasure_plan("acme", ["item:kb:a", "item:kb:b", "fact:f"])
    # plan order is sorted: fact:f (1 cmd), item:kb:a (2 cmds), item:kb:b (2 cmds)
    result = domain.count_erased(plan, [2, True, 1, False, 0])
    assert result.erased == 2
    assert result.by_kind == {"fact": 1, "item": 1}


def test_knowledge_base_file_is_valid_and_covers_banking77() -> None:
    items = domain.kb_items(yaml.safe_load(KB_FILE.read_text()), source=KB_FILE.name)
    assert 25 <= len(items) <= 40
    for item in items:
        assert item.id.startswith("kb-")
        assert item.embed_text.endswith(item.text) and len(item.embed_text) > len(item.text)
        meta = json.loads(item.metadata_json)
        assert meta["title"] and meta["tags"]
        assert 1 <= item.text.count(". ") + 1 <= 5, item.id  # 2-4 short sentences
    covered = {t for it in items for t in json.loads(it.metadata_json)["tags"]}
    assert set(json.loads(CATEGORIES.read_text())) <= covered  # every BANKING77 intent has an article


def test_knowledge_base_errors_name_the_article() -> None:
    with pytest.raises(ValueError, match="articles"):
        domain.kb_items({"articles": []}, "kb.yaml")
    with pytest.raises(ValueError, match=r"articles\[1\]"):
        domain.kb_items({"articles": [{"id": "a", "title": "t", "body": "b"}, {"id": "b"}]}, "kb.yaml")
    with pytest.raises(InvalidArgument, match="twice"):
        domain.kb_items({"articles": [{"id": "a", "title": "t", "body": "b"}] * 2}, "kb.yaml")
