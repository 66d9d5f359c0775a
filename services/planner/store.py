"""Run state on the unit of work, plus the read side (listing, timers,
definition snapshots) that only the Redis adapter serves.

A transition commits, in one unit of work: the new state (compare-and-set on
its version), the encoded Kafka records it produced (the outbox), the event's
dedupe marker, the timers it set or cleared, the run index on creation and the
state's retention once the run ended. See services/common/uow.py.

Keys (tenant in braces: one Redis Cluster slot per tenant):
  aios:{t}:run:<id>      hash: state (JSON), ver, outbox (JSON list)
  aios:{t}:seen:<event>  dedupe marker of an applied event (expires with retention)
  aios:{t}:pending:<id>  an accepted API start not applied yet (deleted by the creating commit)
  aios:{t}:runs          zset: run ids by creation time (trimmed by the timer poller past retention)
  aios:{t}:runs:<dims>   zset: the same for one combination of actor, workflow and status, e.g.
                         runs:wf=order:st=failed (services/planner/listing.py pages them)
  aios:{t}:runs:keys     set: the tenant's run index keys, so retention can trim them all
  aios:{t}:active        zset: runs in flight (created, not ended): admission control counts it
  aios:{t}:active:<wf>   zset: the same, per workflow
  aios:{t}:timers        zset: timer ids by due time (ms)
  aios:{t}:timerdata     hash: timer id -> JSON payload
  aios:tenants           set: tenants that have runs (for the timer poller)
  aios:wfdef:<name>:<v>  a deployed definition's snapshot, so v1 runs finish on v1
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import redis

from services.common.errors import AiosError
from services.common.kafka import OutRecord
from services.common.uow import Change, TimerOps, UnitOfWork, marker_key, redis_call
from services.planner.domain.state import RUN_TERMINAL, RunState
from services.planner.listing import INDEX_REGISTRY, backfill_indexes, index_keys

TENANTS = "aios:tenants"
# What a run may be while indexed; a status change with no known previous status unindexes all others.
RUN_STATUSES = ("running", "waiting_approval", "failing", "compensating", *sorted(RUN_TERMINAL))


def _k(tenant: str, *parts: str) -> str:
    return ":".join([f"aios:{{{tenant}}}", *parts])


@dataclass
class LoadedRun:
    run: RunState | None
    version: str
    outbox: list[OutRecord] = field(default_factory=list)
    status: str = ""  # the status as loaded (a transition changes ``run`` in place): what to unindex

    def __post_init__(self) -> None:
        if self.run is not None and not self.status:
            self.status = self.run.status


@dataclass
class RunChange:
    """What one transition writes, in the planner's words; ``RunStore.commit`` makes it a ``Change``."""

    run: RunState
    expected: str
    outbox: list[OutRecord]
    event_id: str
    timers_add: list[tuple[int, str, dict[str, Any]]] = field(default_factory=list)
    timers_remove: list[str] = field(default_factory=list)
    previous_status: str | None = None  # the status before the transition; None = unknown


