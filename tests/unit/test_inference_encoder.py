"""A tier's model (TierModel) with the real MiniLM and the fitted classifier, no Ray: requests
waiting for the model run merged in one model call within the tier's limit, each caller gets its own
results in order, a failed call fails only its callers, and the model thread carries the tier's CPU
priority. Also the router's embedding cache."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from services.inference import model
from services.inference.cache import EmbeddingCache
from services.inference.encoder import TierModel

pytestmark = pytest.mark.timeout(180)
TEXTS = ["I lost my card", "How do I top up with Apple Pay?", "Where is my refund?", "My card payment was declined",
         "What exchange rate do you use?", "My transfer has not arrived yet"]


@pytest.fixture(scope="module")
def classifier() -> Path:
    if not model.classifier_path().exists():  # fitted once and cached (~1-2 min)
        subprocess.run([sys.executable, "-m", "services.inference.fit"], cwd=model.REPO, check=True, timeout=900)
    return model.classifier_path()


@pytest.fixture(scope="module")
def tier(classifier: Path) -> Iterator[TierModel]:
    tier_model = TierModel(classifier, threads=2, device="cpu", max_texts=4, nice=7, name="unit")
    yield tier_model
    tier_model.close()


def test_waiting_requests_share_model_calls_within_the_limit(tier: TierModel) -> None:
    before = tier.stats.snapshot()

    async def six_callers() -> list[list[dict[str, object]]]:
        return list(await asyncio.gather(*(tier.infer([[text]]) for text in TEXTS)))

    results = asyncio.run(six_callers())
    after = tier.stats.snapshot()
    # Six single-text requests, at most four texts per model call: two calls, not six.
    assert after["calls"] - before["calls"] == 2
    assert after["requests"] - before["requests"] == 6 and after["texts"] - before["texts"] == 6
    direct = tier.run_blocking([TEXTS])[0]
    for text, [result], label in zip(TEXTS, results, direct["labels"], strict=True):
        assert result["labels"] == [label], text
        assert np.allclose(np.linalg.norm(result["vectors"], axis=1), 1.0, atol=1e-3)


def test_one_caller_gets_one_result_per_request_in_order(tier: TierModel) -> None:
    [first, second] = asyncio.run(tier.infer([TEXTS[:1], TEXTS[1:3]]))
    assert len(first["labels"]) == 1 and len(second["labels"]) == 2 and second["vectors"].shape == (2, 384)
    assert first["version"] == second["version"] == tier.classifier.version


def test_a_failing_call_fails_its_callers_only(tier: TierModel) -> None:
    async def bad_then_good() -> tuple[BaseException | None, list[dict[str, object]]]:
        bad = asyncio.ensure_future(tier.infer([[None]]))  # type: ignore[list-item]  # not a string
        error = None
        try:
            await bad
        except Exception as exc:
            error = exc
        return error, await tier.infer([TEXTS[:1]])

    error, [good] = asyncio.run(bad_then_good())
    assert error is not None
    assert good["labels"] and good["scores"][0] > 0


def test_the_model_thread_runs_at_the_tiers_priority(tier: TierModel) -> None:
    def nice_of(tid: int) -> int:
        return int(Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(") ", 1)[1].split()[16])

    tier.run_blocking([TEXTS * 8])  # torch's worker threads exist by now
    model_threads = [t for t in threading.enumerate() if t.name.startswith("unit-model")]
    assert model_threads and all(nice_of(t.native_id or 0) == 7 for t in model_threads)
    assert nice_of(threading.main_thread().native_id or 0) != 7  # the rest of the process keeps its own


def test_a_bulk_model_thread_only_takes_idle_cpu(classifier: Path) -> None:
    bulk = TierModel(classifier, threads=1, device="cpu", sched_idle=True, name="idle")
    try:
        [[result]] = [bulk.run_blocking([TEXTS[:1]])]
        assert result["labels"]
        model_threads = [t for t in threading.enumerate() if t.name.startswith("idle-model")]
        assert model_threads and all(os.sched_getscheduler(t.native_id or 0) == os.SCHED_IDLE for t in model_threads)
        assert os.sched_getscheduler(0) != os.SCHED_IDLE
    finally:
        bulk.close()


def test_embedding_cache_keeps_the_most_recent() -> None:
    cache = EmbeddingCache(max_items=2)
    vectors = np.eye(3, 384, dtype=np.float32)
    cache.put_many(["a", "b"], vectors[:2])
    assert cache.get("a") is not None  # "a" is now the most recent
    cache.put_many(["c"], vectors[2:])
    assert cache.get("b") is None and np.array_equal(cache.get("c"), vectors[2])  # type: ignore[arg-type]
    assert cache.snapshot() == {"items": 2, "max_items": 2, "hits": 2, "misses": 1}
    off = EmbeddingCache(max_items=0)
    off.put_many(["a"], vectors[:1])
    assert off.get("a") is None
