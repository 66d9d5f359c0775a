"""Attempt fencing: which attempt of a step may run, and what a request is answered with.

The rules, per idempotency key:

* A request whose attempt has a recorded result is answered from the record
  (its results re-published as first published), never run again.
* A request whose attempt has no result, when another attempt succeeded, is
  answered with that success: the effect happened once, for the whole step.
* An older attempt never starts once a newer attempt has been recorded or has
  taken the lease: it is answered ``AttemptSuperseded`` (the planner ignores an
  older attempt's failure).
* A newer attempt waits while an older attempt's call still runs (the lease is
  held until the call really returns, even after its attempt timed out), so
  two calls of one step never overlap.
* The first result recorded for an attempt is the one published; a success
  that arrives after its attempt's result (a StepTimeout) was published is
  recorded and published as a late success.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.executor.domain.model import AttemptResult, LeaseGrant, StepRecord

__all__ = ["AlreadyRecorded", "Decision", "Recorded", "Replay", "ReplaySuccess", "Run", "Supersede", "Wait",
           "call_deadline", "decide", "on_lease", "record_outcome"]


@dataclass(frozen=True)
class Replay:
    """Re-publish this attempt's own result, and its late success if there is one, as first published."""

    result: AttemptResult
    late: AttemptResult | None = None


@dataclass(frozen=True)
class ReplaySuccess:
    """Answer this attempt with another attempt's success."""

    success: AttemptResult


@dataclass(frozen=True)
class Supersede:
    """Do not start: attempt ``newer`` started or finished first."""

    newer: int


@dataclass(frozen=True)
class Run:
    """Run the tool call."""


@dataclass(frozen=True)
class Wait:
    """Attempt ``holder``'s call still runs; come back later (a transient error)."""

    holder: int


Decision = Replay | ReplaySuccess | Supersede | Run


def decide(record: StepRecord, attempt: int) -> Decision:
    """What to do with a request for ``attempt``, given the step's record."""
    own = record.results.get(attempt)
    if own is not None:
        return Replay(own, record.late.get(attempt))
    success = record.success()
    if success is not None:
        return ReplaySuccess(success)
    newest = record.newest_attempt()
    if newest > attempt:
        return Supersede(newest)
    return Run()


def on_lease(grant: LeaseGrant, attempt: int) -> Run | Wait | Supersede:
    """What the lease store's answer means for ``attempt``."""
    if grant.status == "granted":
        return Run()
    if grant.status == "superseded" and grant.holder > attempt:
        return Supersede(grant.holder)
    return Wait(grant.holder)


@dataclass(frozen=True)
class Recorded:
    """The record changed: publish ``result`` (as a late success when ``late``)."""

    record: StepRecord
    result: AttemptResult
    late: bool


@dataclass(frozen=True)
class AlreadyRecorded:
    """Nothing new: this attempt's result (and late success) was recorded before."""

    result: AttemptResult


def record_outcome(record: StepRecord, result: AttemptResult) -> Recorded | AlreadyRecorded:
    """Add an attempt's outcome to the record: the first result of an attempt
    is its result; a later success after a failure of the same attempt (its
    StepTimeout) is its late success; anything else changes nothing."""
    first = record.results.get(result.attempt)
    if first is None:
        return Recorded(StepRecord({**record.results, result.attempt: result}, dict(record.late)), result, False)
    if result.ok and not first.ok and result.attempt not in record.late:
        return Recorded(StepRecord(dict(record.results), {**record.late, result.attempt: result}), result, True)
    return AlreadyRecorded(first)


def call_deadline(accepted_at: float, started_at: float | None, timeout_s: float) -> float:
    """When a call's attempt expires. ``timeout_s`` is start-to-close: a call
    that started has ``timeout_s`` from its start; time queued before that never
    counts against it. A call still queued must start within ``timeout_s`` of
    being accepted by this executor, or it never starts."""
    return (started_at if started_at is not None else accepted_at) + timeout_s
