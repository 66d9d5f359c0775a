"""Concurrent embedding calls share one inference request (off by default:
``AIOS_MEMORY_EMBED_REQUESTS_IN_FLIGHT``).

Every Recall embeds one query, and a burst of support messages means many executor workers
recalling at once. Sent one by one, each query is a whole HTTP request through the inference
service's proxy and router (about 5 ms of their CPU each, measured in a burst of 800 support
messages), however little the model does for one text.

``CoalescingEmbedder`` batches opportunistically, per latency class: a call finds either a free
slot (at most ``max_in_flight`` requests per class) and goes at once with whatever else is queued,
or waits for the next request, which one of the waiting callers sends for everyone queued when a
slot frees. An idle mesh pays nothing (a lone call goes at once, alone); a busy one sends fewer,
bigger requests. Errors: a retryable failure (inference away) fails every call of the request,
each caller retries as it would have alone; any other failure is retried call by call, so one bad
text never fails its neighbours. The cost, and why it is off by default: a shared request is in
the trace of the run whose caller sent it, so the other runs' traces show no model call. Support
triage does not need it (recall queries were just classified, so the router answers them from
its embedding cache); recalls of texts the model has not seen do.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from services.common.errors import TransientError

Embed = Callable[[list[str], str], Sequence[Sequence[float]]]


@dataclass
class _Call:
    texts: list[str]
    wake: threading.Event = field(default_factory=threading.Event)
    vectors: list[Sequence[float]] | None = None
    error: BaseException | None = None
    lead: bool = False  # this caller sends the next request, for itself and whoever queued behind it


class CoalescingEmbedder:
    """An ``Embed`` that merges concurrent calls of one latency class (see the module docstring)."""

    def __init__(self, embed: Embed, *, max_texts: int = 64, max_in_flight: int = 2) -> None:
        self._embed = embed
        self.max_texts, self.max_in_flight = max_texts, max_in_flight
        self._lock = threading.Lock()
        self._queues: dict[str, list[_Call]] = {}
        self._senders: dict[str, int] = {}
        self.requests = 0  # inference requests sent (for tests and the bench)

    def __call__(self, texts: list[str], latency_class: str) -> Sequence[Sequence[float]]:
        if len(texts) >= self.max_texts:
            self.requests += 1
            return self._embed(texts, latency_class)  # already a big request: on its own
        call = _Call(list(texts))
        with self._lock:
            self._queues.setdefault(latency_class, []).append(call)
            if self._senders.get(latency_class, 0) < self.max_in_flight:
                self._senders[latency_class] = self._senders.get(latency_class, 0) + 1
                call.lead = True
        while call.vectors is None and call.error is None:
            if call.lead:
                call.lead = False
                self._send(latency_class)
            else:
                call.wake.wait()
                call.wake.clear()
        if call.error is not None:
            raise call.error
        assert call.vectors is not None
        return call.vectors

    def _send(self, latency_class: str) -> None:
        """One request for the calls at the head of the queue (this sender's first), then hand the
        slot to the next queued call, if any."""
        with self._lock:
            queue = self._queues[latency_class]
            batch: list[_Call] = []
            n = 0
            while queue and (not batch or n + len(queue[0].texts) <= self.max_texts):
                batch.append(queue.pop(0))
                n += len(batch[-1].texts)
            self.requests += 1
        try:
            self._answer(batch, latency_class)
        finally:
            for c in batch:
                if c.vectors is None and c.error is None:  # interrupted: never leave a caller waiting
                    c.error = TransientError("the shared embedding request was interrupted; retry")
            with self._lock:
                nxt = queue[0] if queue else None
                if nxt is not None:
                    nxt.lead = True
                else:
                    self._senders[latency_class] -= 1
            for c in batch:
                c.wake.set()
            if nxt is not None:
                nxt.wake.set()

    def _answer(self, batch: list[_Call], latency_class: str) -> None:
        try:
            vectors = list(self._embed([t for c in batch for t in c.texts], latency_class))
        except Exception as exc:
            if len(batch) == 1 or getattr(exc, "retryable", True):
                for c in batch:
                    c.error = exc
                return
            for c in batch:  # not retryable: find the culprit, spare the others
                try:
                    c.vectors = list(self._embed(c.texts, latency_class))
                except Exception as own:
                    c.error = own
            return
        if len(vectors) != sum(len(c.texts) for c in batch):
            # Each caller's own check (domain.check_vectors) reports a short answer; split it anyway.
            for c in batch:
                c.vectors = vectors[:len(c.texts)]
                vectors = vectors[len(c.texts):]
            return
        at = 0
        for c in batch:
            c.vectors = vectors[at:at + len(c.texts)]
            at += len(c.texts)
