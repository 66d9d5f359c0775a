"""The audit trail in Redis, isolated per tenant by key.

Keys (all inside the tenant's hash tag, so one Lua script covers an entry):
  aios:{t}:audit:entries        hash event_id -> entry JSON
  aios:{t}:audit:log            zset of members, score occurred_at: the tenant's
                                trail, capped at the retention (oldest dropped)
  aios:{t}:audit:run:<run_id>   zset of members, score occurred_at: one run's timeline
  aios:{t}:audit:seq            counter; members are "<seq:012d>:<event_id>" so
                                entries of the same millisecond keep arrival order
  aios:{t}:audit:runmeta:<run>  hash workflow, tool:<step_id>, approval:<step_id> (for usage
                                cost by workflow, step metrics by tool, approval time to
                                decision: requested-at in ms), with a TTL
  aios:{_system}:dlq:depth      hash "<source role>|<error type>" -> dead letters not replayed
  aios:{t}:seen:observability:<event_id>
                                dedupe marker (``uow.marker_key``), kept as long as the
                                longest retention of the consumed topics

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

from collections.abc import Iterator, Sequence
from typing import Any

import redis

from services.common.errors import TransientError
from services.common.uow import MARKER_TTL_S, marker_key
from services.observability.domain.entries import SYSTEM_TENANT, AuditEntry
from services.observability.domain.query import AuditFilter

# Store one entry unless its event id is known (its marker, or the entry still
# stored: a redelivery is a no-op), set its marker, then trim the tenant's trail
# to the retention, removing trimmed entries from their runs too (their run keys
# share the tenant's slot). Returns 1 if new.
# KEYS: entries, log, seq, marker[, run]. ARGV: event id, score, entry JSON, retention,
# run key prefix, marker ttl (0 = never expires).
_ADD = """
if redis.call('EXISTS', KEYS[4]) == 1 or redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return 0 end
local member = string.format('%012d', redis.call('INCR', KEYS[3])) .. ':' .. ARGV[1]
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[2], member)
if #KEYS >= 5 then redis.call('ZADD', KEYS[5], ARGV[2], member) end
if tonumber(ARGV[6]) > 0 then redis.call('SET', KEYS[4], '1', 'EX', ARGV[6]) else redis.call('SET', KEYS[4], '1') end
local excess = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[4])
if excess > 0 then
  local old = redis.call('ZPOPMIN', KEYS[2], excess)
  for i = 1, #old, 2 do
    local id = string.sub(old[i], 14)
    local raw = redis.call('HGET', KEYS[1], id)
    redis.call('HDEL', KEYS[1], id)
    if raw then
      local ok, entry = pcall(cjson.decode, raw)
      if ok and type(entry['run_id']) == 'string' and entry['run_id'] ~= '' then
        redis.call('ZREM', ARGV[5] .. entry['run_id'], old[i])
      end
    end
  end
end
return 1
"""
_PAGE = 256
MAX_TIMELINE = 10_000
_DLQ_KEY = f"aios:{{{SYSTEM_TENANT}}}:dlq:depth"
# Observability consumes topics other services may consume (and mark) too: its markers are its own.
CONSUMER = "observability"


def _base(tenant: str) -> str:
    return f"aios:{{{tenant}}}:audit"


def _event_id(member: str) -> str:
    return member[13:]  # after "<12 digits>:"


class RedisAuditStore:
    def __init__(self, client: redis.Redis, *, retention: int, run_meta_ttl_s: int = 7 * 86400,
                 marker_ttl_s: int = MARKER_TTL_S) -> None:
        self._redis = client
        self._add = client.register_script(_ADD)
        self.retention = retention
        self.run_meta_ttl_s = run_meta_ttl_s
        self.marker_ttl_s = marker_ttl_s

    # -- writing -----------------------------------------------------------------
    def add(self, entries: Sequence[AuditEntry]) -> list[bool]:
        """Store entries (one pipelined round trip); True for each that was new."""
        if not entries:
            return []
        pipe = self._redis.pipeline(transaction=False)
        for e in entries:
            base = _base(e.tenant)
            keys = [f"{base}:entries", f"{base}:log", f"{base}:seq", marker_key(e.tenant, e.event_id,
                                                                                consumer=CONSUMER)]
            if e.run_id:
                keys.append(f"{base}:run:{e.run_id}")
            self._add(keys=keys, args=[e.event_id, e.occurred_at_ms, e.to_json(), self.retention, f"{base}:run:",
                                       self.marker_ttl_s], client=pipe)
        return [bool(x) for x in _execute(pipe)]

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

    # -- reading -------------------------------------------------------------------
    def query(self, flt: AuditFilter) -> list[AuditEntry]:
        """Newest first, up to the filter's limit."""
        base = _base(flt.tenant)
        key = f"{base}:run:{flt.run_id}" if flt.run_id else f"{base}:log"
        out: list[AuditEntry] = []
        for entry in self._scan(base, key, newest_first=True):
            if flt.accepts(entry):
                out.append(entry)
                if len(out) >= flt.limit:
                    break
        return out

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
