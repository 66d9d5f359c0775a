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
                    self._redis.hset(_SCORES_KEY, f"{tenant}|{ref}", encode_score(after.last))
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                raise TransientError(f"redis unavailable: {exc}") from exc
            updates.append(_update(tenant, ref, before, after))
        return updates

    def scores(self) -> dict[tuple[str, str], DriftScore]:
        """The last score of every stream that has one (to restore the gauges at start)."""
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


def encode_score(s: DriftScore) -> str:
    return json.dumps({"mix": s.mix, "confidence_drop": s.confidence_drop}, separators=(",", ":"))


class InMemoryDriftStore:
    """The same contract in a dict: for handler tests."""

    def __init__(self, config: DriftConfig) -> None:
        self.config = config
        self.states: dict[tuple[str, str], str] = {}  # stored encoded, as Redis holds them

    def observe(self, messages: Sequence[Classified]) -> list[StreamUpdate]:
        updates = []
        for (tenant, ref), items in _streams(messages).items():
            raw = self.states.get((tenant, ref))
            before = decode(raw) if raw else None
            after = drift.observe(before or DriftState(), self.config, items)
            self.states[(tenant, ref)] = encode(after)
            updates.append(_update(tenant, ref, before, after))
        return updates

    def scores(self) -> dict[tuple[str, str], DriftScore]:
        return {k: s.last for k, raw in self.states.items() if (s := decode(raw)).last is not None}
