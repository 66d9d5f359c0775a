"""Tool calls on a thread pool, bounded the way the domain says (``call_deadline``).

A call is *accepted* when a handler submits it (after the consumer backlog and
after it took the step's lease). It waits for a free tool worker; if it has not
started within its attempt's timeout it never starts (``expired``). Once it
starts, it has the attempt's timeout to return, counted from its start
(start-to-close), so time spent queued never shortens a running call.

A call that outlives its timeout cannot be stopped (Python threads cannot be
killed): the handler reports StepTimeout and *abandons* it, and when it returns
its result goes to the ``on_late`` callback, on a separate pool. Exactly one
party owns a call's result: the waiting handler, or ``on_late``."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from services.common import tracing
from services.common.amounts import MAX_COST, usable_cost
from services.common.errors import AiosError, InvalidArgument
from services.executor.adapters.toolbox import Call, Toolbox
from services.executor.domain import AttemptResult, StepAttempt, call_deadline
from services.executor.domain.results import failed, succeeded

__all__ = ["Outcome", "ToolCall", "ToolRunner"]
log = logging.getLogger(__name__)

PENDING, STARTED, EXPIRED, FINISHED = "pending", "started", "expired", "finished"


@dataclass(frozen=True)
class Outcome:
    """How waiting for a call ended: ``finished`` (with its result), ``expired``
    (never started) or ``timed_out`` (still running, abandoned to ``on_late``)."""

    kind: str
    result: AttemptResult | None = None
    ran_ms: float = 0.0


class ToolCall:
    """One submitted call and its state, guarded by its condition."""

    def __init__(self, attempt: StepAttempt, accepted_at: float, on_late: Callable[[AttemptResult], None]) -> None:
        self.attempt, self.accepted_at, self.on_late = attempt, accepted_at, on_late
        self.cond = threading.Condition()
        self.state = PENDING
        self.started_at: float | None = None
        self.result: AttemptResult | None = None
        self.abandoned = False


class ToolRunner:
    """Runs tool calls; ``wait`` enforces the attempt's bounds with the injected clock."""

    def __init__(self, toolbox: Toolbox, *, workers: int, clock: Callable[[], float] = time.monotonic,
                 tick_s: float = 1.0, late_workers: int = 2) -> None:
        self.toolbox, self.clock, self.tick_s = toolbox, clock, tick_s
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tool")
        self._late = ThreadPoolExecutor(max_workers=late_workers, thread_name_prefix="late")
        self._lock = threading.Lock()
        self._calls: set[ToolCall] = set()
        self._late_pending = 0

    def submit(self, attempt: StepAttempt, on_late: Callable[[AttemptResult], None]) -> ToolCall:
        """Accept a call now; it starts when a tool worker is free."""
        call = ToolCall(attempt, self.clock(), on_late)
        with self._lock:
            self._calls.add(call)
        self._pool.submit(tracing.in_current_context(self._run), call)  # the tool's calls join the step's trace
        return call

    def wait(self, call: ToolCall) -> Outcome:
        """Block until the call returns or its attempt expires (see the module docstring)."""
        with call.cond:
            while True:
                if call.state == FINISHED:
                    return Outcome("finished", call.result)
                now = self.clock()
                deadline = call_deadline(call.accepted_at, call.started_at, call.attempt.timeout_s)
                if now >= deadline:
                    if call.state == PENDING:
                        call.state = EXPIRED  # the worker that picks it up will skip it
                        self._forget(call)
                        return Outcome("expired")
                    call.abandoned = True
                    return Outcome("timed_out", ran_ms=(now - (call.started_at or now)) * 1000)
                # Poll the clock too: tests move a fake clock without notifying.
                call.cond.wait(min(deadline - now, self.tick_s))

    def _run(self, call: ToolCall) -> None:
        with call.cond:
            if call.state == EXPIRED:
                return
            call.state, call.started_at = STARTED, self.clock()
            call.cond.notify_all()
        result = self._execute(call.attempt, call.started_at)
        with call.cond:
            call.state, call.result = FINISHED, result
            late = call.abandoned
            call.cond.notify_all()
        self._forget(call)
        if late:
            with self._lock:
                self._late_pending += 1
            self._late.submit(self._deliver_late, call, result)

    def defer(self, work: Callable[[], None]) -> None:
        """Run ``work`` on the late pool (results whose handler stopped waiting); shutdown waits for it."""
        with self._lock:
            self._late_pending += 1
        self._late.submit(self._deliver, work)

    def _deliver(self, work: Callable[[], None]) -> None:
        try:
            work()
        except Exception:
            log.exception("deferred result handling failed")
        finally:
            with self._lock:
                self._late_pending -= 1

    def _deliver_late(self, call: ToolCall, result: AttemptResult) -> None:
        try:
            call.on_late(result)
        except Exception:  # the callback retries on its own; never lose the thread
            log.exception("late result of %s#%d not handled", call.attempt.idempotency_key, call.attempt.attempt)
        finally:
            with self._lock:
                self._late_pending -= 1

    def _execute(self, attempt: StepAttempt, started_at: float) -> AttemptResult:
        call = Call(tenant=attempt.tenant, run_id=attempt.run_id, step_id=attempt.step_id, attempt=attempt.attempt,
                    idempotency_key=attempt.idempotency_key, latency_class=attempt.latency_class,
                    timeout_s=attempt.timeout_s)
        try:
            if attempt.inputs_error is not None:
                raise InvalidArgument(f"{attempt.tool}: inputs are not valid JSON: {attempt.inputs_error}")
            out = self.toolbox.run(attempt.tool, attempt.inputs, call)
            return succeeded(attempt.attempt, out.output, duration_ms=(self.clock() - started_at) * 1000,
                             cost=_cost(attempt, out.cost), model=out.model)
        except BaseException as exc:  # the tool's failure is the attempt's result, whatever it raised
            if not isinstance(exc, AiosError):
                log.warning("tool %s raised %s: %s", attempt.tool, type(exc).__name__, exc)
            return failed(attempt.attempt, exc, duration_ms=(self.clock() - started_at) * 1000)

    def _forget(self, call: ToolCall) -> None:
        with self._lock:
            self._calls.discard(call)

    def queued(self) -> int:
        """Calls accepted but not started yet."""
        with self._lock:
            return sum(1 for c in self._calls if c.state == PENDING)

    def running(self) -> int:
        """Calls started and not returned yet (abandoned ones included)."""
        with self._lock:
            return sum(1 for c in self._calls if c.state == STARTED)

    def busy(self) -> bool:
        """Whether a call runs or a late result is still being handled."""
        with self._lock:
            return self._late_pending > 0 or any(c.state == STARTED for c in self._calls)

    def shutdown(self, grace_s: float) -> None:
        """Give running calls up to ``grace_s`` to return and their late results to be recorded."""
        deadline = time.monotonic() + grace_s
        while self.busy() and time.monotonic() < deadline:
            time.sleep(0.05)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._late.shutdown(wait=False)
        if self.running():
            log.warning("%d tool call(s) still running at shutdown; their leases expire and retries take over",
                        self.running())


def _cost(attempt: StepAttempt, reported: Any) -> float:
    """What the attempt cost: the tool's figure, else its estimate (what its budget held). A figure that
    is not an amount (NaN, infinite, negative, absurd: a broken plug-in) is logged and replaced by the
    estimate: the effect happened, so the step succeeds, and the budget is charged what it held."""
    cost = usable_cost(reported)
    if cost is None:
        log.warning("tool %s reported cost %r for %s, which is not an amount (a finite number from 0 to %d); "
                    "charged its estimate %s instead", attempt.tool, reported, attempt.idempotency_key, MAX_COST,
                    attempt.cost_estimate)
        return attempt.cost_estimate
    return cost or attempt.cost_estimate
