"""Redis adapter of the memory service: vector sets for semantic items, hashes
for item bodies and facts, a stream for episodes, strings with a TTL for
working memory, and one set per data subject so erasure finds everything.

Every multi-key change that must be all-or-nothing (fact compare-and-set,
episode append plus its dedupe marker) is one Lua script: all keys of a tenant
share a hash slot, so the scripts also run on Redis Cluster.

Dedupe markers follow the unit of work's conventions (``uow.marker_key``, a
lifetime of at least the memory_writes topic's retention) but are set here, in
the same script as the effect: an episode append, a fact's compare-and-set
with its history, or a working-memory SET is not a state ``Change``, and a
marker written apart from its effect would either lose the effect (marker
first, crash) or apply it twice (effect first, crash)."""

from __future__ import annotations

import functools
import struct
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import redis

from services.common.errors import Conflict, redis_error
from services.common.uow import MARKER_TTL_S, marker_key
from services.memory import domain
from services.memory.domain import Episode, ErasureResult, Item

F = TypeVar("F", bound=Callable[..., Any])

# A marker is optional for facts and working memory (gRPC writes carry no event id): it is
# the last key when present. Its TTL ARGV is 0 for a marker that never expires.
_MARK = """
local function mark(key, ttl)
  if ttl > 0 then redis.call('SET', key, '1', 'EX', ttl) else redis.call('SET', key, '1') end
end
"""

# KEYS: fact, history, subject set[, marker]. ARGV: expected version, value, provenance, subject,
# now_ms, subject member, versions kept, marker ttl.
# Returns {new version, previous version}; {-1, current} when the expected version is stale;
# {-2, 0} when the marker says this write was already applied.
_PUT_FACT = _MARK + """
if KEYS[4] and redis.call('EXISTS', KEYS[4]) == 1 then return {-2, 0} end
local cur = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
local expected = tonumber(ARGV[1])
if expected >= 0 and expected ~= cur then return {-1, cur} end
local new = cur + 1
redis.call('HSET', KEYS[1], 'value_json', ARGV[2], 'version', new, 'provenance_json', ARGV[3],
           'subject', ARGV[4], 'updated_at_ms', ARGV[5])
redis.call('LPUSH', KEYS[2], cjson.encode({version = new, value_json = ARGV[2], provenance_json = ARGV[3],
                                           at_ms = tonumber(ARGV[5])}))
redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[7]) - 1)
if ARGV[4] ~= '' then redis.call('SADD', KEYS[3], ARGV[6]) end
if KEYS[4] then mark(KEYS[4], tonumber(ARGV[8])) end
return {new, cur}
"""

# KEYS: episodes stream, subject set, marker. ARGV: retention, marker ttl, subject, member prefix,
# then the entry's field/value pairs. Returns the stream id, or false for a duplicate.
_RECORD_EPISODE = _MARK + """
if redis.call('EXISTS', KEYS[3]) == 1 then return false end
local fields = {}
for i = 5, #ARGV do fields[#fields + 1] = ARGV[i] end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[1], '*', unpack(fields))
if ARGV[3] ~= '' then redis.call('SADD', KEYS[2], ARGV[4] .. id) end
mark(KEYS[3], tonumber(ARGV[2]))
return id
"""

# KEYS: working-memory key, subject set[, marker]. ARGV: value, ttl, marker ttl, subject, member.
# Returns 0 for a duplicate.
_SET_WORKING = _MARK + """
if KEYS[3] and redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
if ARGV[4] ~= '' then redis.call('SADD', KEYS[2], ARGV[5]) end
if KEYS[3] then mark(KEYS[3], tonumber(ARGV[3])) end
return 1
"""

_EPISODE_PAGE = 500


