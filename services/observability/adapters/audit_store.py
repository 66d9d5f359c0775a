"""The audit trail in Redis, isolated per tenant by key, kept for a time (90 days by default).

Keys (all inside the tenant's hash tag, so one Lua script covers an entry):
  aios:{t}:audit:entries        hash event_id -> entry JSON
  aios:{t}:audit:log            zset of members, score occurred_at: the tenant's trail
  aios:{t}:audit:by:<dims>      zset, the same for each combination of the entry's actor,
                                action and run's workflow (by:actor=ann:action=approval.approved):
                                the query indexes (audit_indexes.py: names, backfill, and the
                                move an erasure makes)
  aios:{t}:audit:keys           set: the tenant's by:* keys, so retention trims them all
  aios:{t}:audit:actions        set: actions seen, so a glob ("workflow.*") reads their indexes
  aios:{t}:audit:run:<run_id>   zset of members, score occurred_at: one run's timeline
  aios:{t}:audit:seq            counter; members are "<seq:012d>:<event_id>" so
                                entries of the same millisecond keep arrival order
  aios:{t}:audit:runmeta:<run>  hash workflow, tool:<step_id>, approval:<step_id> (for usage
                                cost by workflow, step metrics by tool, approval time to
                                decision: requested-at in ms), with a TTL
  aios:audit:tenants            set: tenants with a trail (for the retention sweep)
  aios:{_system}:dlq:depth      hash "<source role>|<error type>" -> dead letters not replayed
  aios:{t}:seen:observability:<event_id>
                                dedupe marker (``uow.marker_key``), kept as long as the
                                longest retention of the consumed topics

Retention is by time, not count: entries older than the retention are removed from the log,
every index and the entries hash (``trim``, at most every ``trim_interval_s`` from the write
path) by score range, so a burst of entries never pushes out last week's. A count cap kept
100,000 entries per tenant, about a minute at the bench's rate.

Why the marker is set in this script and not with ``UnitOfWork.mark_once``: the
marker decides whether the entry is new, so both change in one step (a marker
set first and a crash before the entry would lose the entry for good), and one
script per entry, pipelined for the batch, keeps a batch at one round trip. The
entries hash is checked too (entries stored before the markers existed), but it
is not enough alone: retention drops old entries from it, and a redelivery of
one (the audit, usage and dead-letter topics keep records for 30 days) would be
stored and counted again.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import redis

from services.common.errors import TransientError
from services.common.paging import decode_token, encode_token, zpage
from services.common.uow import MARKER_TTL_S, marker_key, pipelined_scripts
from services.observability.adapters import audit_indexes
from services.observability.adapters.audit_indexes import index_key, index_keys
from services.observability.domain.entries import SYSTEM_TENANT, AuditEntry
from services.observability.domain.query import AuditFilter

DAY_MS = 86_400_000
DEFAULT_RETENTION_DAYS = 90

# Store one entry unless its event id is known (its marker, or the entry still stored: a
# redelivery is a no-op), set its marker, and add it to the log, its run's timeline and its
# indexes (registering each index for the retention sweep). Returns 1 if new.
# KEYS: entries, log, seq, marker, index registry, actions[, run], indexes...
# ARGV: event id, score, entry JSON, has run ("1"/"0"), marker ttl (0 = never expires), action.
_ADD = """
if redis.call('EXISTS', KEYS[4]) == 1 or redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return 0 end
local member = string.format('%012d', redis.call('INCR', KEYS[3])) .. ':' .. ARGV[1]
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[2], member)
if tonumber(ARGV[5]) > 0 then redis.call('SET', KEYS[4], '1', 'EX', ARGV[5]) else redis.call('SET', KEYS[4], '1') end
redis.call('SADD', KEYS[6], ARGV[6])
local first = 7
if ARGV[4] == '1' then
  redis.call('ZADD', KEYS[7], ARGV[2], member)
  first = 8
end
for i = first, #KEYS do
  redis.call('ZADD', KEYS[i], ARGV[2], member)
  redis.call('SADD', KEYS[5], KEYS[i])
