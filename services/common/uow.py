"""The unit of work: the one place a service's state change becomes durable.

A handler loads an entity (its state text, version and any outbox left over
from a crash), decides, and commits a ``Change``. One commit writes, all or
nothing:

* the new state, compare-and-set on the version it was computed from (a stale
  replica after a rebalance cannot overwrite a newer state: it gets
  ``Conflict`` and reloads);
* the outbox: the encoded Kafka records the change produces. They are produced
  after the commit and the outbox is cleared once the broker acknowledged them;
  a crash in between leaves them in the state hash and the next load produces
  them again (consumers dedupe by event id);
* dedupe markers (the event ids the change consumed), so a redelivered event
  is recognised without keeping an unbounded list in the state; a commit whose
  marker already exists is refused with ``AlreadyApplied``;
* timers (a sorted set of due times plus their payloads) set or cleared;
* index entries (sorted sets) and set members (e.g. the tenants with timers);
* retention: a TTL on the state once the entity is final.

The Redis adapter does it in one Lua script; ``MemoryUnitOfWork`` is its
in-memory twin for millisecond handler tests, and both pass the same contract
tests (tests/integration/test_uow_contract.py). Every key of one change must
hash to one Redis Cluster slot: callers put the tenant in braces.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import redis

from services.common.errors import AiosError, Conflict, TransientError
from services.common.kafka import OutRecord

__all__ = ["AlreadyApplied", "Change", "Loaded", "MemoryUnitOfWork", "RedisUnitOfWork", "TimerOps",
           "UnitOfWork", "redis_call"]


class AlreadyApplied(AiosError):
    """The change's dedupe marker exists: this event was applied before. Not an error to retry."""


@dataclass
class Loaded:
    state: str | None
    version: str
    outbox: list[OutRecord] = field(default_factory=list)


@dataclass
class TimerOps:
    """Timers in a sorted set (id by due ms) with their payloads in a hash."""

    schedule: str
    payloads: str
    add: list[tuple[int, str, str]] = field(default_factory=list)  # (due_ms, timer id, payload JSON)
    remove: list[str] = field(default_factory=list)


@dataclass
class Change:
    key: str
    expected: str  # "" = the entity must not exist yet
    state: str
    outbox: list[OutRecord] = field(default_factory=list)
    markers: list[str] = field(default_factory=list)
    marker_ttl_s: int = 0  # 0 = markers never expire
    timers: TimerOps | None = None
    index: list[tuple[str, float, str]] = field(default_factory=list)  # (sorted set, score, member)
    members: list[tuple[str, str]] = field(default_factory=list)  # (set, member)
    unindex: list[tuple[str, str]] = field(default_factory=list)  # (sorted set, member) to remove
    deletes: list[str] = field(default_factory=list)  # keys the change makes obsolete (e.g. a pending marker)
    expire_s: int | None = None  # retention of the state once final; None = keep


class UnitOfWork(Protocol):
    """The port; see the module docstring for the contract."""

    def load(self, key: str) -> Loaded: ...

    def seen(self, marker: str) -> bool: ...

    def commit(self, change: Change) -> str: ...

    def commit_many(self, changes: list[Change]) -> list[str | AiosError]: ...

    def load_many(self, keys: list[str], markers: list[str]) -> list[tuple[Loaded, bool]]: ...

    def clear_outbox(self, key: str, version: str) -> None: ...

    def clear_outboxes(self, done: list[tuple[str, str]]) -> None: ...

    def mark_once(self, marker: str, ttl_s: int) -> bool: ...

    def count(self, index: str) -> int: ...


def _outbox_json(records: list[OutRecord]) -> str:
    return json.dumps([o.to_json() for o in records])


def _outbox_from(raw: str | None) -> list[OutRecord]:
    return [OutRecord.from_json(x) for x in json.loads(raw or "[]")]


