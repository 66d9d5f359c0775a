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