def _transient_on_redis_errors(fn: F) -> F:
    """Redis errors classified once (``errors.redis_error``): a Redis that is down, slow, out of
    memory, read-only or loading is transient (UNAVAILABLE at the gRPC edge, retry with backoff on
    Kafka); a reply no retry can change (WRONGTYPE, a script error) is permanent."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except redis.RedisError as exc:
            raise redis_error(exc) from exc

    return wrapper  # type: ignore[return-value]


def _fp32(vector: Sequence[float]) -> bytes:
    # VADD/VSIM accept the vector as a little-endian float32 blob (FP32) or as
    # VALUES n f1..fn; the blob is the same data without formatting 384 decimal
    # strings per item (about 4x more VADD/s pipelined).
    return struct.pack(f"<{len(vector)}f", *vector)


def _now_ms() -> int:
    return int(time.time() * 1000)


class MemoryStore:
    """All of the memory service's Redis I/O."""

    def __init__(self, client: redis.Redis, *, marker_ttl_s: int = MARKER_TTL_S) -> None:
        self.r = client
        self.marker_ttl_s = marker_ttl_s  # 0: markers never expire
        self._put_fact = client.register_script(_PUT_FACT)
        self._record_episode = client.register_script(_RECORD_EPISODE)
        self._set_working = client.register_script(_SET_WORKING)

    # -- semantic items ----------------------------------------------------------
    @_transient_on_redis_errors
    def remember(self, tenant: str, collection: str, items: Sequence[Item],
                 vectors: Sequence[Sequence[float]]) -> int:
        """Store items with their vectors, replacing items of the same id."""
        keys = [domain.item_key(tenant, collection, it.id) for it in items]
        read = self.r.pipeline(transaction=False)
        for key in keys:
            read.hget(key, "subject")
        old_subjects = read.execute()
        now = str(_now_ms())
        vs_key = domain.vector_set_key(tenant, collection)
        pipe = self.r.pipeline(transaction=False)
        for item, key, vec, old in zip(items, keys, vectors, old_subjects, strict=True):
            member = domain.member_item(collection, item.id)
            if old and old != item.subject:
                pipe.srem(domain.subject_key(tenant, old), member)
            # Tag the subject before writing the data: if we die half-way, Forget still finds it.
            if item.subject:
                pipe.sadd(domain.subject_key(tenant, item.subject), member)
            pipe.hset(key, mapping={"text": item.text, "metadata_json": item.metadata_json,
                                    "subject": item.subject, "provenance_json": item.provenance_json,
                                    "stored_at_ms": now})
            pipe.execute_command("VADD", vs_key, "FP32", _fp32(vec), item.id,
                                 "SETATTR", domain.vector_attributes(item))
        pipe.execute()
        return len(items)

    @_transient_on_redis_errors
    def recall(self, tenant: str, collection: str, vector: Sequence[float], k: int) -> list[dict[str, Any]]:
        """The k nearest items, best first, each with ``score`` (VSIM similarity: 1 is identical)."""
        raw = self.r.execute_command("VSIM", domain.vector_set_key(tenant, collection), "FP32", _fp32(vector),
                                     "COUNT", k, "WITHSCORES")
        hits = list(raw.items()) if isinstance(raw, dict) else list(zip(raw[::2], raw[1::2], strict=True))
        pipe = self.r.pipeline(transaction=False)
        for item_id, _score in hits:
            pipe.hgetall(domain.item_key(tenant, collection, item_id))
        bodies = pipe.execute()
        found = []
        for (item_id, score), body in zip(hits, bodies, strict=True):
            if body:  # an element whose hash is gone is being erased right now: leave it out
                found.append({"id": item_id, "collection": collection, "score": float(score), **body})
        return found

    @_transient_on_redis_errors
    def collection_size(self, tenant: str, collection: str) -> int:
        return int(self.r.execute_command("VCARD", domain.vector_set_key(tenant, collection)) or 0)

    # -- facts -------------------------------------------------------------------
    @_transient_on_redis_errors
    def get_fact(self, tenant: str, key: str) -> dict[str, str] | None:
        body = self.r.hgetall(domain.fact_key(tenant, key))
        return body or None

    @_transient_on_redis_errors
    def put_fact(self, tenant: str, key: str, value_json: str, *, expected_version: int,
                 provenance_json: str, subject: str = "", event_id: str = "") -> int | None:
        """Compare-and-set; returns the new version, or None if ``event_id`` was applied before.

        Raises Conflict when ``expected_version`` is stale (0 = must not exist, -1 = unconditional)."""
        keys = [domain.fact_key(tenant, key), domain.fact_history_key(tenant, key),
                domain.subject_key(tenant, subject), *self._marker(tenant, event_id)]
        args = [expected_version, value_json, provenance_json, subject, _now_ms(), domain.member_fact(key),
                domain.FACT_HISTORY_KEPT, self.marker_ttl_s]
        new, current = self._put_fact(keys=keys, args=args)
        if new == -2:
            return None
        if new == -1:
            have = f"is at version {current}" if current else "does not exist"
            want = "not to exist" if expected_version == 0 else f"at version {expected_version}"
            raise Conflict(f"fact {key!r} {have}, expected {want}: GetFact, merge and retry with the "
                           "current version (0 if it does not exist)")
        return int(new)

    # -- episodes ----------------------------------------------------------------
    @_transient_on_redis_errors
    def record_episode(self, tenant: str, episode: Episode, *, event_id: str, retention: int) -> str | None:
        """Append once per ``event_id``; returns the stream id, or None for a duplicate."""
        keys = [domain.episodes_key(tenant), domain.subject_key(tenant, episode.subject),
                marker_key(tenant, event_id)]
        fields = ["run_id", episode.run_id, "workflow", episode.workflow, "outcome", episode.outcome,
                  "content_json", episode.content_json, "recorded_at_ms", episode.recorded_at_ms,
                  "subject", episode.subject, "provenance_json", episode.provenance.to_json(),
                  "event_id", event_id]
        stream_id = self._record_episode(keys=keys, args=[retention, self.marker_ttl_s, episode.subject,
                                                          domain.member_episode(""), *fields])
        return str(stream_id) if stream_id else None

    @_transient_on_redis_errors
    def list_episodes(self, tenant: str, workflow: str, limit: int) -> list[dict[str, str]]:
        """Newest first; the workflow filter scans pages of the (bounded) stream."""
        key = domain.episodes_key(tenant)
        found: list[dict[str, str]] = []
        upper = "+"
        while len(found) < limit:
            page = self.r.xrevrange(key, max=upper, min="-", count=_EPISODE_PAGE)
            for _stream_id, entry in page:
                if not workflow or entry.get("workflow") == workflow:
                    found.append(entry)
                    if len(found) == limit:
                        break
            if len(page) < _EPISODE_PAGE:
                break
            upper = f"({page[-1][0]}"
        return found

    # -- working memory ----------------------------------------------------------
    @_transient_on_redis_errors
    def set_working(self, tenant: str, key: str, value_json: str, *, ttl_s: int, subject: str = "",
                    event_id: str = "") -> bool:
        """SET with TTL once per ``event_id``; False for a duplicate."""
        keys = [domain.working_key(tenant, key), domain.subject_key(tenant, subject),
                *self._marker(tenant, event_id)]
        return bool(self._set_working(keys=keys, args=[value_json, ttl_s, self.marker_ttl_s, subject,
                                                       domain.member_working(key)]))

    @staticmethod
    def _marker(tenant: str, event_id: str) -> list[str]:
        """The dedupe marker's key for a Kafka write; none for a gRPC write (no event id)."""
        return [marker_key(tenant, event_id)] if event_id else []

    # -- erasure -----------------------------------------------------------------
    @_transient_on_redis_errors
    def forget(self, tenant: str, subject: str) -> ErasureResult:
        """Erase everything tagged with ``subject``.

        One MULTI/EXEC removes the data and exactly the members it erased, so an
        item tagged concurrently stays in the set for the next Forget instead of
        being orphaned untagged."""
        skey = domain.subject_key(tenant, subject)
        members = sorted(self.r.smembers(skey))
        if not members:
            return ErasureResult()
        plan = domain.erasure_plan(tenant, members)
        tx = self.r.pipeline(transaction=True)
        for step in plan:
            for cmd in step.commands:
                tx.execute_command(*cmd)
        tx.srem(skey, *members)
        replies = tx.execute()
        return domain.count_erased(plan, replies[:-1])
