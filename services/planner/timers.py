"""The durable timer poller. Timers live in Redis (set atomically with the run
state that created them); when one is due, the poller publishes a ``FireTimer``
command for its run and only then removes it. A crash between the two fires
the timer again after restart, and the run's state machine ignores a timer id
it no longer waits for: at least once on the wire, once in effect. Once a
minute it also trims the run index of runs whose retention ran out, and adds
runs an older planner stored to the listing indexes (once, 5,000 a minute).

With hot standby only the replica that is the planner group's member polls
(``active``): a standby would race the member for every due timer and send
FireTimer commands for partitions it does not own."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from services.common.errors import TransientError
from services.common.kafka import MeshProducer
from services.planner import wire
from services.planner.store import RunQueries

log = logging.getLogger(__name__)


class TimerPoller:
    def __init__(self, store: RunQueries, producer: MeshProducer, *, interval_s: float = 0.05,
                 trim_every_s: float = 60.0, active: Callable[[], bool] | None = None) -> None:
        self.store, self.producer, self.interval_s = store, producer, interval_s
        self.active = active or (lambda: True)  # whether this replica may fire timers now
        self.trim_every_s = trim_every_s
        self._next_trim = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="timer-poller", daemon=True)
        self.fired = 0

    def start(self) -> TimerPoller:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            if not self.active():
                continue
            try:
                self.poll_once()
            except TransientError as exc:  # Redis or the broker restarting: expected, recovers by itself
                log.warning("timer poll failed (%s); retrying in 1 s", exc)
                self._stop.wait(1.0)
            except Exception:
                log.exception("timer poll failed; retrying")
                self._stop.wait(1.0)

    def poll_once(self) -> int:
        now = int(time.time() * 1000)
        fired = 0
        for tenant in self.store.tenants():
            due = self.store.due_timers(tenant, now)
            if not due:
                continue
            for timer_id, payload in due:
                self.producer.send("commands", payload["run_id"], wire.command(
                    tenant, payload["run_id"], "system:timer", "FireTimer",
                    {"timer_id": timer_id, "kind": payload["kind"], "step_id": payload.get("step_id")}))
            self.producer.flush()
            self.store.remove_timers(tenant, [tid for tid, _ in due])
            fired += len(due)
        self.fired += fired
        if time.monotonic() >= self._next_trim:
            self._next_trim = time.monotonic() + self.trim_every_s
            for tenant in self.store.tenants():
                self.store.trim_index(tenant, now)
                self.store.backfill_index(tenant)  # runs from before the listing indexes; 0 once done
        return fired
