"""Run state in Redis, with a transactional outbox and durable timers.

Saving a transition writes, in one Lua script: the new state (compare-and-set
on its version, so a stale planner replica cannot overwrite a newer one), the
encoded Kafka records the transition produced (the outbox) and the timers it
set or cleared. The records are produced afterwards and the outbox cleared
once the broker acknowledged them; a crash in between leaves the outbox in
Redis and the next load produces it again. Consumers dedupe by event id.

Keys (tenant in braces: one Redis Cluster slot per tenant):
  aios:{t}:run:<id>      hash: state (JSON), ver, outbox (JSON list)
  aios:{t}:runs          zset: run ids by creation time
  aios:{t}:timers        zset: timer ids by due time (ms)
  aios:{t}:timerdata     hash: timer id -> JSON payload
  aios:tenants           set: tenants that have runs (for the timer poller)
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any

import redis

from services.common.errors import Conflict, TransientError
from services.planner.domain.state import RunState

_SAVE = """
local cur = redis.call('HGET', KEYS[1], 'ver')
if (cur or '') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[3], 'ver', ARGV[2], 'outbox', ARGV[4])
if ARGV[1] == '' then redis.call('ZADD', KEYS[2], ARGV[5], ARGV[6]) end
local timers = cjson.decode(ARGV[7])
-- Removals first: a transition may clear a timer and set one with the same id.
for _, id in ipairs(timers['remove']) do
  redis.call('ZREM', KEYS[3], id)
  redis.call('HDEL', KEYS[4], id)
end
for _, t in ipairs(timers['add']) do
  redis.call('ZADD', KEYS[3], t[1], t[2])
  redis.call('HSET', KEYS[4], t[2], t[3])
end
return 1
"""

_CLEAR = """
if redis.call('HGET', KEYS[1], 'ver') == ARGV[1] then redis.call('HSET', KEYS[1], 'outbox', '[]') end
return 1
"""


@dataclass
class OutRecord:
    """One encoded Kafka record waiting in the outbox."""

    topic: str
    key: str
    value: bytes
    headers: dict[str, str]
    event_id: str

    def to_json(self) -> dict[str, Any]:
        return {"topic": self.topic, "key": self.key, "value": base64.b64encode(self.value).decode(),
                "headers": self.headers, "event_id": self.event_id}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> OutRecord:
        return cls(topic=raw["topic"], key=raw["key"], value=base64.b64decode(raw["value"]),
                   headers=raw["headers"], event_id=raw["event_id"])


@dataclass
class Loaded:
    run: RunState | None
    version: str
    outbox: list[OutRecord] = field(default_factory=list)


def _k(tenant: str, *parts: str) -> str:
    return ":".join([f"aios:{{{tenant}}}", *parts])


class RunStore:
    def __init__(self, client: redis.Redis) -> None:
        self.r = client
        self._save = client.register_script(_SAVE)
        self._clear = client.register_script(_CLEAR)

    def load(self, tenant: str, run_id: str) -> Loaded:
        try:
            state, ver, outbox = self.r.hmget(_k(tenant, "run", run_id), "state", "ver", "outbox")
        except redis.RedisError as exc:
            raise TransientError(f"redis: {exc}") from exc
        if state is None:
            return Loaded(None, "")
        return Loaded(RunState.from_dict(json.loads(state)), ver or "",
                      [OutRecord.from_json(x) for x in json.loads(outbox or "[]")])

    def save(self, run: RunState, expected: str, outbox: list[OutRecord],
             timers_add: list[tuple[int, str, dict[str, Any]]], timers_remove: list[str]) -> str:
        """Write state, outbox and timers atomically; return the new version."""
        new_ver = str(int(expected or 0) + 1)
        keys = [_k(run.tenant, "run", run.run_id), _k(run.tenant, "runs"), _k(run.tenant, "timers"),
                _k(run.tenant, "timerdata")]
        timers = {"add": [[due, tid, json.dumps(payload)] for due, tid, payload in timers_add],
                  "remove": timers_remove}
        args = [expected, new_ver, json.dumps(run.to_dict(), default=str),
                json.dumps([o.to_json() for o in outbox]), run.created_at, run.run_id,
                json.dumps(timers)]
        try:
            if expected == "":
                # Before the save: a crash in between must not leave a run whose timers nobody polls.
                self.r.sadd("aios:tenants", run.tenant)
            ok = self._save(keys=keys, args=args)
        except redis.RedisError as exc:
            raise TransientError(f"redis: {exc}") from exc
        if not ok:
            raise Conflict(f"run {run.run_id} changed underneath (expected version {expected or 'none'})")
        return new_ver

    def clear_outbox(self, tenant: str, run_id: str, version: str) -> None:
        self._clear(keys=[_k(tenant, "run", run_id)], args=[version])

    def list_runs(self, tenant: str, limit: int = 50) -> list[RunState]:
        ids = self.r.zrevrange(_k(tenant, "runs"), 0, max(0, limit - 1))
        if not ids:
            return []
        pipe = self.r.pipeline(transaction=False)
        for rid in ids:
            pipe.hget(_k(tenant, "run", rid), "state")
        return [RunState.from_dict(json.loads(s)) for s in pipe.execute() if s]

    def list_runs_filtered(self, tenant: str, *, workflow: str = "", status: str = "",
                           limit: int = 50, scan: int = 2000) -> list[RunState]:
        runs = self.list_runs(tenant, scan if (workflow or status) else limit)
        out = [r for r in runs if (not workflow or r.workflow == workflow) and (not status or r.status == status)]
        return out[:limit]

    # -- accepted starts ---------------------------------------------------------
    def mark_pending(self, run: RunState, ttl_s: int = 3600) -> bool:
        """An accepted start the planner has not applied yet: visible as ``pending``. True if new."""
        return bool(self.r.set(_k(run.tenant, "pending", run.run_id), json.dumps(run.to_dict()), ex=ttl_s, nx=True))

    def clear_pending(self, tenant: str, run_id: str) -> None:
        self.r.delete(_k(tenant, "pending", run_id))

    def load_pending(self, tenant: str, run_id: str) -> RunState | None:
        raw = self.r.get(_k(tenant, "pending", run_id))
        return RunState.from_dict(json.loads(raw)) if raw else None

    # -- durable timers ----------------------------------------------------------
    def tenants(self) -> list[str]:
        return sorted(self.r.smembers("aios:tenants"))

    def due_timers(self, tenant: str, now_ms: int, limit: int = 200) -> list[tuple[str, dict[str, Any]]]:
        ids = self.r.zrangebyscore(_k(tenant, "timers"), "-inf", now_ms, start=0, num=limit)
        if not ids:
            return []
        payloads = self.r.hmget(_k(tenant, "timerdata"), ids)
        return [(tid, json.loads(p)) for tid, p in zip(ids, payloads, strict=True) if p]

    def remove_timers(self, tenant: str, ids: list[str]) -> None:
        if ids:
            pipe = self.r.pipeline(transaction=True)
            pipe.zrem(_k(tenant, "timers"), *ids)
            pipe.hdel(_k(tenant, "timerdata"), *ids)
            pipe.execute()

    # -- definition snapshots ------------------------------------------------------
    def snapshot_definition(self, name: str, version: int, source: dict[str, Any]) -> None:
        self.r.set(f"aios:wfdef:{name}:{version}", json.dumps(source), nx=True)

    def load_definition(self, name: str, version: int) -> dict[str, Any] | None:
        raw = self.r.get(f"aios:wfdef:{name}:{version}")
        return json.loads(raw) if raw else None
