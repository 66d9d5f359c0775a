"""ListRuns at scale, on the real Redis and the planner's own commit path: runs written by
``RunStore.commit_many`` (the unit of work that writes their state writes their indexes), then
found by filters and pages the way an operator would look for last week's failures."""

from __future__ import annotations

import json
import random
import uuid
from typing import Any

import pytest
import redis

from aiosmesh.v1 import workflow_pb2
from services.common.errors import InvalidArgument
from services.common.uow import RedisUnitOfWork
from services.planner.domain.state import RunState
from services.planner.grpc_api import WorkflowApi
from services.planner.listing import index_key
from services.planner.store import RunChange, RunQueries, RunStore
from services.planner.workflows import Registry

pytestmark = pytest.mark.timeout(300)

DAY_MS = 86_400_000
NOW_MS = 1_790_000_000_000.0
WORKFLOWS = ("order-recovery", "support-triage", "refund")
ACTORS = ("user:ann", "source:crm", "user:bob")


@pytest.fixture
def api(client: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> WorkflowApi:
    monkeypatch.setenv("AIOS_GRPC_AUTH", "none")  # called in-process: the auth matrix covers the edge
    return WorkflowApi(store=RunQueries(client), registry=Registry([]), producer=None,  # type: ignore[arg-type]
                       policy=None, default_tenant="demo")  # type: ignore[arg-type]


def write_runs(store: RunStore, tenant: str, specs: list[tuple[str, str, str, float]]) -> None:
    """Create each (run id, workflow, actor, created ms) as running, then end it as the spec's
    status would: through load -> change -> commit, as the planner's handler does."""
    for i in range(0, len(specs), 500):
        chunk = specs[i:i + 500]
        runs = [RunState(run_id=rid, tenant=tenant, workflow=wf, version=1, input={}, status="running",
                         created_at=at, updated_at=at, actor=actor) for rid, wf, actor, at in chunk]
        assert all(isinstance(v, str) for v in store.commit_many(
            [RunChange(run=r, expected="", outbox=[], event_id=f"start-{r.run_id}") for r in runs]))


def end_runs(store: RunStore, tenant: str, ended: dict[str, str]) -> None:
    ids = list(ended)
    for i in range(0, len(ids), 500):
        chunk = ids[i:i + 500]
        changes = []
        for rid, (lr, _seen) in zip(chunk, store.load_many([(tenant, r, f"end-{r}") for r in chunk]), strict=True):
            assert lr.run is not None
            lr.run.status = ended[rid]  # the transition changes the loaded run in place
            changes.append(RunChange(run=lr.run, expected=lr.version, outbox=[], event_id=f"end-{rid}",
                                     previous_status=lr.status))
        assert all(isinstance(v, str) for v in store.commit_many(changes))


def page_all(api: WorkflowApi, limit: int, between: Any = None, **filters: Any) -> tuple[list[str], int, int]:
    """Every run id the filters list, page by page; (ids in order, total of the first page, pages)."""
    ids, token, pages, total = [], "", 0, -1
    while True:
        resp = api.ListRuns(workflow_pb2.ListRunsRequest(limit=limit, page_token=token, **filters), None)
        total = resp.total if total < 0 else total
        ids += [r.run_id for r in resp.runs]
        pages += 1
        token = resp.next_page_token
        if not token:
            return ids, total, pages
        if between is not None:
            between(pages)


@pytest.fixture
def history(client: redis.Redis) -> tuple[str, RunStore, dict[str, tuple[str, str, str, float]]]:
    """5,000 runs over 10 simulated days (2.5x the old scan of the newest 2,000, 5x its 1,000 cap)."""
    tenant, rnd = f"t-{uuid.uuid4().hex[:8]}", random.Random(9)
    store = RunStore(RedisUnitOfWork(client))
    specs = [(f"run-{n:05d}-{uuid.uuid4().hex[:6]}", rnd.choice(WORKFLOWS), rnd.choice(ACTORS),
              NOW_MS - rnd.uniform(0, 10) * DAY_MS) for n in range(5000)]
    write_runs(store, tenant, specs)
    statuses = {rid: rnd.choice(("completed", "completed", "failed", "cancelled", "running"))
                for rid, *_ in specs}
    end_runs(store, tenant, {rid: st for rid, st in statuses.items() if st != "running"})
    return tenant, store, {rid: (wf, actor, statuses[rid], at) for rid, wf, actor, at in specs}


def test_last_weeks_failed_runs_of_one_workflow_are_found_counted_and_paged(
        api: WorkflowApi, history: tuple[str, RunStore, dict[str, tuple[str, str, str, float]]]) -> None:
    tenant, _store, runs = history
    since, until = NOW_MS - 8 * DAY_MS, NOW_MS - 6 * DAY_MS
    wanted = [rid for rid, (wf, _a, st, at) in runs.items()
              if wf == "order-recovery" and st == "failed" and since <= at < until]
    assert len(wanted) > 50  # enough to need several pages
    ids, total, pages = page_all(api, 25, tenant=tenant, workflow="order-recovery", status="failed",
                                 created_after_ms=since, created_before_ms=until)
    assert total == len(wanted)
    assert len(ids) == len(set(ids)) and set(ids) == set(wanted)
    assert pages == -(-len(wanted) // 25)
    created = [runs[r][3] for r in ids]
    assert created == sorted(created, reverse=True)  # newest first
    # Every filter and combination counts from its own index.
    for filters, accept in [
        ({"status": "failed"}, lambda wf, a, st, at: st == "failed"),
        ({"actor": "source:crm"}, lambda wf, a, st, at: a == "source:crm"),
        ({"actor": "user:ann", "workflow": "refund", "status": "cancelled"},
         lambda wf, a, st, at: (a, wf, st) == ("user:ann", "refund", "cancelled")),
        ({"status": "running"}, lambda wf, a, st, at: st == "running"),
        ({}, lambda wf, a, st, at: True),
    ]:
        resp = api.ListRuns(workflow_pb2.ListRunsRequest(tenant=tenant, limit=1, **filters), None)
        assert resp.total == sum(1 for v in runs.values() if accept(*v)), filters
    # A run that ended leaves the running index (the status moved in the same commit).
    running = api.ListRuns(workflow_pb2.ListRunsRequest(tenant=tenant, status="running", limit=1000), None)
    assert {r.status for r in running.runs} == {"running"}


def test_paging_has_no_duplicates_or_gaps_while_new_runs_arrive(
        api: WorkflowApi, history: tuple[str, RunStore, dict[str, tuple[str, str, str, float]]]) -> None:
    tenant, store, runs = history
    before = {rid for rid, (wf, _a, st, _at) in runs.items() if wf == "support-triage" and st == "failed"}
    arrived: list[str] = []

    def new_failures(page: int) -> None:
        """Between pages, 20 new failed runs of the same workflow (and one sharing a timestamp)."""
        fresh = [(f"new-{page}-{i}-{uuid.uuid4().hex[:6]}", "support-triage", "user:ann", NOW_MS + page * 1000 + i)
                 for i in range(20)]
        write_runs(store, tenant, fresh)
        end_runs(store, tenant, {rid: "failed" for rid, *_ in fresh})
        arrived.extend(rid for rid, *_ in fresh)

    ids, total, _pages = page_all(api, 40, between=new_failures, tenant=tenant, workflow="support-triage",
                                  status="failed")
    assert total == len(before)
    assert len(ids) == len(set(ids)), "a run was listed twice"
    assert set(ids) == before, f"gaps: {len(before - set(ids))}, arrivals listed: {len(set(ids) - before)}"
    assert arrived and api.ListRuns(workflow_pb2.ListRunsRequest(
        tenant=tenant, workflow="support-triage", status="failed"), None).total == len(before) + len(arrived)


def test_equal_creation_times_page_without_loss(api: WorkflowApi, client: redis.Redis) -> None:
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    store = RunStore(RedisUnitOfWork(client))
    write_runs(store, tenant, [(f"run-{i:03d}", "wf", "", NOW_MS) for i in range(23)])
    ids, total, pages = page_all(api, 5, tenant=tenant)
    assert (sorted(ids), total, pages) == ([f"run-{i:03d}" for i in range(23)], 23, 5)


def test_bad_page_tokens_and_limits_are_refused_clearly(
        api: WorkflowApi, history: tuple[str, RunStore, dict[str, tuple[str, str, str, float]]]) -> None:
    tenant = history[0]
    first = api.ListRuns(workflow_pb2.ListRunsRequest(tenant=tenant, status="failed", limit=2), None)
    for request, message in [
        (workflow_pb2.ListRunsRequest(tenant=tenant, status="completed", page_token=first.next_page_token),
         "other filters"),
        (workflow_pb2.ListRunsRequest(tenant=tenant, page_token="not-a-token"), "not a token this API issued"),
        (workflow_pb2.ListRunsRequest(tenant=tenant, limit=5000), "limit must be between 1 and 1000"),
        (workflow_pb2.ListRunsRequest(tenant=tenant, created_after_ms=5, created_before_ms=4), "must be before"),
    ]:
        with pytest.raises(InvalidArgument, match=message):
            api.ListRuns(request, None)


def test_retention_trims_every_index_of_an_expired_run(client: redis.Redis) -> None:
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    store = RunStore(RedisUnitOfWork(client))
    write_runs(store, tenant, [("old", "wf", "user:ann", NOW_MS - 30 * DAY_MS), ("new", "wf", "user:ann", NOW_MS)])
    end_runs(store, tenant, {"old": "failed", "new": "failed"})
    client.delete(f"aios:{{{tenant}}}:run:old")  # its state expired
    assert RunQueries(client, retention_s=7 * 86400).trim_index(tenant, int(NOW_MS)) == 1
    for key in (index_key(tenant), index_key(tenant, status="failed"),
                index_key(tenant, actor="user:ann", workflow="wf", status="failed")):
        assert client.zrange(key, 0, -1) == ["new"], key
    assert not client.exists(index_key(tenant, status="running"))


def test_retention_gets_past_old_runs_still_alive_and_keeps_up_with_creation(client: redis.Redis) -> None:
    """Runs waiting on a person past retention keep their entries, and the trim must not stop at
    them: 600 old live runs sort first, 1,200 expired ones after them; one pass clears the expired."""
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    store = RunStore(RedisUnitOfWork(client))
    alive = [(f"alive-{i:04d}", "wf", "user:ann", NOW_MS - 40 * DAY_MS + i) for i in range(600)]
    gone = [(f"gone-{i:04d}", "wf", "user:ann", NOW_MS - 30 * DAY_MS + i) for i in range(1200)]
    write_runs(store, tenant, alive + gone)
    client.delete(*[f"aios:{{{tenant}}}:run:{rid}" for rid, *_ in gone])  # their state expired
    assert RunQueries(client, retention_s=7 * 86400).trim_index(tenant, int(NOW_MS)) == 1200
    for key in (index_key(tenant), index_key(tenant, status="running"), index_key(tenant, workflow="wf")):
        assert client.zcard(key) == 600, key


def test_runs_stored_before_the_indexes_are_backfilled_once(api: WorkflowApi, client: redis.Redis) -> None:
    """An older planner wrote only the state and aios:{t}:runs; the timer poller's backfill puts those
    runs into every listing index of their current state, a budget at a time, and then stops."""
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    for i in range(30):
        run = RunState(run_id=f"old-{i:02d}", tenant=tenant, workflow="wf", version=1, input={},
                       status="failed" if i % 3 == 0 else "waiting_approval", created_at=NOW_MS - i * 1000)
        client.hset(f"aios:{{{tenant}}}:run:{run.run_id}", mapping={"state": json.dumps(run.to_dict()), "ver": "3"})
        client.zadd(f"aios:{{{tenant}}}:runs", {run.run_id: run.created_at})
    assert api.ListRuns(workflow_pb2.ListRunsRequest(tenant=tenant, status="failed"), None).total == 0  # the gap
    queries = RunQueries(client)
    assert [queries.backfill_index(tenant, budget=12) for _ in range(4)] == [12, 12, 6, 0]
    failed = api.ListRuns(workflow_pb2.ListRunsRequest(tenant=tenant, workflow="wf", status="failed"), None)
    assert sorted(r.run_id for r in failed.runs) == [f"old-{i:02d}" for i in range(0, 30, 3)] and failed.total == 10
    # After the backfill, a status change moves the run between status sets like any other run.
    store = RunStore(RedisUnitOfWork(client))
    end_runs(store, tenant, {"old-01": "completed"})
    assert api.ListRuns(workflow_pb2.ListRunsRequest(tenant=tenant, status="waiting_approval"), None).total == 19
    assert [r.run_id for r in api.ListRuns(workflow_pb2.ListRunsRequest(
        tenant=tenant, workflow="wf", status="completed"), None).runs] == ["old-01"]
    assert queries.backfill_index(tenant) == 0  # done for good
