"""Listing runs from indexes: every filter combination has its own sorted set.

A run enters, in the unit of work that creates it, one sorted set (score: creation time in ms)
per combination of its actor, workflow and status (8 keys with an actor, 4 without), and moves
between the status ones in the commit that changes its status (``RunStore._listing``). A query
then reads exactly one set, whatever its filters: "failed runs of `order-recovery` last week"
is a ZCOUNT and a ZREVRANGEBYSCORE on ``runs:wf=order-recovery:st=failed``, as fast at 50,000
runs as at 50, where the old listing filtered the newest 2,000 and missed older ones.

Why one set per combination and not an intersection at query time (ZINTER): an intersection
costs the size of its smallest input on every page, and the combinations are few (each run
writes at most 8 members; a status change moves 4). The sets cost about 8 x 60 bytes per run
(see README, "Sizing Redis").
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Any

from services.common.errors import InvalidArgument
from services.common.paging import (
    INF,
    Cursor,
    combination_key,
    combinations_of,
    decode_token,
    encode_token,
    zpage,
)
from services.common.uow import redis_call
from services.planner.domain.state import RunState

INDEX_REGISTRY = "aios:{{{tenant}}}:runs:keys"
MAX_PAGE = 1000


def index_key(tenant: str, *, actor: str = "", workflow: str = "", status: str = "") -> str:
    """The sorted set of the tenant's runs with these values (empty = any)."""
    return combination_key(f"aios:{{{tenant}}}:runs", (("actor", actor), ("wf", workflow), ("st", status)))


def index_keys(tenant: str, actor: str, workflow: str, status: str, *, status_only: bool = False) -> list[str]:
    """Every index a run with these values belongs to (or only those that name its status)."""
    return [index_key(tenant, **chosen) for chosen in combinations_of(
            {"actor": actor, "workflow": workflow, "status": status}) if not status_only or "status" in chosen]


@dataclass(frozen=True)
class RunFilter:
    """A validated ListRuns query (tenant from the caller's grant)."""

    tenant: str
    workflow: str = ""
    status: str = ""
    actor: str = ""
    since_ms: float = -INF
    until_ms: float = INF
    limit: int = 50

    @property
    def key(self) -> str:
        return index_key(self.tenant, actor=self.actor, workflow=self.workflow, status=self.status)

    def scope(self) -> dict[str, Any]:
        """What a page token is bound to: the filters, not the page size."""
        return {"t": self.tenant, "w": self.workflow, "s": self.status, "a": self.actor,
                "f": self.since_ms, "u": self.until_ms}


def run_filter(tenant: str, *, workflow: str = "", status: str = "", actor: str = "", since_ms: float = 0,
               until_ms: float = 0, limit: int = 0) -> RunFilter:
    """Check a ListRuns request; 0 means unset for the times and the default for the limit."""
    limit = limit or 50
    if not 1 <= limit <= MAX_PAGE:
        raise InvalidArgument(f"limit must be between 1 and {MAX_PAGE}, got {limit}; page with page_token "
                              "for more")
    for name, value in (("created_after_ms", since_ms), ("created_before_ms", until_ms)):
        if not math.isfinite(value) or value < 0:
            raise InvalidArgument(f"{name} must be epoch milliseconds >= 0, got {value}")
    if since_ms and until_ms and since_ms >= until_ms:
        raise InvalidArgument(f"created_after_ms ({since_ms}) must be before created_before_ms ({until_ms})")
    return RunFilter(tenant, workflow, status, actor, since_ms or -INF, until_ms or INF, limit)


@dataclass
class RunPage:
    run_ids: list[str]
    next_page_token: str
    total: int


class RunListing:
    """Pages of run ids from the indexes (the caller loads their states)."""

    def __init__(self, client: Any) -> None:
        self.r = client

    def page(self, flt: RunFilter, page_token: str = "") -> RunPage:
        cursor: Cursor | None = decode_token(page_token, flt.scope())
        page = zpage(self.r, flt.key, limit=flt.limit, cursor=cursor, since=flt.since_ms, until=flt.until_ms)
        return RunPage([m for m, _s in page.items], encode_token(page.next, flt.scope()), page.total)


# -- backfill: runs stored before the listing indexes existed -------------------------------------
# A run enters its combination sets when it is created; one created by an older planner is only in
# aios:{t}:runs (and, after its next status change, in that status's sets). The timer poller walks
# each tenant's runs once, oldest first, and adds each to every set of its current state. A run
# that changes between the read and the write must not land in its old status's sets: the write is
# a script that checks the state's version first, and a run that moved is read again next round.
_BACKFILL = """
if redis.call('HGET', KEYS[1], 'ver') ~= ARGV[1] then return 0 end
for i = 3, #KEYS do
  redis.call('ZADD', KEYS[i], ARGV[2], ARGV[3])
  redis.call('SADD', KEYS[2], KEYS[i])
end
return 1
"""
BACKFILL_DONE = "done"


def backfill_key(tenant: str) -> str:
    """Where the walk stands: the last (score, run id) handled, or ``done``."""
    return f"aios:{{{tenant}}}:runs:backfill"


def backfill_indexes(client: Any, tenant: str, *, budget: int = 5000, batch: int = 500,
                     window_ms: int = 3_600_000) -> int:
    """Index up to ``budget`` of the tenant's runs; how many were read (0 once the walk is done). The
    walk ends at runs created up to ``window_ms`` after it began: older planners may still create
    runs while the new ones roll out; later runs are indexed by their own commit."""
    raw = redis_call(client.get, backfill_key(tenant))
    if raw == BACKFILL_DONE:
        return 0
    at = json.loads(raw) if raw else {"stop": time.time() * 1000 + window_ms}
    script, done = client.register_script(_BACKFILL), 0
    while done < budget:
        low = f"({at['s']!r}" if "s" in at else "-inf"
        size = min(batch, budget - done)
        got = redis_call(client.zrangebyscore, index_key(tenant), low, repr(at["stop"]), start=0, num=size,
                         withscores=True)
        if "s" in at:  # runs of the cursor's own millisecond that sort after it are still to do
            got = ([(m, s) for m, s in redis_call(client.zrangebyscore, index_key(tenant), repr(at["s"]),
                                                  repr(at["s"]), withscores=True) if m > at["m"]] + got)[:size]
        if not got:
            redis_call(client.set, backfill_key(tenant), BACKFILL_DONE)
            return done
        pipe = client.pipeline(transaction=False)
        for run_id, _s in got:
            pipe.hmget(f"aios:{{{tenant}}}:run:{run_id}", "state", "ver")
        loaded = redis_call(pipe.execute)
        pipe = client.pipeline(transaction=False)
        for (run_id, score), (state, ver) in zip(got, loaded, strict=True):
            if state:  # else expired: retention trims its entries
                run = RunState.from_dict(json.loads(state))
                script(keys=[f"aios:{{{tenant}}}:run:{run_id}", INDEX_REGISTRY.format(tenant=tenant),
                             *index_keys(tenant, run.actor, run.workflow, run.status)],
                       args=[ver, score, run_id], client=pipe)
        results, moved = iter(redis_call(pipe.execute)), False
        for (run_id, score), (state, _ver) in zip(got, loaded, strict=True):
            if state and not next(results):
                moved = True  # it changed meanwhile: stop before it, read it again next round
                break
            at = {"s": float(score), "m": run_id, "stop": at["stop"]}
            done += 1
        redis_call(client.set, backfill_key(tenant), json.dumps(at))
        if moved:
            return done
    return done
