"""Pure rules of the memory service: validation, key naming, memory-write
interpretation, episode shaping, erasure plans and the knowledge-base file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from services.common.errors import BadRecord, InvalidArgument
from services.memory import domain
from services.memory.domain import Episode, FactWrite, WorkingWrite

KB_FILE = Path(__file__).resolve().parents[2] / "services/memory/knowledge/banking_kb.yaml"
CATEGORIES = Path(__file__).resolve().parents[2] / "tools" / "data" / "banking77" / "categories.json"

pytestmark = pytest.mark.timeout(10)


def test_keys_carry_the_tenant_as_a_hash_tag() -> None:
    keys = [domain.vector_set_key("acme", "kb"), domain.item_key("acme", "kb", "a:1"),
            domain.subject_key("acme", "customer:9"), domain.fact_key("acme", "x"),
            domain.fact_history_key("acme", "x"), domain.episodes_key("acme"),
            domain.working_key("acme", "w"), domain.seen_key("acme", "e1")]
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


def _write(kind: str, content: object, **extra: object) -> dict[str, object]:
    record: dict[str, object] = {"event_id": "e1", "tenant": "acme", "occurred_at": 1700, "kind": kind,
                                 "run_id": None, "key": None, "content_json": json.dumps(content),
                                 "provenance_json": "{}"}
    record.update(extra)
    return record


def test_episode_keeps_what_later_runs_learn_from() -> None:
    content = {"workflow": "refund", "outcome": "failed", "steps": [{"id": "pay", "status": "failed"}],
               "failure_reason": "card declined", "noise": "x" * 50, "subject": "customer:7"}
    ep = domain.interpret_write(_write("episode", content, run_id="r1"))
    assert isinstance(ep, Episode)
    assert (ep.run_id, ep.workflow, ep.outcome, ep.recorded_at_ms, ep.subject) == \
        ("r1", "refund", "failed", 1700, "customer:7")
    kept = json.loads(ep.content_json)
    assert kept["failure_reason"] == "card declined" and kept["steps"][0]["id"] == "pay"
    assert "noise" not in kept


def test_episode_without_workflow_is_a_bad_record() -> None:
    with pytest.raises(BadRecord, match="workflow"):
        domain.interpret_write(_write("episode", {"outcome": "completed"}, run_id="r1"))


def test_fact_and_working_writes() -> None:
    fact = domain.interpret_write(_write("fact", {"city": "Oslo"}, key="customer:7:city",
                                         provenance_json='{"subject": "customer:7", "run_id": "r1"}'))
    assert fact == FactWrite(key="customer:7:city", value_json='{"city":"Oslo"}',
                             provenance_json='{"run_id":"r1","subject":"customer:7"}', subject="customer:7")
    wm = domain.interpret_write(_write("working", "draft reply", key="run:r1:draft"))
    assert wm == WorkingWrite(key="run:r1:draft", value_json='"draft reply"')


@pytest.mark.parametrize("record,match", [
    (_write("fact", {"a": 1}), "needs a key"),
    (_write("gossip", {}), "unknown"),
    (_write("fact", {}, key="k", content_json="{oops"), "not valid JSON"),
    (_write("episode", {}, tenant="a{b}"), "tenant"),
])
def test_bad_memory_writes_say_why(record: dict[str, object], match: str) -> None:
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
