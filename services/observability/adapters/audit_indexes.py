"""The audit trail's query indexes: key names, and the upkeep that keeps them true when entries
were stored before the indexes existed (backfill) or are rewritten by an erasure (reindex).

Every entry is in one sorted set per combination of its actor, action and its run's workflow
(``aios:{t}:audit:by:actor=ann:action=approval.approved``, member "<seq>:<event id>", score the
time it occurred), each registered in ``aios:{t}:audit:keys`` so retention can trim them all."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import redis

from services.common.errors import TransientError
from services.common.paging import combination_key, combinations_of
from services.observability.domain.entries import AuditEntry

RunFacts = Callable[[Sequence[tuple[str, str, str]]], list[str]]

# Forget an index key in the registry once it is empty, atomically: an entry added to it meanwhile
# (SADD and ZADD in one script) keeps it registered.
_UNREGISTER = """
for i = 2, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 0 then redis.call('SREM', KEYS[1], KEYS[i]) end
end
return 1
"""


def base(tenant: str) -> str:
    return f"aios:{{{tenant}}}:audit"


def event_id(member: str) -> str:
    return member[13:]  # after "<12 digits>:"


def index_key(tenant: str, *, actor: str = "", action: str = "", workflow: str = "") -> str:
    """The tenant's entries with these values (the log when none)."""
    if not (actor or action or workflow):
        return f"{base(tenant)}:log"
    return combination_key(f"{base(tenant)}:by", (("actor", actor), ("action", action), ("wf", workflow)))


def index_keys(tenant: str, actor: str, action: str, workflow: str) -> list[str]:
    """Every index an entry belongs to besides the log: one per combination of its values."""
    return [index_key(tenant, **chosen)
            for chosen in combinations_of({"actor": actor, "action": action, "workflow": workflow}, smallest=1)]


def _call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise TransientError(f"redis unavailable: {exc}") from exc


def _workflows(tenant: str, run_ids: Sequence[str], run_facts: RunFacts) -> dict[str, str]:
    runs = sorted(set(run_ids) - {""})
    return dict(zip(runs, run_facts([(tenant, r, "workflow") for r in runs]), strict=True))


def backfill(client: Any, tenant: str, run_facts: RunFacts, stop_ms: float, budget: int) -> int:
    """Add entries an older version stored (in the log only) to the query indexes, oldest first, a
    budget at a time, once per tenant; how many were read (0 once done). The walk ends at what
    occurred up to ``stop_ms`` (fixed by the first call: older replicas may still write while the
    new ones roll out; later entries are indexed as they arrive). Entries never change, so no check
    is needed; one trimmed meanwhile leaves an index member that the next trim removes."""
    b = base(tenant)
    raw = _call(client.get, f"{b}:backfill")
    if raw == "done":
        return 0
    at = json.loads(raw) if raw else {"stop": stop_ms}
    low = f"({at['s']!r}" if "s" in at else "-inf"
    got = _call(client.zrangebyscore, f"{b}:log", low, repr(at["stop"]), start=0, num=budget,
                withscores=True)
    if "s" in at:  # the cursor's own millisecond: members after it
        got = ([(m, sc) for m, sc in _call(client.zrangebyscore, f"{b}:log", repr(at["s"]),
                                           repr(at["s"]), withscores=True) if m > at["m"]] + got)[:budget]
    if not got:
        _call(client.set, f"{b}:backfill", "done")
        return 0
    raws = _call(client.hmget, f"{b}:entries", [event_id(m) for m, _s in got])
    entries = [(m, sc, AuditEntry.from_json(r)) for (m, sc), r in zip(got, raws, strict=True) if r]
    workflows = _workflows(tenant, [e.run_id for _m, _s, e in entries], run_facts)
    pipe = client.pipeline(transaction=False)
    for member, score, e in entries:
        for key in index_keys(tenant, e.actor, e.action, workflows.get(e.run_id, "")):
            pipe.zadd(key, {member: score})
            pipe.sadd(f"{b}:keys", key)
        pipe.sadd(f"{b}:actions", e.action)
    pipe.set(f"{b}:backfill", json.dumps({"s": float(got[-1][1]), "m": got[-1][0], "stop": at["stop"]}))
    _call(pipe.execute)
    return len(got)


def reindex(client: Any, tenant: str, moved: Sequence[tuple[AuditEntry, AuditEntry]], run_facts: RunFacts) -> None:
    """Move rewritten entries to the indexes of their new actor/action: an erased subject must not
    stay findable by its old value, nor stay in an index key's name."""
    if not moved:
        return
    b = base(tenant)
    pipe = client.pipeline(transaction=False)
    for before, _after in moved:  # the entry's log member: same score, same event id
        pipe.zrangebyscore(f"{b}:log", repr(before.occurred_at_ms), repr(before.occurred_at_ms))
    members = _call(pipe.execute)
    workflows = _workflows(tenant, [before.run_id for before, _a in moved], run_facts)
    pipe, emptied = client.pipeline(transaction=False), set()
    for (before, after), tied in zip(moved, members, strict=True):
        member = next((m for m in tied if event_id(m) == before.event_id), None)
        if member is None:
            continue  # trimmed meanwhile
        wf = workflows.get(before.run_id, "")
        old = set(index_keys(tenant, before.actor, before.action, wf)) | set(
            index_keys(tenant, before.actor, before.action, ""))
        new = set(index_keys(tenant, after.actor, after.action, wf))
        for key in old - new:
            pipe.zrem(key, member)
            emptied.add(key)
        for key in new - old:
            pipe.zadd(key, {member: before.occurred_at_ms})
            pipe.sadd(f"{b}:keys", key)
    _call(pipe.execute)
    if emptied:  # the old value lives on in no key name either
        _call(client.register_script(_UNREGISTER), keys=[f"{b}:keys", *sorted(emptied)])