end
return 1
"""

# Remove up to ARGV[2] entries older than ARGV[1] (ms): from their run's timeline (ARGV[3] is the
# run key prefix: the run keys share the tenant's slot), the entries hash, and the log and every
# index (KEYS: entries, log, indexes...) by score range. A full batch stops below its last score
# (the rest of that millisecond goes next time). Returns {removed, 1 if nothing older is left}.
_TRIM = """
local got = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[1], 'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[2]))
if #got == 0 then return {0, 1} end
local bound, done = ARGV[1], 1
if #got / 2 == tonumber(ARGV[2]) then bound, done = got[#got], 0 end
-- A full batch in one millisecond has nothing below its last score: take that batch member by member.
local whole = done == 0 and tonumber(got[2]) == tonumber(bound)
local ids, members = {}, {}
for i = 1, #got, 2 do
  if done == 1 or whole or tonumber(got[i + 1]) < tonumber(bound) then
    local id = string.sub(got[i], 14)
    ids[#ids + 1] = id
    members[#members + 1] = got[i]
    local raw = redis.call('HGET', KEYS[1], id)
    if raw then
      local ok, entry = pcall(cjson.decode, raw)
      if ok and type(entry['run_id']) == 'string' and entry['run_id'] ~= '' then
        redis.call('ZREM', ARGV[3] .. entry['run_id'], got[i])
      end
    end
  end
end
if #ids == 0 then return {0, 1} end
for i = 1, #ids, 1000 do redis.call('HDEL', KEYS[1], unpack(ids, i, math.min(i + 999, #ids))) end
for i = 2, #KEYS do
  if whole then
    for j = 1, #members, 1000 do redis.call('ZREM', KEYS[i], unpack(members, j, math.min(j + 999, #members))) end
  else
    redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', '(' .. bound)
  end
end
return {#ids, done}
"""

# Rewrite one entry only while it is stored: retention may have dropped it since it was read.
_REPLACE = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) return 1 end
return 0
"""
_PAGE = 256
MAX_TIMELINE = 10_000
_DLQ_KEY = f"aios:{{{SYSTEM_TENANT}}}:dlq:depth"
_TENANTS = "aios:audit:tenants"
# Observability consumes topics other services may consume (and mark) too: its markers are its own.
CONSUMER = "observability"


_base, _event_id = audit_indexes.base, audit_indexes.event_id


def _now_ms() -> float:
    return time.time() * 1000


class RedisAuditStore:
    def __init__(self, client: redis.Redis, *, retention_days: float = DEFAULT_RETENTION_DAYS,
                 run_meta_ttl_s: int = 7 * 86400, marker_ttl_s: int = MARKER_TTL_S, trim_interval_s: float = 10.0,
                 trim_batch: int = 2000, clock_ms: Callable[[], float] = _now_ms) -> None:
        self._redis = client
        self._add = client.register_script(_ADD)
        self._trim = client.register_script(_TRIM)
        self._replace = client.register_script(_REPLACE)
        self.retention_ms = int(retention_days * DAY_MS)
        self.run_meta_ttl_s = run_meta_ttl_s
        self.marker_ttl_s = marker_ttl_s
        self.trim_interval_s, self.trim_batch = trim_interval_s, trim_batch
        self.clock_ms = clock_ms
        self._trimmed_at = float("-inf")

    # -- writing -----------------------------------------------------------------
    def add(self, entries: Sequence[AuditEntry]) -> list[bool]:
        """Store entries (one pipelined round trip); True for each that was new. Every
        ``trim_interval_s`` it also drops what has passed the retention."""
        if not entries:
            return []
        now = self.clock_ms()
        if now / 1000 - self._trimmed_at >= self.trim_interval_s:
            # Before the write, not after: the caller observes metrics of what it stored right after.
            self._trimmed_at = now / 1000
            self.trim_all()
        # The workflow the entry names, else the run's (remembered from its RunStarted for
        # run_meta_ttl_s): a policy check may arrive before RunStarted, an entry after the memory.
        runs = sorted({(e.tenant, e.run_id) for e in entries if e.run_id and not e.workflow})
        workflows = dict(zip(runs, self.run_facts([(t, r, "workflow") for t, r in runs]), strict=True))
        calls = []
        for e in entries:
            base = _base(e.tenant)
            keys = [f"{base}:entries", f"{base}:log", f"{base}:seq",
                    marker_key(e.tenant, e.event_id, consumer=CONSUMER), f"{base}:keys", f"{base}:actions"]
            if e.run_id:
                keys.append(f"{base}:run:{e.run_id}")
            keys += index_keys(e.tenant, e.actor, e.action, e.workflow or workflows.get((e.tenant, e.run_id), ""))
            calls.append([len(keys), *keys, e.event_id, e.occurred_at_ms, e.to_json(), "1" if e.run_id else "0",
                          self.marker_ttl_s, e.action])

        def fill(pipe: Any) -> None:
            for tenant in {e.tenant for e in entries}:
                pipe.sadd(_TENANTS, tenant)
            for call in calls:  # each entry's marker makes a second add of it a no-op
                pipe.evalsha(self._add.sha, *call)

        return [bool(x) for x in _call(pipelined_scripts, self._redis, [self._add], fill)[-len(entries):]]

    def trim(self, tenant: str, max_batches: int = 100) -> int:
        """Drop the tenant's entries older than the retention (by time); how many went."""
        base = _base(tenant)
        cutoff = repr(self.clock_ms() - self.retention_ms)
        removed = 0
        for _ in range(max_batches):
            keys = [f"{base}:entries", f"{base}:log", *sorted(_call(self._redis.smembers, f"{base}:keys"))]
            n, done = _call(self._trim, keys=keys, args=[cutoff, self.trim_batch, f"{base}:run:"])
            removed += int(n)
            if int(done):
                break
        return removed

    def trim_all(self) -> int:
        """Apply the retention to every tenant's trail (and index entries stored before the indexes)."""
        removed = 0
        for tenant in _call(self._redis.smembers, _TENANTS):
            removed += self.trim(str(tenant))
            self.backfill(str(tenant))
        return removed

    def backfill(self, tenant: str, budget: int = 5000, window_ms: int = 600_000) -> int:
        """Index entries stored before the query indexes (see ``audit_indexes.backfill``)."""
        return audit_indexes.backfill(self._redis, tenant, self.run_facts, self.clock_ms() + window_ms, budget)

    def remember_runs(self, facts: Sequence[tuple[str, str, str, str]]) -> None:
        """Record (tenant, run_id, field, value) facts about runs: workflow, tool:<step>."""
        if not facts:
            return
        pipe = self._redis.pipeline(transaction=False)
        for tenant, run_id, name, value in facts:
            key = f"{_base(tenant)}:runmeta:{run_id}"
            pipe.hset(key, name, value)
            pipe.expire(key, self.run_meta_ttl_s)
        _execute(pipe)

    def run_facts(self, wanted: Sequence[tuple[str, str, str]]) -> list[str]:
        """Values of (tenant, run_id, field) facts, "" when unknown."""
        if not wanted:
            return []
        pipe = self._redis.pipeline(transaction=False)
        for tenant, run_id, name in wanted:
            pipe.hget(f"{_base(tenant)}:runmeta:{run_id}", name)
        return [str(v or "") for v in _execute(pipe)]

    def add_dlq_depth(self, changes: Sequence[tuple[str, str, int]]) -> dict[tuple[str, str], int]:
        """Apply (source role, error type, delta) changes; the new depths."""
        pipe = self._redis.pipeline(transaction=False)
        for role, error_type, delta in changes:
            pipe.hincrby(_DLQ_KEY, f"{role}|{error_type}", delta)
        values = _execute(pipe)
        return {(role, et): max(0, int(v)) for (role, et, _d), v in zip(changes, values, strict=True)}

    def dlq_depths(self) -> dict[tuple[str, str], int]:
        raw = _call(self._redis.hgetall, _DLQ_KEY)
        depths = {}
        for field, value in raw.items():
            role, sep, error_type = str(field).partition("|")
            if sep:
                depths[(role, error_type)] = max(0, int(value))
        return depths

    def rewrite(self, tenant: str, mentions: Callable[[str], bool],
                rewrite: Callable[[AuditEntry], AuditEntry]) -> int:
        """Rewrite every stored entry of ``tenant`` whose JSON ``mentions`` says so (a data subject's
        erasure); a scan of the tenant's entries, in pages. The number rewritten."""
        key = f"{_base(tenant)}:entries"
        changed, cursor = 0, 0
        while True:
            cursor, page = _call(self._redis.hscan, key, cursor, count=_PAGE)
            updates, moved = [], []
            for event_id, raw in page.items():
                if mentions(raw):
                    before = AuditEntry.from_json(raw)
                    after = rewrite(before)
                    new = after.to_json()
                    if new != raw:
                        updates.append((event_id, new))
                        if (after.actor, after.action) != (before.actor, before.action):
                            moved.append((before, after))
            if updates:
                pipe = self._redis.pipeline(transaction=False)
                for event_id, new in updates:
                    self._replace(keys=[key], args=[event_id, new], client=pipe)
                changed += sum(int(x) for x in _execute(pipe))
            audit_indexes.reindex(self._redis, tenant, moved, self.run_facts)
            if int(cursor) == 0:
                return changed

    # -- reading -------------------------------------------------------------------
    def query(self, flt: AuditFilter, page_token: str = "") -> tuple[list[AuditEntry], str, int]:
        """One page, newest first: (entries, next page token or "", entries matching in all pages).

        Served from one index (actor, action, both, or the log), or from the indexes of every action
        an action glob names; a query on one run reads that run's timeline and filters it (it is
        small: at most ``MAX_TIMELINE`` entries)."""
        base = _base(flt.tenant)
        cursor = decode_token(page_token, flt.scope())
        if flt.run_id and flt.workflow and self.run_facts([(flt.tenant, flt.run_id, "workflow")]) != [flt.workflow]:
            return [], "", 0
        if flt.run_id:
            def accept(members: list[str]) -> list[bool]:
                raws = _call(self._redis.hmget, f"{base}:entries", [_event_id(m) for m in members])
                return [bool(raw) and flt.accepts(AuditEntry.from_json(raw)) for raw in raws]
            # Only an actor or action filter needs each entry read; the run alone (its workflow was
            # checked above, times are scores) pages on its index like any other (was: every page
            # read the run's whole trail, so walking a long one was quadratic).
            page = zpage(self._redis, f"{base}:run:{flt.run_id}", limit=flt.limit, cursor=cursor,
                         since=flt.since_ms, until=flt.until_ms, accept=accept if flt.actor or flt.action else None)
        else:
            actions: list[str] = [flt.action] if flt.action and not flt.action_glob else [
                a for a in sorted(_call(self._redis.smembers, f"{base}:actions")) if flt.action_matches(a)]
            if not flt.action:
                actions = [""]
            if not actions:
                return [], "", 0
            page = zpage(self._redis, [index_key(flt.tenant, actor=flt.actor, action=a, workflow=flt.workflow)
                                       for a in actions],
                         limit=flt.limit, cursor=cursor, since=flt.since_ms, until=flt.until_ms)
        raws = _call(self._redis.hmget, f"{base}:entries", [_event_id(m) for m, _s in page.items]) \
            if page.items else []
        return [AuditEntry.from_json(r) for r in raws if r], encode_token(page.next, flt.scope()), page.total

    def timeline(self, tenant: str, run_id: str) -> list[AuditEntry]:
        """Oldest first; empty when the run has no entries."""
        base = _base(tenant)
        entries = []
        for entry in self._scan(base, f"{base}:run:{run_id}", newest_first=False):
            entries.append(entry)
            if len(entries) >= MAX_TIMELINE:
                break
        return entries

    def _scan(self, base: str, key: str, *, newest_first: bool) -> Iterator[AuditEntry]:
        start = 0
        while True:
            members = _call(self._redis.zrange, key, start, start + _PAGE - 1, desc=newest_first)
            if not members:
                return
            raws = _call(self._redis.hmget, f"{base}:entries", [_event_id(m) for m in members])
            for raw in raws:
                if raw:  # trimmed by retention between the two reads
                    yield AuditEntry.from_json(raw)
            start += _PAGE


def _execute(pipe: Any) -> list[Any]:
    try:
        return list(pipe.execute())
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise TransientError(f"redis unavailable: {exc}") from exc


def _call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise TransientError(f"redis unavailable: {exc}") from exc