def redis_call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run one Redis call; connection loss, failover, READONLY, OOM and LOADING are transient."""
    try:
        return fn(*args, **kwargs)
    except redis.RedisError as exc:
        raise TransientError(f"redis: {type(exc).__name__}: {exc}") from exc


def pipelined_scripts(client: redis.Redis, scripts: Sequence[Any], fill: Callable[[Any], Any]) -> list[Any]:
    """Run the commands ``fill`` puts on a pipeline (EVALSHAs of ``scripts``, called by their sha) in
    one round trip. redis-py's pipelined Script objects ask SCRIPT EXISTS before every execute: a
    second round trip per consumer batch. Here a script is loaded only when Redis answers NOSCRIPT (a
    restarted Redis starts with an empty script cache), and the pipeline then runs again, so every
    command ``fill`` adds must be idempotent. Redis errors are raised as they are (callers map them)."""
    def run() -> list[Any]:
        pipe = client.pipeline(transaction=False)
        fill(pipe)
        return list(pipe.execute())

    try:
        return run()
    except redis.exceptions.NoScriptError:
        for script in scripts:
            client.script_load(script.script)
        return run()


# One script commits one or many changes (a consumer batch: one round trip). Per change, its keys
# follow each other in KEYS: [state, markers..., timer schedule, timer payloads, index sets...,
# member sets..., unindex sets..., deletes...]; ARGV[1] is the JSON list of specs (with n_keys),
# ARGV[2c], ARGV[2c+1] the state and outbox of change c. Each change succeeds or fails alone.
_COMMIT = """
local function apply(spec, b, state, outbox)
  local cur = redis.call('HGET', KEYS[b + 1], 'ver')
  if (cur or '') ~= spec.expected then return 0, cur or '' end
  local k = b + 2
  for i = 1, spec.n_markers do
    if redis.call('EXISTS', KEYS[k + i - 1]) == 1 then return -1, cur or '' end
  end
  local new = tostring((tonumber(spec.expected) or 0) + 1)
  redis.call('HSET', KEYS[b + 1], 'state', state, 'ver', new, 'outbox', outbox)
  if spec.expire_s > 0 then redis.call('EXPIRE', KEYS[b + 1], spec.expire_s)
  elseif spec.expire_s == 0 then redis.call('PERSIST', KEYS[b + 1]) end
  for i = 1, spec.n_markers do
    if spec.marker_ttl_s > 0 then redis.call('SET', KEYS[k], '1', 'EX', spec.marker_ttl_s)
    else redis.call('SET', KEYS[k], '1') end
    k = k + 1
  end
  if spec.has_timers then
    -- Removals first: a change may clear a timer and set one with the same id.
    for _, id in ipairs(spec.timers.remove) do
      redis.call('ZREM', KEYS[k], id)
      redis.call('HDEL', KEYS[k + 1], id)
    end
    for _, t in ipairs(spec.timers.add) do
      redis.call('ZADD', KEYS[k], t[1], t[2])
      redis.call('HSET', KEYS[k + 1], t[2], t[3])
    end
    k = k + 2
  end
  for _, e in ipairs(spec.index) do
    redis.call('ZADD', KEYS[k], e[1], e[2])
    k = k + 1
  end
  for _, m in ipairs(spec.members) do
    redis.call('SADD', KEYS[k], m)
    k = k + 1
  end
  for _, m in ipairs(spec.unindex) do
    redis.call('ZREM', KEYS[k], m)
    k = k + 1
  end
  for i = k, b + spec.n_keys do redis.call('DEL', KEYS[i]) end
  return 1, new
end