class RunStore:
    """The planner's run state over any unit of work (Redis, or the in-memory twin in tests)."""

    def __init__(self, uow: UnitOfWork, *, retention_s: int = 7 * 24 * 3600) -> None:
        self.uow = uow
        self.retention_s = retention_s

    def load(self, tenant: str, run_id: str) -> LoadedRun:
        loaded = self.uow.load(_k(tenant, "run", run_id))
        if loaded.state is None:
            return LoadedRun(None, "")
        return LoadedRun(RunState.from_dict(json.loads(loaded.state)), loaded.version, loaded.outbox)

    def seen(self, tenant: str, event_id: str) -> bool:
        return self.uow.seen(marker_key(tenant, event_id))

    def load_many(self, wanted: list[tuple[str, str, str]]) -> list[tuple[LoadedRun, bool]]:
        """Many runs and whether each one's event (tenant, run id, event id) was applied, in one round trip."""
        raw = self.uow.load_many([_k(t, "run", r) for t, r, _e in wanted], [marker_key(t, e) for t, _r, e in wanted])
        return [(LoadedRun(None, "") if lo.state is None else
                 LoadedRun(RunState.from_dict(json.loads(lo.state)), lo.version, lo.outbox), seen)
                for lo, seen in raw]

    def commit(self, change: RunChange) -> str:
        """Write state, outbox, marker and timers atomically; return the new version.
        Raises Conflict (reload and re-apply) or AlreadyApplied (a duplicate delivery)."""
        [out] = self.commit_many([change])
        if isinstance(out, Exception):
            raise out
        return out

    def commit_many(self, changes: list[RunChange]) -> list[str | AiosError]:
        """Commit many transitions in one round trip; each succeeds or fails (Conflict, AlreadyApplied) alone."""
        return self.uow.commit_many([self._change(c) for c in changes])

    def _change(self, change: RunChange) -> Change:
        run, created = change.run, change.expected == ""
        tenant = run.tenant
        timers = None
        if change.timers_add or change.timers_remove:
            timers = TimerOps(_k(tenant, "timers"), _k(tenant, "timerdata"),
                              add=[(due, tid, json.dumps(p)) for due, tid, p in change.timers_add],
                              remove=change.timers_remove)
        listed, unlisted = self._listing(change)
        at = float(run.created_at)
        return Change(
            key=_k(tenant, "run", run.run_id), expected=change.expected,
            state=json.dumps(run.to_dict(), default=str), outbox=change.outbox,
            markers=[marker_key(tenant, change.event_id)], marker_ttl_s=self.retention_s, timers=timers,
            index=([(_k(tenant, "active"), at, run.run_id),
                    (_k(tenant, "active", run.workflow), at, run.run_id)] if created else [])
            + [(key, at, run.run_id) for key in listed],
            unindex=([(_k(tenant, "active"), run.run_id), (_k(tenant, "active", run.workflow), run.run_id)]
                     if run.terminal else []) + [(key, run.run_id) for key in unlisted],
            members=([(TENANTS, tenant)] if created else []) + [(INDEX_REGISTRY.format(tenant=tenant), key)
                                                               for key in listed],
            deletes=[_k(tenant, "pending", run.run_id)] if created else [],
            # Retention starts when the run ends; a run that is still going never expires.
            expire_s=self.retention_s if run.terminal else None)

    @staticmethod
    def _listing(change: RunChange) -> tuple[list[str], list[str]]:
        """The listing index keys the run enters and leaves: all of them on creation, the status ones
        when its status changed (every other status's when the previous one is not known)."""
        run = change.run
        if change.expected == "":
            return index_keys(run.tenant, run.actor, run.workflow, run.status), []
        before = [change.previous_status] if change.previous_status is not None else \
            [s for s in RUN_STATUSES if s != run.status]
        if before == [run.status]:
            return [], []
        leave = [k for s in before for k in index_keys(run.tenant, run.actor, run.workflow, s, status_only=True)]
        return index_keys(run.tenant, run.actor, run.workflow, run.status, status_only=True), leave

    def clear_outboxes(self, done: dict[tuple[str, str], str]) -> None:
        """Clear the acknowledged outboxes of many runs ((tenant, run id) -> version), in one round trip."""
        self.uow.clear_outboxes([(_k(tenant, "run", run_id), version) for (tenant, run_id), version in done.items()])

    def in_flight(self, tenant: str, workflow: str) -> tuple[int, int]:
        """Runs created and not ended: (for the tenant, for the tenant's workflow)."""
        return self.uow.count(_k(tenant, "active")), self.uow.count(_k(tenant, "active", workflow))


class Definitions(Protocol):
    """Snapshots of deployed workflow definitions, so a run keeps the version it started with."""

    def snapshot(self, name: str, version: int, source: dict[str, Any]) -> None: ...

    def load(self, name: str, version: int) -> dict[str, Any] | None: ...


class MemoryDefinitions:
    def __init__(self) -> None:
        self.saved: dict[tuple[str, int], dict[str, Any]] = {}

    def snapshot(self, name: str, version: int, source: dict[str, Any]) -> None:
        self.saved.setdefault((name, version), source)

    def load(self, name: str, version: int) -> dict[str, Any] | None:
        return self.saved.get((name, version))


class RedisDefinitions:
    REWRITE_S = 60.0  # a snapshot lost with Redis's last second of writes is written again within this

    def __init__(self, client: redis.Redis) -> None:
        self.r = client
        self._written: dict[tuple[str, int], float] = {}  # (name, version) -> when this process wrote it

    def snapshot(self, name: str, version: int, source: dict[str, Any]) -> None:
        """Keep the definition a run starts with (SET NX: the first writer's stays). Written once a
        minute per version and process, not once per run: it was a round trip and a JSON dump of the
        whole workflow in every run's start."""
        now = time.monotonic()
        if now - self._written.get((name, version), -self.REWRITE_S) < self.REWRITE_S:
            return
        redis_call(self.r.set, f"aios:wfdef:{name}:{version}", json.dumps(source), nx=True)
        self._written[(name, version)] = now

    def load(self, name: str, version: int) -> dict[str, Any] | None:
        raw = redis_call(self.r.get, f"aios:wfdef:{name}:{version}")
        return json.loads(raw) if raw else None


