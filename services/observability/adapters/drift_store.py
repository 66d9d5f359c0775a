"""Intent drift streams in Redis, so a restart (or another replica) continues them.

Keys:
  aios:{t}:drift:<name@version>  JSON of one stream's ``DriftState`` (baseline, the
                                 window's steps, the step being filled, the last score)
  aios:{_system}:drift:scores    hash "<tenant>|<name@version>" -> last score JSON: what
                                 every replica exports (at start, after each batch, every
                                 15 s); one version per model, the one that began last
  aios:{_system}:drift:started   hash "<tenant>|<name@version>" -> when its stream began (ms)

A batch's messages of one stream are applied in one optimistic transaction
(WATCH the state, compute with the pure domain, MULTI/SET/EXEC; retried when
another replica wrote in between), so replicas consuming different partitions
of the audit topic add to the same stream without losing counts. The state has
no TTL: a stream's baseline stays until its model version changes or an
operator deletes the key (docs/runbooks.md, AiosIntentDrift).

Counted at most once: the handler passes only records the audit store found
new, and a crash between storing them and this update loses their counts
rather than doubling them (a statistic, not a ledger)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import redis

from services.common.errors import TransientError
from services.observability.domain import drift
from services.observability.domain.drift import Classified, DriftConfig, DriftScore, DriftState, Tally
from services.observability.domain.entries import SYSTEM_TENANT

__all__ = ["DriftStore", "InMemoryDriftStore", "RedisDriftStore", "StreamUpdate", "decode", "encode"]

_SCORES_KEY = f"aios:{{{SYSTEM_TENANT}}}:drift:scores"
_STARTED_KEY = f"aios:{{{SYSTEM_TENANT}}}:drift:started"  # "<tenant>|<name@version>" -> when the stream began

# A stream's new score (ARGV[2]) for field ARGV[1] = "<tenant>|<name@version>": written unless another
# version of the model (fields starting with ARGV[3] = "<tenant>|<name>@") began later (KEYS[2], start
# times; ties broken by field), in which case it is dropped; versions that began earlier lose theirs.
_PUBLISH_SCORE = """
local mine = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
local older = {}
for _, f in ipairs(redis.call('HKEYS', KEYS[1])) do
  if f ~= ARGV[1] and string.sub(f, 1, #ARGV[3]) == ARGV[3] then
    local t = tonumber(redis.call('HGET', KEYS[2], f) or '0')
    if t > mine or (t == mine and f > ARGV[1]) then
      redis.call('HDEL', KEYS[1], ARGV[1])
      return 0
    end
    table.insert(older, f)
  end
end
for _, f in ipairs(older) do redis.call('HDEL', KEYS[1], f) end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"""


@dataclass(frozen=True)
class StreamUpdate:
    """A stream after a batch: whether the batch started it, how much baseline it has, its last score."""

    tenant: str
    model_ref: str
    started: bool
    baseline_records: int
    score: DriftScore | None


class DriftStore(Protocol):
    def observe(self, messages: Sequence[Classified]) -> list[StreamUpdate]: ...

    def scores(self) -> dict[tuple[str, str], DriftScore]: ...


def _tally(raw: dict[str, Any]) -> Tally:
    return Tally({str(k): int(v) for k, v in raw.get("counts", {}).items()}, float(raw.get("confidence_sum", 0.0)))


def _score(raw: Any) -> DriftScore | None:
    return DriftScore(float(raw["mix"]), float(raw["confidence_drop"])) if isinstance(raw, dict) else None


def encode(state: DriftState) -> str:
    def tally(t: Tally) -> dict[str, Any]:
        return {"counts": dict(t.counts), "confidence_sum": t.confidence_sum}

    last = {"mix": state.last.mix, "confidence_drop": state.last.confidence_drop} if state.last else None
    return json.dumps({"v": 1, "baseline": tally(state.baseline), "steps": [tally(s) for s in state.steps],
                       "filling": tally(state.filling), "last": last}, separators=(",", ":"), sort_keys=True)


def decode(raw: str | bytes) -> DriftState:
    data = json.loads(raw)
    return DriftState(baseline=_tally(data["baseline"]), steps=tuple(_tally(s) for s in data.get("steps", [])),
                      filling=_tally(data.get("filling", {})), last=_score(data.get("last")))


def _streams(messages: Sequence[Classified]) -> dict[tuple[str, str], list[tuple[str, float]]]:
    """Messages grouped by (tenant, model version), each stream's in arrival order."""
    out: dict[tuple[str, str], list[tuple[str, float]]] = {}
    for m in messages:
        out.setdefault((m.tenant, m.model_ref), []).append((m.intent, m.confidence))
    return out


def _update(tenant: str, ref: str, before: DriftState | None, after: DriftState) -> StreamUpdate:
    return StreamUpdate(tenant, ref, started=before is None, baseline_records=after.baseline.n, score=after.last)


class RedisDriftStore:
    def __init__(self, client: redis.Redis, config: DriftConfig,
                 clock_ms: Callable[[], float] = lambda: time.time() * 1000) -> None:
        self._redis = client
        self.config = config
        self.clock_ms = clock_ms
        self._score = client.register_script(_PUBLISH_SCORE)

    def _publish(self, tenant: str, ref: str, score: DriftScore) -> None:
        """The stream's new score becomes its model's, unless a version started later has one: a
        model's score is its newest version's, and older versions' scores leave the hash then."""
        name = drift.model_name(ref)
        prefix = f"{tenant}|{name}@" if "@" in ref else f"{tenant}|{ref}\x00"  # no other version of an unversioned ref
        self._score(keys=[_SCORES_KEY, _STARTED_KEY], args=[f"{tenant}|{ref}", encode_score(score), prefix])

    @staticmethod
    def key(tenant: str, model_ref: str) -> str:
        return f"aios:{{{tenant}}}:drift:{model_ref}"

    def observe(self, messages: Sequence[Classified]) -> list[StreamUpdate]:
        """Apply a batch; one update per stream it touched."""
        updates = []
        for (tenant, ref), items in _streams(messages).items():
            key = self.key(tenant, ref)

            def apply(pipe: Any, key: str = key, items: list[tuple[str, float]] = items) -> Any:
                raw = pipe.get(key)
                before = decode(raw) if raw else None
                after = drift.observe(before or DriftState(), self.config, items)
                pipe.multi()
                pipe.set(key, encode(after))
                return before, after

            try:
                result: Any = self._redis.transaction(apply, key, value_from_callable=True)
                before, after = result
                if before is None:
                    self._redis.hsetnx(_STARTED_KEY, f"{tenant}|{ref}", str(self.clock_ms()))
                if after.last is not None and (before is None or before.last != after.last):
                    self._publish(tenant, ref, after.last)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                raise TransientError(f"redis unavailable: {exc}") from exc
            updates.append(_update(tenant, ref, before, after))
        return updates

    def scores(self) -> dict[tuple[str, str], DriftScore]:
        """The last score of every current stream that has one, whichever replica computed it: what
        every replica exports (at start and every refresh), so none keeps a score gone stale."""
        try:
            raw = self._redis.hgetall(_SCORES_KEY)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise TransientError(f"redis unavailable: {exc}") from exc
        out = {}
        for name, value in raw.items():
            tenant, sep, ref = str(name).partition("|")
            parsed = _score(json.loads(value))
            if sep and parsed is not None:
                out[(tenant, ref)] = parsed
        return out


def _supersedes(tenant: str, ref: str, field: str) -> bool:
    """Whether the scores-hash field ``field`` is another version of ``ref``'s model for ``tenant``."""
    other_tenant, _sep, other_ref = field.partition("|")
    return other_tenant == tenant and other_ref != ref and drift.model_name(other_ref) == drift.model_name(ref)


def encode_score(s: DriftScore) -> str:
    return json.dumps({"mix": s.mix, "confidence_drop": s.confidence_drop}, separators=(",", ":"))


class InMemoryDriftStore:
    """The same contract in a dict: for handler tests."""

    def __init__(self, config: DriftConfig) -> None:
        self.config = config
        self.states: dict[tuple[str, str], str] = {}  # stored encoded, as Redis holds them
        self._scores: dict[tuple[str, str], DriftScore] = {}  # the scores hash
        self._began: dict[tuple[str, str], int] = {}  # the order streams began in (the started hash)

    def observe(self, messages: Sequence[Classified]) -> list[StreamUpdate]:
        updates = []
        for (tenant, ref), items in _streams(messages).items():
            raw = self.states.get((tenant, ref))
            before = decode(raw) if raw else None
            after = drift.observe(before or DriftState(), self.config, items)
            self.states[(tenant, ref)] = encode(after)
            self._began.setdefault((tenant, ref), len(self._began))
            if after.last is not None and (before is None or before.last != after.last):
                others = [k for k in self._scores if _supersedes(tenant, ref, "|".join(k))]
                if any(self._began[k] > self._began[(tenant, ref)] for k in others):
                    self._scores.pop((tenant, ref), None)  # a newer version has a score: it is the model's
                else:
                    for k in others:
                        del self._scores[k]
                    self._scores[(tenant, ref)] = after.last
            updates.append(_update(tenant, ref, before, after))
        return updates

    def scores(self) -> dict[tuple[str, str], DriftScore]:
        return dict(self._scores)
