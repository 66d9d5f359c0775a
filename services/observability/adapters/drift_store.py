"""Intent drift streams in Redis, so a restart (or another replica) continues them.

Keys:
  aios:{t}:drift:<name@version>  JSON of one stream's ``DriftState`` (baseline, the
                                 window's steps, the step being filled, the last score)
  aios:{_system}:drift:scores    hash "<tenant>|<name@version>" -> last score JSON, read
                                 at start so the gauges come back before new traffic

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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import redis

from services.common.errors import TransientError
from services.observability.domain import drift
from services.observability.domain.drift import Classified, DriftConfig, DriftScore, DriftState, Tally
from services.observability.domain.entries import SYSTEM_TENANT

__all__ = ["DriftStore", "InMemoryDriftStore", "RedisDriftStore", "StreamUpdate", "decode", "encode"]

_SCORES_KEY = f"aios:{{{SYSTEM_TENANT}}}:drift:scores"


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
    def __init__(self, client: redis.Redis, config: DriftConfig) -> None:
        self._redis = client
        self.config = config

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
                if after.last is not None and (before is None or before.last != after.last):
                    # The newest score of a model is the model's: another version's (a refit rolling
                    # out, or retired) stops being exported once this one has a score of its own.
                    stale = [f for f in self._redis.hkeys(_SCORES_KEY) if _supersedes(tenant, ref, str(f))]
                    pipe = self._redis.pipeline(transaction=True)
                    pipe.hset(_SCORES_KEY, f"{tenant}|{ref}", encode_score(after.last))
                    if stale:
                        pipe.hdel(_SCORES_KEY, *stale)
                    pipe.execute()
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

    def observe(self, messages: Sequence[Classified]) -> list[StreamUpdate]:
        updates = []
        for (tenant, ref), items in _streams(messages).items():
            raw = self.states.get((tenant, ref))
            before = decode(raw) if raw else None
            after = drift.observe(before or DriftState(), self.config, items)
            self.states[(tenant, ref)] = encode(after)
            if after.last is not None and (before is None or before.last != after.last):
                for other in [k for k in self._scores if _supersedes(tenant, ref, "|".join(k))]:
                    del self._scores[other]
                self._scores[(tenant, ref)] = after.last
            updates.append(_update(tenant, ref, before, after))
        return updates

    def scores(self) -> dict[tuple[str, str], DriftScore]:
        return dict(self._scores)
