"""Intent drift streams in the real Redis: the same updates as the in-memory twin, a second store
(a restart, or another replica) continues a stream, and two replicas adding to one stream at once
lose no message (optimistic transactions)."""

from __future__ import annotations

import threading
import uuid

import pytest
import redis

from infra.stack import Stack
from services.observability.adapters.drift_store import InMemoryDriftStore, RedisDriftStore, decode
from services.observability.domain.drift import Classified, DriftConfig
from tests.unit.intent_streams import SHIFTED_INTENTS, stream

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]
CONFIG = DriftConfig(window_records=50, step_records=10, baseline_windows=2)


def _url(infra: Stack) -> str:
    return infra.env()["AIOS_REDIS_URL"]


def _batch(tenant: str, ref: str, n: int, seed: int, only: tuple[str, ...] = ()) -> list[Classified]:
    return [Classified(tenant, ref, intent, conf) for intent, conf in stream(n, seed=seed, only=only)]


def test_redis_and_the_in_memory_twin_agree_and_a_new_store_continues(client: redis.Redis) -> None:
    tenant, ref = f"t{uuid.uuid4().hex[:8]}", "intent-minilm-lr@v1"
    batches = [_batch(tenant, ref, 100, 1), _batch(tenant, ref, 37, 2), _batch(tenant, ref, 50, 3, SHIFTED_INTENTS)]
    twin, store = InMemoryDriftStore(CONFIG), RedisDriftStore(client, CONFIG)
    for batch in batches[:2]:
        assert store.observe(batch) == twin.observe(batch)
    restarted = RedisDriftStore(client, CONFIG)  # a restart: nothing in the process, all in Redis
    [update] = restarted.observe(batches[2])
    assert update == twin.observe(batches[2])[0]
    assert not update.started and update.score is not None and update.score.mix > 0.5
    assert restarted.scores()[(tenant, ref)] == update.score == twin.scores()[(tenant, ref)]


def test_two_replicas_adding_to_one_stream_at_once_lose_nothing(infra: Stack, client: redis.Redis) -> None:
    tenant, ref = f"t{uuid.uuid4().hex[:8]}", "intent-minilm-lr@v1"
    config = DriftConfig(window_records=100, step_records=100, baseline_windows=100)  # all 10,000 in the baseline
    errors: list[BaseException] = []

    def replica(seed: int) -> None:
        own = redis.Redis.from_url(_url(infra), decode_responses=True)  # each replica its own connections
        store = RedisDriftStore(own, config)
        try:
            for i in range(50):
                store.observe(_batch(tenant, ref, 20, seed * 1000 + i))
        except BaseException as exc:  # surfaced below
            errors.append(exc)
        finally:
            own.close()

    threads = [threading.Thread(target=replica, args=(s,)) for s in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    state = decode(client.get(RedisDriftStore.key(tenant, ref)) or "")
    assert state.baseline.n == 2 * 50 * 20


def _exported(tenant: str) -> dict[str, float]:
    """aios_intent_drift_score by model, for ``tenant``, as this process's /metrics shows it (under the
    tenant's bounded label value: a long test session may have used up the label budget)."""
    from services.common.metrics import bounded
    from services.observability import metrics

    label = bounded("tenant", tenant)
    return {s.labels["model"]: s.value for m in metrics.DRIFT_SCORE.collect() for s in m.samples
            if s.labels["tenant"] == label}


def test_every_replica_exports_the_shared_score_not_the_last_one_it_computed(client: redis.Redis) -> None:
    """Replica A scores a shifted window, then the stream's partitions move to replica B, whose next
    window is back to normal. A's refresh exports B's score (was: A kept its own, and the alert's
    max over replicas stayed high)."""
    from services.observability import metrics

    tenant, ref = f"t{uuid.uuid4().hex[:8]}", "intent-minilm-lr@v1"
    a, b = RedisDriftStore(client, CONFIG), RedisDriftStore(client, CONFIG)
    a.observe(_batch(tenant, ref, 100, 1))  # the baseline
    [shifted] = a.observe(_batch(tenant, ref, 50, 2, SHIFTED_INTENTS))
    metrics.sync_drift(a.scores())  # as A's handler does after its batch
    assert shifted.score is not None and _exported(tenant) == {"intent-minilm-lr": shifted.score.score}
    [normal] = b.observe(_batch(tenant, ref, 50, 3))  # in another process: A's gauges do not see it
    assert normal.score is not None and normal.score.score < shifted.score.score
    metrics.sync_drift(a.scores())  # A's periodic refresh reads what every replica wrote
    assert _exported(tenant) == {"intent-minilm-lr": normal.score.score}


def test_a_new_model_versions_first_score_retires_the_old_versions(client: redis.Redis) -> None:
    """A refit starts a new stream that learns its own baseline; until it has a score the old
    version's stays the model's (it may still serve part of the traffic), then it is dropped, by this
    replica and every other (was: the old score stayed in the shared hash for good)."""
    from services.observability import metrics

    tenant, old, new = f"t{uuid.uuid4().hex[:8]}", "intent-minilm-lr@v1", "intent-minilm-lr@v2"
    store = RedisDriftStore(client, CONFIG)
    store.observe(_batch(tenant, old, 100, 1))
    [was] = store.observe(_batch(tenant, old, 50, 2, SHIFTED_INTENTS))
    store.observe(_batch(tenant, new, 100, 3))  # the new version's baseline: no score of its own yet
    assert set(store.scores()) >= {(tenant, old)} and (tenant, new) not in store.scores()
    metrics.sync_drift(store.scores())
    assert was.score is not None and _exported(tenant) == {"intent-minilm-lr": was.score.score}
    [now] = store.observe(_batch(tenant, new, 50, 4))
    assert now.score is not None
    assert [k for k in store.scores() if k[0] == tenant] == [(tenant, new)]
    metrics.sync_drift(store.scores())
    assert _exported(tenant) == {"intent-minilm-lr": now.score.score}


def test_two_versions_serving_at_once_do_not_take_turns_as_the_models_score(client: redis.Redis) -> None:
    """A canary: v1 and v2 both classify traffic. Once v2 (which began later) has a score it is the
    model's, and v1's later scores do not take its place back (was: each new score of either version
    deleted the other's, and the gauge and the alert alternated)."""
    tenant, v1, v2 = f"t{uuid.uuid4().hex[:8]}", "intent-minilm-lr@v1", "intent-minilm-lr@v2"
    clock = [1_000.0]
    store = RedisDriftStore(client, CONFIG, clock_ms=lambda: clock[0])
    store.observe(_batch(tenant, v1, 150, 1))  # v1's baseline and a first window
    clock[0] += 60_000
    store.observe(_batch(tenant, v2, 150, 2))  # v2 begins a minute later, and scores
    assert [k for k in store.scores() if k[0] == tenant] == [(tenant, v2)]
    [later] = store.observe(_batch(tenant, v1, 50, 3, SHIFTED_INTENTS))  # v1 still serves part of the traffic
    assert later.score is not None  # v1's stream goes on ...
    assert [k for k in store.scores() if k[0] == tenant] == [(tenant, v2)]  # ... but v2's is the model's
    twin = InMemoryDriftStore(CONFIG)  # the twin keeps the same rule
    for batch in (_batch(tenant, v1, 150, 1), _batch(tenant, v2, 150, 2), _batch(tenant, v1, 50, 3, SHIFTED_INTENTS)):
        twin.observe(batch)
    assert list(twin.scores()) == [(tenant, v2)]
