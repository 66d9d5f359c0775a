"""Waiting for runs to end the way an event-driven client of the mesh does: by reading the
``workflow_events`` topic (RunCompleted / RunFailed / RunCancelled, keyed by run id), not by
polling the planner's GetRun.

The peers bench's closed loop once polled GetRun every 5 ms from each client thread: at 8
clients about a thousand authenticated gRPC calls a second, served by the same planner process
whose consumer loop the bench measures (and on a 2-core machine, by the same cores). One
consumer in the bench process instead costs the planner nothing; the wait it adds is one
fetch of the topic (fetch.wait.max.ms, as every consumer of the mesh)."""

from __future__ import annotations

import threading
import uuid

from confluent_kafka import Consumer, TopicPartition

from services.common.catalog import Catalog
from services.common.codec import AvroCodec

ENDED = {"RunCompleted": "completed", "RunFailed": "failed", "RunCancelled": "cancelled"}


class RunEndWatcher:
    """One consumer of ``workflow_events`` from its end; ``wait(run_id)`` returns the run's final status."""

    def __init__(self, bootstrap: str, topic_prefix: str, fetch_wait_ms: int = 10) -> None:
        catalog = Catalog(topic_prefix)
        self.codec = AvroCodec(catalog.schemas)
        topic = catalog.topic("workflow_events")
        self.consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-ends-{uuid.uuid4().hex[:8]}",
                                  "enable.auto.commit": False, "fetch.wait.max.ms": fetch_wait_ms})
        parts = self.consumer.list_topics(topic, timeout=10).topics[topic].partitions
        # Explicit end offsets: the embedded broker left a partition assigned at OFFSET_END unresolved
        # (position -1001, never fetched), so the ends of that partition's runs were never seen.
        ends = [self.consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10) for p in parts]
        self.consumer.assign([TopicPartition(topic, p, hi) for p, (_lo, hi) in zip(parts, ends, strict=True)])
        self._ended: dict[str, str] = {}
        self._waiters: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="run-end-watcher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            # consume(n, timeout) waits for n records or the timeout: block for the first only.
            msgs = self.consumer.consume(1, timeout=0.1)
            if msgs:
                msgs += self.consumer.consume(499, timeout=0)
            for msg in msgs:
                if msg.error():
                    continue
                _schema, event = self.codec.decode(msg.value())
                status = ENDED.get(str(event.get("type")))
                if status is None:
                    continue
                with self._lock:
                    self._ended[event["run_id"]] = status
                    waiter = self._waiters.pop(event["run_id"], None)
                if waiter is not None:
                    waiter.set()

    def wait(self, run_id: str, timeout_s: float) -> str | None:
        """The run's final status, or None if it did not end within ``timeout_s``."""
        with self._lock:
            if run_id in self._ended:
                return self._ended.pop(run_id)
            waiter = self._waiters.setdefault(run_id, threading.Event())
        if not waiter.wait(timeout_s):
            with self._lock:
                self._waiters.pop(run_id, None)
            return None
        with self._lock:
            return self._ended.pop(run_id, None)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.consumer.close()