class RunQueries:
    """The read side on Redis: listing runs, accepted starts, due timers."""

    def __init__(self, client: redis.Redis, *, retention_s: int = 7 * 24 * 3600) -> None:
        self.r = client
        self.retention_s = retention_s

    def get(self, tenant: str, run_id: str) -> RunState | None:
        raw = redis_call(self.r.hget, _k(tenant, "run", run_id), "state")
        return RunState.from_dict(json.loads(raw)) if raw else None

    def runs(self, tenant: str, ids: list[str]) -> list[RunState]:
        """The states of many runs in one round trip, in the order asked (expired ones left out)."""
        if not ids:
            return []
        pipe = self.r.pipeline(transaction=False)
        for rid in ids:
            pipe.hget(_k(tenant, "run", rid), "state")
        return [RunState.from_dict(json.loads(s)) for s in redis_call(pipe.execute) if s]

    def list_runs(self, tenant: str, limit: int = 50) -> list[RunState]:
        """The newest runs (see ``listing.RunListing`` for filters and paging)."""
        return self.runs(tenant, redis_call(self.r.zrevrange, _k(tenant, "runs"), 0, max(0, limit - 1)))

    # -- accepted starts ---------------------------------------------------------
    def mark_pending(self, run: RunState, ttl_s: int = 3600) -> bool:
        """An accepted start the planner has not applied yet: visible as ``pending``. True if new."""
        return bool(redis_call(self.r.set, _k(run.tenant, "pending", run.run_id), json.dumps(run.to_dict()),
                               ex=ttl_s, nx=True))

    def load_pending(self, tenant: str, run_id: str) -> RunState | None:
        raw = redis_call(self.r.get, _k(tenant, "pending", run_id))
        return RunState.from_dict(json.loads(raw)) if raw else None

    # -- durable timers and retention ---------------------------------------------
    def tenants(self) -> list[str]:
        return sorted(redis_call(self.r.smembers, TENANTS))

    def due_timers(self, tenant: str, now_ms: int, limit: int = 200) -> list[tuple[str, dict[str, Any]]]:
        ids = redis_call(self.r.zrangebyscore, _k(tenant, "timers"), "-inf", now_ms, start=0, num=limit)
        if not ids:
            return []
        payloads = redis_call(self.r.hmget, _k(tenant, "timerdata"), ids)
        return [(tid, json.loads(p)) for tid, p in zip(ids, payloads, strict=True) if p]

    def remove_timers(self, tenant: str, ids: list[str]) -> None:
        if ids:
            pipe = self.r.pipeline(transaction=True)
            pipe.zrem(_k(tenant, "timers"), *ids)
            pipe.hdel(_k(tenant, "timerdata"), *ids)
            redis_call(pipe.execute)

    def backfill_index(self, tenant: str, budget: int = 5000) -> int:
        """Add runs stored before the listing indexes existed to them (see ``listing.backfill_indexes``)."""
        return backfill_indexes(self.r, tenant, budget=budget)

    def trim_index(self, tenant: str, now_ms: int, batch: int = 500, max_batches: int = 40) -> int:
        """Drop index entries of runs older than the retention window whose state has expired
        (a run still waiting for a person past retention keeps its entry, and the scan steps over
        it). Up to ``max_batches`` x ``batch`` old entries per call (20,000: a minute's trim keeps
        up with 330 runs/s per tenant); how many were dropped."""
        cutoff, offset, removed = now_ms - self.retention_s * 1000, 0, 0
        keys: set[str] | None = None
        for _ in range(max_batches):
            old = redis_call(self.r.zrangebyscore, _k(tenant, "runs"), "-inf", cutoff, start=offset, num=batch)
            if not old:
                break
            pipe = self.r.pipeline(transaction=False)
            for rid in old:
                pipe.exists(_k(tenant, "run", rid))
            gone = [rid for rid, alive in zip(old, redis_call(pipe.execute), strict=True) if not alive]
            offset += len(old) - len(gone)  # the live ones stay where they are: step over them
            if gone:
                # The listing indexes hold the run too; which ones died with its state: try every one the tenant has.
                if keys is None:
                    keys = set(redis_call(self.r.smembers, INDEX_REGISTRY.format(tenant=tenant))) - {_k(tenant, "runs")}
                pipe = self.r.pipeline(transaction=False)
                pipe.zrem(_k(tenant, "runs"), *gone)
                for key in keys:
                    pipe.zrem(key, *gone)
                removed += int(redis_call(pipe.execute)[0])
            if len(old) < batch:
                break
        return removed