local specs = cjson.decode(ARGV[1])
local out, b = {}, 0
for c, spec in ipairs(specs) do
  local ok, ver = apply(spec, b, ARGV[2 * c], ARGV[2 * c + 1])
  out[#out + 1] = ok
  out[#out + 1] = ver
  b = b + spec.n_keys
end
return out
"""

_CLEAR = """
if redis.call('HGET', KEYS[1], 'ver') == ARGV[1] then redis.call('HSET', KEYS[1], 'outbox', '[]') end
return 1
"""


class RedisUnitOfWork:
    """The unit of work on Redis: one Lua script per commit."""

    def __init__(self, client: redis.Redis) -> None:
        self.r = client
        self._commit = client.register_script(_COMMIT)
        self._clear = client.register_script(_CLEAR)

    def load(self, key: str) -> Loaded:
        state, ver, outbox = redis_call(self.r.hmget, key, "state", "ver", "outbox")
        if state is None:
            return Loaded(None, "")
        return Loaded(state, ver or "", _outbox_from(outbox))

    def seen(self, marker: str) -> bool:
        return bool(redis_call(self.r.exists, marker))

    def commit(self, change: Change) -> str:
        [result] = self.commit_many([change])
        if isinstance(result, AiosError):
            raise result
        return result

    def commit_many(self, changes: list[Change]) -> list[str | AiosError]:
        """Commit many changes in one script (one round trip): each succeeds (its new version) or
        fails alone (Conflict or AlreadyApplied, returned, not raised)."""
        if not changes:
            return []
        keys: list[str] = []
        specs: list[dict[str, Any]] = []
        args: list[str] = []
        for change in changes:
            these = [change.key, *change.markers]
            timers = None
            if change.timers is not None:
                these += [change.timers.schedule, change.timers.payloads]
                timers = {"add": [[due, tid, payload] for due, tid, payload in change.timers.add],
                          "remove": change.timers.remove}
            these += [zset for zset, _s, _m in change.index] + [s for s, _m in change.members]
            these += [zset for zset, _m in change.unindex] + change.deletes
            keys += these
            specs.append({"expected": change.expected, "n_keys": len(these), "n_markers": len(change.markers),
                          "marker_ttl_s": change.marker_ttl_s,
                          "expire_s": -1 if change.expire_s is None else change.expire_s,
                          "has_timers": timers is not None, "timers": timers or {"add": [], "remove": []},
                          "index": [[score, member] for _z, score, member in change.index],
                          "members": [m for _s, m in change.members],
                          "unindex": [m for _z, m in change.unindex]})
            args += [change.state, _outbox_json(change.outbox)]
        flat = redis_call(self._commit, keys=keys, args=[json.dumps(specs), *args])
        return [_outcome(change, int(flat[2 * i]), str(flat[2 * i + 1])) for i, change in enumerate(changes)]

    def load_many(self, keys: list[str], markers: list[str]) -> list[tuple[Loaded, bool]]:
        """Load many entities and whether each one's marker is set, in one round trip."""
        pipe = self.r.pipeline(transaction=False)
        for key, marker in zip(keys, markers, strict=True):
            pipe.hmget(key, "state", "ver", "outbox")
            pipe.exists(marker)
        raw = redis_call(pipe.execute)
        out = []
        for i in range(len(keys)):
            state, ver, outbox = raw[2 * i]
            loaded = Loaded(None, "") if state is None else Loaded(state, ver or "", _outbox_from(outbox))
            out.append((loaded, bool(raw[2 * i + 1])))
        return out

    def clear_outbox(self, key: str, version: str) -> None:
        redis_call(self._clear, keys=[key], args=[version])

    def clear_outboxes(self, done: list[tuple[str, str]]) -> None:
        """Clear many acknowledged outboxes (key, version) in one round trip (clearing is idempotent)."""
        if done:
            redis_call(pipelined_scripts, self.r, [self._clear], lambda pipe: [
                pipe.evalsha(self._clear.sha, 1, key, version) for key, version in done])

    def mark_once(self, marker: str, ttl_s: int) -> bool:
        return bool(redis_call(self.r.set, marker, "1", nx=True, ex=ttl_s if ttl_s > 0 else None))

    def count(self, index: str) -> int:
        """Members of a sorted-set index (e.g. the runs in flight)."""
        return int(redis_call(self.r.zcard, index))


def _locked(method: Callable[..., Any]) -> Callable[..., Any]:
    def call(self: MemoryUnitOfWork, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)
    return call


def _outcome(change: Change, ok: int, ver: str) -> str | AiosError:
    if ok == 1:
        return ver
    if ok == -1:
        return AlreadyApplied(f"{change.key}: already applied ({', '.join(change.markers)})")
    return Conflict(f"{change.key} changed underneath (expected version {change.expected or 'none'}, found "
                    f"{ver or 'none'})", retryable=True)


def _result(change: Change, ok: int, ver: str) -> str:
    out = _outcome(change, ok, ver)
    if isinstance(out, AiosError):
        raise out
    return out


class MemoryUnitOfWork:
    """The in-memory twin: same contract, a dict and a clock you can move. Thread-safe, like Redis."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._lock = threading.RLock()
        self.hashes: dict[str, dict[str, str]] = {}
        self.strings: dict[str, str] = {}
        self.zsets: dict[str, dict[str, float]] = {}
        self.sets: dict[str, set[str]] = {}
        self.expiry: dict[str, float] = {}
        self.commits = 0

    def _alive(self, key: str) -> bool:
        due = self.expiry.get(key)
        if due is not None and due <= self.clock():
            self.hashes.pop(key, None)
            self.strings.pop(key, None)
            del self.expiry[key]
        return key in self.hashes or key in self.strings

    @_locked
    def load(self, key: str) -> Loaded:
        if not self._alive(key) or key not in self.hashes:
            return Loaded(None, "")
        h = self.hashes[key]
        return Loaded(h["state"], h["ver"], _outbox_from(h.get("outbox")))

    @_locked
    def seen(self, marker: str) -> bool:
        return self._alive(marker)

    @_locked
    def commit(self, change: Change) -> str:
        cur = self.hashes[change.key]["ver"] if self._alive(change.key) and change.key in self.hashes else ""
        if cur != change.expected:
            return _result(change, 0, cur)
        if any(self._alive(m) for m in change.markers):
            return _result(change, -1, cur)
        new = str(int(change.expected or 0) + 1)
        self.hashes[change.key] = {"state": change.state, "ver": new, "outbox": _outbox_json(change.outbox)}
        if change.expire_s is not None and change.expire_s > 0:
            self.expiry[change.key] = self.clock() + change.expire_s
        elif change.expire_s == 0:
            self.expiry.pop(change.key, None)
        for m in change.markers:
            self.strings[m] = "1"
            if change.marker_ttl_s > 0:
                self.expiry[m] = self.clock() + change.marker_ttl_s
        if change.timers is not None:
            schedule = self.zsets.setdefault(change.timers.schedule, {})
            payloads = self.hashes.setdefault(change.timers.payloads, {})
            for tid in change.timers.remove:
                schedule.pop(tid, None)
                payloads.pop(tid, None)
            for due, tid, payload in change.timers.add:
                schedule[tid] = float(due)
                payloads[tid] = payload
        for zset, score, member in change.index:
            self.zsets.setdefault(zset, {})[member] = score
        for name, member in change.members:
            self.sets.setdefault(name, set()).add(member)
        for zset, member in change.unindex:
            self.zsets.get(zset, {}).pop(member, None)
        for gone in change.deletes:
            self.hashes.pop(gone, None)
            self.strings.pop(gone, None)
        self.commits += 1
        return new

    @_locked
    def clear_outbox(self, key: str, version: str) -> None:
        h = self.hashes.get(key)
        if h is not None and h.get("ver") == version:
            h["outbox"] = "[]"

    @_locked
    def clear_outboxes(self, done: list[tuple[str, str]]) -> None:
        for key, version in done:
            self.clear_outbox(key, version)

    @_locked
    def commit_many(self, changes: list[Change]) -> list[str | AiosError]:
        out: list[str | AiosError] = []
        for change in changes:
            try:
                out.append(self.commit(change))
            except (Conflict, AlreadyApplied) as exc:
                out.append(exc)
        return out

    @_locked
    def load_many(self, keys: list[str], markers: list[str]) -> list[tuple[Loaded, bool]]:
        return [(self.load(k), self.seen(m)) for k, m in zip(keys, markers, strict=True)]

    @_locked
    def count(self, index: str) -> int:
        return len(self.zsets.get(index, {}))

    @_locked
    def mark_once(self, marker: str, ttl_s: int) -> bool:
        if self._alive(marker):
            return False
        self.strings[marker] = "1"
        if ttl_s > 0:
            self.expiry[marker] = self.clock() + ttl_s
        return True


# -- dedupe markers kept next to effects that are not a ``Change`` ----------------------
# Memory (episode stream, facts, working memory) and observability (the audit trail) set
# their marker inside their own Lua script, in the same step as the effect; the key layout
# and the lifetime still come from here, so every consumer's markers look and expire alike.

MARKER_TTL_S = 7 * 24 * 3600
"""The default life of a dedupe marker: the 7-day retention of the run-keyed topics."""


def marker_key(tenant: str, event_id: str, *, consumer: str = "") -> str:
    """The dedupe marker of an applied event: ``aios:{tenant}:seen:[<consumer>:]<event_id>``.

    The tenant is the hash tag, so a Lua script may set the marker with the effect on Redis
    Cluster. ``consumer`` keeps two services that consume the same topic from taking each
    other's markers; a topic's only marking consumer (planner, memory) may leave it empty."""
    return f"aios:{{{tenant}}}:seen:{consumer + ':' if consumer else ''}{event_id}"


def marker_ttl_s(*retention_ms: int) -> int:
    """How long markers must live to recognise any redelivery: the longest retention of the
    topics they dedupe (a record cannot come back after its topic dropped it), at least
    ``MARKER_TTL_S``; 0 (never expire) when a topic keeps records forever (retention <= 0)."""
    if any(ms <= 0 for ms in retention_ms):
        return 0
    return max([MARKER_TTL_S, *(-(-ms // 1000) for ms in retention_ms)])


__all__ += ["MARKER_TTL_S", "marker_key", "marker_ttl_s"]
