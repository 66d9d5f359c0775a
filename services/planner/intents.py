"""Intent classification off the planner's consumer loop.

Classifying a batch of support messages is one request to the inference service's bulk tier,
hundreds of milliseconds when the model is busy. Made inside the consumer loop, that wait held
up every step result and command fetched with the messages or after them: in-flight runs queued
behind new ingress (issue 7). ``BackgroundIntents`` makes the request in a thread instead and
answers the loop at once: the intents it already has, and which events are still waiting. The
planner defers the waiting events as it defers events over their admission limit (their
partitions are paused and rewound, nothing is buffered: ``Backpressure``), goes on with the
in-flight work, and finds their intents ready when the events come again.

Keys are event ids: a redelivered event (a rewind, a restart, another replica) is the same
event. Answers are kept for ``keep`` events, far more than a pause leaves waiting. A failed
request is reported once to the loop (a TransientError: the loop backs off and retries) and
sent again on the next look."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

from services.common import tracing
from services.common.errors import TransientError
from services.planner.ports import Classifier

Intent = tuple[str | None, float, str]


class BackgroundIntents:
    """Classifies in background threads; ``lookup`` never waits for the model."""

    def __init__(self, classifier: Classifier, *, requests_in_flight: int = 2, keep: int = 20000) -> None:
        self.classifier = classifier
        self.keep = keep
        self._pool = ThreadPoolExecutor(max_workers=requests_in_flight, thread_name_prefix="classify")
        self._lock = threading.Lock()
        self._known: OrderedDict[str, Intent] = OrderedDict()
        self._asked: dict[str, Future[list[Intent]]] = {}  # event id -> the request classifying it
        self._seconds = 0.2  # how long a request takes (moving average): when to look again

    def classify(self, texts: list[str]) -> list[Intent]:
        """The synchronous path (the Classifier protocol), for callers that must wait."""
        return self.classifier.classify(texts)

    def lookup(self, wanted: list[tuple[str, str]]) -> tuple[dict[str, Intent], list[str]]:
        """Intents of ``wanted`` (event id, text) known now, and the event ids still being classified
        (their request is sent here if it was not). Raises TransientError once for a failed request."""
        known: dict[str, Intent] = {}
        missing: list[tuple[str, str]] = []
        failed: BaseException | None = None
        with self._lock:
            for event_id, text in wanted:
                if event_id in self._known:
                    known[event_id] = self._known[event_id]
                    continue
                fut = self._asked.get(event_id)
                if fut is not None and fut.done() and fut.exception() is not None:
                    failed = failed or fut.exception()
                    del self._asked[event_id]  # asked again on the next look
                    continue
                if fut is None:
                    missing.append((event_id, text))
            if failed is None and missing:
                # In the asker's context: the request joins the trace that asked for it (the planner's
                # classify span), as a worker thread inherits no context of its own.
                fut = self._pool.submit(tracing.in_current_context(self._ask), [t for _e, t in missing],
                                        [e for e, _t in missing])
                for event_id, _text in missing:
                    self._asked[event_id] = fut
            waiting = [e for e, _t in wanted if e not in known]
        if failed is not None:
            raise TransientError(f"intent classification failed: {failed}") from failed
        return known, waiting

    def retry_after_s(self) -> float:
        """When waiting events are worth a look again: half a request's usual time, 20 ms to 1 s."""
        return min(1.0, max(0.02, self._seconds / 2))

    def _ask(self, texts: list[str], event_ids: list[str]) -> list[Intent]:
        started = time.monotonic()
        intents = self.classifier.classify(texts)
        with self._lock:
            self._seconds = 0.8 * self._seconds + 0.2 * (time.monotonic() - started)
            for event_id, intent in zip(event_ids, intents, strict=True):
                self._known[event_id] = intent
                self._asked.pop(event_id, None)
            while len(self._known) > self.keep:
                self._known.popitem(last=False)
        return intents

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
