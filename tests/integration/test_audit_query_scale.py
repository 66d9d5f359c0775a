"""Audit queries at scale, on the real Redis: 5,000 entries over 30 simulated days, found by
actor, action family and time range, counted, and paged while new entries arrive."""

from __future__ import annotations

import random
import uuid
from typing import Any

import pytest
import redis

from aiosmesh.v1 import audit_pb2
from services.common.errors import InvalidArgument
from services.observability.adapters.audit_store import DAY_MS, RedisAuditStore
from services.observability.adapters.grpc_api import AuditServicer
from services.observability.domain.entries import AuditEntry
from tests.integration.conftest import redis_calls

pytestmark = pytest.mark.timeout(300)

NOW_MS = 1_790_000_000_000.0
ACTIONS = ("approval.approved", "approval.rejected", "workflow.StepCompleted", "workflow.StepFailed", "usage")
ACTORS = ("ann", "bob", "source:crm", "")
WORKFLOWS = ("order-recovery", "support-triage", "refund")


def workflow_of(e: AuditEntry) -> str:
    return WORKFLOWS[int(e.run_id.split("-")[1]) % 3]


@pytest.fixture
def trail(client: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> tuple[str, RedisAuditStore, AuditServicer,
                                                                        dict[str, AuditEntry]]:
    monkeypatch.setenv("AIOS_GRPC_AUTH", "none")  # in-process: the auth matrix covers the edge
    store = RedisAuditStore(client, clock_ms=lambda: NOW_MS)
    tenant, rnd = f"t-{uuid.uuid4().hex[:8]}", random.Random(4)
    entries = [AuditEntry(event_id=f"e{i:05d}", tenant=tenant, occurred_at_ms=NOW_MS - rnd.uniform(0, 30) * DAY_MS,
                          service="planner", action=rnd.choice(ACTIONS), actor=rnd.choice(ACTORS),
                          run_id=f"run-{rnd.randrange(400)}") for i in range(5000)]
    # Each run's workflow, as the handler remembers it from the run's RunStarted before storing entries.
    store.remember_runs([(tenant, f"run-{r}", "workflow", WORKFLOWS[r % 3]) for r in range(400)])
    for i in range(0, len(entries), 1000):
        assert all(store.add(entries[i:i + 1000]))
    return tenant, store, AuditServicer(store), {e.event_id: e for e in entries}


def page_all(api: AuditServicer, limit: int, between: Any = None, **q: Any) -> tuple[list[str], int]:
    ids, token, total, pages = [], "", -1, 0
    while True:
        resp = api.Query(audit_pb2.AuditQuery(limit=limit, page_token=token, **q), None)
        total = resp.total if total < 0 else total
        ids += [e.event_id for e in resp.entries]
        token, pages = resp.next_page_token, pages + 1
        if not token:
            return ids, total
        if between is not None:
            between(pages)


def test_last_weeks_approvals_by_one_actor_are_found_counted_and_paged(trail: Any) -> None:
    tenant, _store, api, entries = trail
    since, until = NOW_MS - 14 * DAY_MS, NOW_MS - 7 * DAY_MS
    wanted = [e.event_id for e in entries.values()
              if e.actor == "ann" and e.action.startswith("approval.") and since <= e.occurred_at_ms < until]
    assert len(wanted) > 60
    ids, total = page_all(api, 20, tenant=tenant, actor="ann", action="approval.*", since_ms=since, until_ms=until)
    assert total == len(wanted)
    assert len(ids) == len(set(ids)) and set(ids) == set(wanted)
    times = [entries[i].occurred_at_ms for i in ids]
    assert times == sorted(times, reverse=True)
    for q, accept in [({"action": "workflow.StepFailed"}, lambda e: e.action == "workflow.StepFailed"),
                      ({"actor": "source:crm"}, lambda e: e.actor == "source:crm"),
                      ({"run_id": "run-7", "actor": "bob"}, lambda e: (e.run_id, e.actor) == ("run-7", "bob")),
                      ({"workflow": "refund", "actor": "ann", "action": "approval.*"},
                       lambda e: (workflow_of(e), e.actor, e.action.split(".")[0]) == ("refund", "ann", "approval")),
                      ({"workflow": "refund", "run_id": "run-7"}, lambda e: False),  # run-7 is support-triage's
                      ({"workflow": "support-triage", "run_id": "run-7"}, lambda e: e.run_id == "run-7"),
                      ({}, lambda e: True)]:
        resp = api.Query(audit_pb2.AuditQuery(tenant=tenant, limit=1, **q), None)
        assert resp.total == sum(1 for e in entries.values() if accept(e)), q


def test_paging_has_no_duplicates_or_gaps_while_entries_arrive(trail: Any) -> None:
    tenant, store, api, entries = trail
    before = {e.event_id for e in entries.values() if e.action == "usage"}
    arrived: list[str] = []

    def arrive(page: int) -> None:
        fresh = [AuditEntry(event_id=f"new-{page}-{i}", tenant=tenant, occurred_at_ms=NOW_MS + page + i * 0.5,
                            service="executor", action="usage", actor="ann") for i in range(30)]
        assert all(store.add(fresh))
        arrived.extend(e.event_id for e in fresh)

    ids, total = page_all(api, 64, between=arrive, tenant=tenant, action="usage")
    assert total == len(before)
    assert len(ids) == len(set(ids)), "an entry was listed twice"
    assert set(ids) == before, f"gaps: {len(before - set(ids))}, arrivals listed: {len(set(ids) - before)}"
    assert arrived and api.Query(audit_pb2.AuditQuery(tenant=tenant, action="usage"), None).total == \
        len(before) + len(arrived)


def test_a_token_for_other_filters_is_refused(trail: Any) -> None:
    tenant, _store, api, _entries = trail
    first = api.Query(audit_pb2.AuditQuery(tenant=tenant, actor="ann", limit=2), None)
    with pytest.raises(InvalidArgument, match="other filters"):
        api.Query(audit_pb2.AuditQuery(tenant=tenant, actor="bob", page_token=first.next_page_token), None)


def test_entries_stored_before_the_indexes_are_backfilled_and_trimmed_from_their_runs(client: redis.Redis) -> None:
    """An older version wrote an entry to the entries hash, the log and its run's timeline only, and
    trimmed by count. After the upgrade the backfill puts old entries into the query indexes, and
    retention removes them from their run's timeline too."""
    now = [NOW_MS]
    store = RedisAuditStore(client, clock_ms=lambda: now[0], trim_interval_s=3600)
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    base = f"aios:{{{tenant}}}:audit"
    store.remember_runs([(tenant, "run-1", "workflow", "refund")])
    for i in range(12):
        e = AuditEntry(event_id=f"old{i}", tenant=tenant, occurred_at_ms=NOW_MS - (80 + i) * DAY_MS,
                       service="planner", action="approval.approved", actor="ann", run_id="run-1")
        member = f"{i + 1:012d}:{e.event_id}"
        client.hset(f"{base}:entries", e.event_id, e.to_json())
        client.zadd(f"{base}:log", {member: e.occurred_at_ms})
        client.zadd(f"{base}:run:run-1", {member: e.occurred_at_ms})
    client.sadd("aios:audit:tenants", tenant)
    api = AuditServicer(store)
    query = audit_pb2.AuditQuery(tenant=tenant, actor="ann", action="approval.*", workflow="refund")
    assert api.Query(query, None).total == 0  # the gap an upgrade leaves
    assert [store.backfill(tenant, budget=5) for _ in range(4)] == [5, 5, 2, 0]
    assert api.Query(query, None).total == 12
    now[0] = NOW_MS + 5 * DAY_MS  # 85-96 days old now: the six older than 90 days go
    assert store.trim(tenant) == 6
    assert api.Query(query, None).total == 6
    assert client.zcard(f"{base}:run:run-1") == 6 and len(store.timeline(tenant, "run-1")) == 6


def test_an_entry_that_names_its_workflow_is_found_by_it_without_the_runs_memory(client: redis.Redis,
                                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Policy checks a run's start before the planner's RunStarted reaches observability, and the
    memory of a run's workflow lasts days while the trail lasts 90: an entry that names its workflow
    (a policy decision, a workflow event) is indexed under it whatever the run memory holds."""
    monkeypatch.setenv("AIOS_GRPC_AUTH", "none")
    store = RedisAuditStore(client, clock_ms=lambda: NOW_MS)
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    named = AuditEntry(event_id="p1", tenant=tenant, occurred_at_ms=NOW_MS - 1000, service="policy",
                       action="policy.evaluate", actor="api:ann", run_id="run-9",
                       detail_json='{"action":"start_workflow","workflow":"refund"}')
    unnamed = AuditEntry(event_id="u1", tenant=tenant, occurred_at_ms=NOW_MS - 500, service="executor",
                         action="usage", run_id="run-9")
    assert store.add([named, unnamed]) == [True, True]
    api = AuditServicer(store)
    found = api.Query(audit_pb2.AuditQuery(tenant=tenant, workflow="refund"), None)
    assert [e.event_id for e in found.entries] == ["p1"] and found.total == 1


def test_retention_gets_past_more_entries_in_one_millisecond_than_a_trim_batch(client: redis.Redis,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A burst can put more entries in one millisecond than one trim step takes: the trim must not
    stop there for good (it did: nothing was below the batch's last score, so it said done)."""
    monkeypatch.setenv("AIOS_GRPC_AUTH", "none")
    now = [NOW_MS]
    store = RedisAuditStore(client, clock_ms=lambda: now[0], trim_interval_s=3600, trim_batch=5)
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    burst = [AuditEntry(event_id=f"b{i:02d}", tenant=tenant, occurred_at_ms=NOW_MS - 100 * DAY_MS, service="planner",
                        action="approval.approved", actor="ann", run_id="run-1") for i in range(12)]
    later = [AuditEntry(event_id=f"l{i}", tenant=tenant, occurred_at_ms=NOW_MS - 95 * DAY_MS + i, service="planner",
                        action="approval.approved", actor="ann", run_id="run-1") for i in range(3)]
    kept = AuditEntry(event_id="k", tenant=tenant, occurred_at_ms=NOW_MS - DAY_MS, service="planner",
                      action="approval.approved", actor="ann", run_id="run-1")
    assert all(store.add([*burst, *later, kept]))
    assert store.trim(tenant) == 15
    found = AuditServicer(store).Query(audit_pb2.AuditQuery(tenant=tenant, actor="ann"), None)
    assert [e.event_id for e in found.entries] == ["k"] and found.total == 1
    assert [e.event_id for e in store.timeline(tenant, "run-1")] == ["k"]


def test_a_batch_of_entries_is_added_in_one_round_trip_and_after_redis_lost_its_scripts(client: redis.Redis) -> None:
    """No SCRIPT EXISTS before each batch (redis-py asks it for pipelined Script objects); a Redis
    whose script cache was emptied (a restart) gets the script again, and each entry is added once."""
    store = RedisAuditStore(client, clock_ms=lambda: NOW_MS)
    tenant = f"t-{uuid.uuid4().hex[:8]}"

    def entry(n: int) -> AuditEntry:
        return AuditEntry(event_id=f"e{n}", tenant=tenant, occurred_at_ms=NOW_MS - n, service="planner",
                          action="workflow.RunStarted", run_id=f"run-{n}")

    store.add([entry(0)])  # the script is known from here on
    before = redis_calls(client, "script|exists")
    assert store.add([entry(1), entry(2)]) == [True, True]
    assert redis_calls(client, "script|exists") == before
    client.script_flush()
    assert store.add([entry(3), entry(1)]) == [True, False]  # e1 again: its marker makes it a no-op
    found = AuditServicer(store).Query(audit_pb2.AuditQuery(tenant=tenant), None)
    assert sorted(e.event_id for e in found.entries) == ["e0", "e1", "e2", "e3"]


def test_walking_a_long_runs_trail_reads_each_entry_once(client: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    """`aios audit RUN` pages through a run's whole trail: each page reads its own entries, not the
    run's every entry again (was: 30 pages of 100 read all 3,000 entries each, 90,000 reads)."""
    monkeypatch.setenv("AIOS_GRPC_AUTH", "none")
    store = RedisAuditStore(client, clock_ms=lambda: NOW_MS)
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    assert all(store.add([AuditEntry(event_id=f"e{i}", tenant=tenant, occurred_at_ms=NOW_MS - 10_000 + i,
                                     service="planner", action="workflow.StepCompleted", run_id="run-long")
                          for i in range(3_000)]))
    api = AuditServicer(store)

    before = redis_calls(client, "hmget")
    seen, token = [], ""
    while True:
        page = api.Query(audit_pb2.AuditQuery(tenant=tenant, run_id="run-long", limit=100, page_token=token), None)
        seen += [e.event_id for e in page.entries]
        assert page.total == 3_000
        token = page.next_page_token
        if not token:
            break
    assert seen == [f"e{i}" for i in reversed(range(3_000))]  # newest first, each once
    assert redis_calls(client, "hmget") - before <= 31  # one read of its own entries per page
    only_usage = api.Query(audit_pb2.AuditQuery(tenant=tenant, run_id="run-long", action="usage"), None)
    assert list(only_usage.entries) == [] and only_usage.total == 0  # other filters still read the entries
