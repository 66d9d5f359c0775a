"""Step requests: run one attempt of one step, never deciding what runs next.

Load -> decide -> commit, per request:

* load the step's idempotency record (``services.common.uow``); records a
  crash left in its outbox are produced first;
* decide (``services.executor.domain.attempts``): answer from the record, refuse
  a superseded attempt, or run. Running takes the step's lease, which fences
  attempts: one call per step at a time, never an older attempt after a newer;
* run the tool call (``adapters.runner``): start-to-close timeout, counted from
  the call's start;
* commit the result AND the StepResult/UsageRecord records it produces in one
  unit of work, then produce them and clear the outbox. A redelivered request
  is answered from the record; the tool never runs twice for one attempt.

A call that outlives its timeout keeps the lease (renewed) until it returns;
the attempt is reported as StepTimeout, and a success that arrives later is
recorded and published as a late success (``wire.step_result``, late=True).
Third parties deduplicate by the step's idempotency key in any case.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from services.common import tracing
from services.common.errors import AiosError, Conflict, TransientError, is_retryable
from services.common.kafka import Inbound, OutRecord
from services.common.logs import log_context
from services.common.uow import Change, Loaded, UnitOfWork
from services.executor import metrics
from services.executor.adapters import keys, wire
from services.executor.adapters.leases import LeaseKeeper
from services.executor.adapters.runner import ToolCall, ToolRunner
from services.executor.domain import (
    AlreadyRecorded,
    AttemptResult,
    Decision,
    Recorded,
    Replay,
    ReplaySuccess,
    Run,
    StepAttempt,
    StepRecord,
    Supersede,
    Wait,
    claim_check,
    claim_reference,
    decide,
    on_lease,
    record_outcome,
)
from services.executor.domain.results import not_started, superseded, timed_out
from services.executor.ports import ClaimStore, Lease, LeaseStore, RecordProducer

__all__ = ["ExecutorConfig", "StepHandler"]
log = logging.getLogger(__name__)
_CAS_TRIES = 8


@dataclass
class _Batch:
    """One consumer batch: its steps' delivery errors and the outboxes to clear once it is flushed."""

    errors: list[object]
    produced: list[tuple[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass(frozen=True)
class ExecutorConfig:
    """What the handler needs from the settings."""

    name: str  # this replica, in every StepResult's ``executor`` field
    record_ttl_s: int = 7 * 24 * 3600  # retention of records, fences and claims
    lease_ttl_ms: int = 10_000
    claim_threshold_bytes: int = 256 * 1024
    settle_retry_s: float = 300.0  # how long a result the consumer cannot wait for is retried into the record


class StepHandler:
    """Handles batches of StepRequest records (see the module docstring)."""

    def __init__(self, *, uow: UnitOfWork, leases: LeaseStore, claims: ClaimStore, producer: RecordProducer,
                 runner: ToolRunner, config: ExecutorConfig, workers: int = 16,
                 keeper: LeaseKeeper | None = None) -> None:
        self.uow, self.leases, self.claims, self.producer = uow, leases, claims, producer
        self.runner, self.config = runner, config
        self.keeper = keeper or LeaseKeeper(leases, config.lease_ttl_ms)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="step")
        self._closing = threading.Event()
        self._scope = threading.local()  # .batch: the consumer batch this thread's step belongs to

    def handle(self, records: Sequence[Inbound]) -> None:
        """Run a batch's steps concurrently (they belong to different runs or are independent branches).
        Their records are produced as each step commits and flushed once, here, for the whole batch;
        then every acknowledged outbox is cleared in one round trip."""
        batch = _Batch(self.producer.thread_errors())
        futures = [self._pool.submit(self._in_batch, batch, rec) for rec in records]
        errors = [f.exception() for f in futures]
        self.producer.flush()
        self.uow.clear_outboxes(batch.produced)
        for err in errors:
            if err is not None:
                raise err

    def _in_batch(self, batch: _Batch, rec: Inbound) -> None:
        self._scope.batch = batch
        self.producer.use_errors(batch.errors)
        # Each step continues the trace its request carries (a batch holds many runs), so the
        # records it produces and the calls its tool makes belong to that run's trace.
        try:
            with tracing.span_from_headers("executor step", rec.headers, **{"aios.run_id": rec.key}) as trace_id, \
                    log_context(run_id=rec.key, tenant=rec.tenant, trace_id=trace_id):
                self.run_step(rec.value)
        finally:
            self._scope.batch = None
            self.producer.use_errors(None)

    def run_step(self, value: dict[str, object]) -> None:
        """One StepRequest: answer it from the record, or run its attempt and record the result."""
        attempt = wire.attempt_from(dict(value))
        decision = decide(self._load(attempt), attempt.attempt)
        if not isinstance(decision, Run):
            self._answer(attempt, decision)
            return
        lease = Lease(attempt.tenant, attempt.idempotency_key, attempt.attempt,
                      f"{self.config.name}-{uuid.uuid4().hex[:12]}")
        verdict = on_lease(self.leases.acquire(lease, self.config.lease_ttl_ms, self.config.record_ttl_s),
                           attempt.attempt)
        if isinstance(verdict, Wait):
            raise TransientError(f"step {attempt.idempotency_key}: the call of attempt {verdict.holder} still runs; "
                                 f"attempt {attempt.attempt} waits for it to return")
        if isinstance(verdict, Supersede):
            self._answer(attempt, verdict)
            return
        self.keeper.hold(lease)
        try:
            # The holder before us may have finished between our load and our lease.
            leased = self._loaded(attempt)
            decision = decide(StepRecord.from_json(leased.state), attempt.attempt)
            if not isinstance(decision, Run):
                self._answer(attempt, decision)
                self.keeper.release(lease)
                return
            call = self.runner.submit(attempt, on_late=lambda result: self._settle_late(attempt, result, lease))
        except BaseException:
            self.keeper.release(lease)
            raise
        self._finish(attempt, call, lease, leased)

    def _finish(self, attempt: StepAttempt, call: ToolCall, lease: Lease, leased: Loaded) -> None:
        """``leased``: the record as read under the lease, before the call; the outcome is committed
        against its version (one read fewer per step); a record changed meanwhile is read again."""
        outcome = self.runner.wait(call)
        if outcome.kind == "timed_out":
            # The call still runs and keeps the lease: a retry waits for it. Whatever it returns
            # is recorded then (_settle_late); a success becomes a late success.
            self._settle(attempt, timed_out(attempt, duration_ms=outcome.ran_ms), leased)
            return
        result = outcome.result if outcome.result is not None else not_started(attempt)
        try:
            self._settle(attempt, result, leased)
        except AiosError as exc:
            if not exc.retryable:
                self.keeper.release(lease)
                raise
            # The effect happened; its result must not be lost with this delivery. Keep the lease
            # and keep trying in the background; the redelivery waits, then replays the record.
            self.runner.defer(lambda: self._settle_late(attempt, result, lease))
            raise
        self.keeper.release(lease)

    # -- answers -------------------------------------------------------------------------
    def _answer(self, attempt: StepAttempt, decision: Decision | Supersede) -> None:
        if isinstance(decision, Supersede):
            self._settle(attempt, superseded(attempt, decision.newer))
            return
        metrics.replayed(attempt.tool)
        if isinstance(decision, Replay):
            self._publish(attempt, decision.result, late=False)
            if decision.late is not None:
                self._publish(attempt, decision.late, late=True)
        elif isinstance(decision, ReplaySuccess):
            self._publish(attempt, decision.success, late=False)
        if getattr(self._scope, "batch", None) is None:
            # Outside a consumer batch (a late result): flushed in this thread, where its errors are reported.
            self.producer.flush()

    def _publish(self, attempt: StepAttempt, result: AttemptResult, *, late: bool) -> None:
        """A replay: the recorded result again, same event id, marked replayed; no usage."""
        self.producer.send_record(self.producer.encode(wire.STEP_RESULTS, attempt.run_id, wire.step_result(
            attempt, result, executor=self.config.name, replayed=True, late=late)))

    # -- commit --------------------------------------------------------------------------
    def _load(self, attempt: StepAttempt) -> StepRecord:
        return StepRecord.from_json(self._loaded(attempt).state)

    def _loaded(self, attempt: StepAttempt) -> Loaded:
        key = keys.record(attempt.tenant, attempt.idempotency_key)
        loaded = self.uow.load(key)
        if loaded.outbox:  # a crash between commit and produce: produce it now
            self._produce(key, loaded.version, loaded.outbox)
        return loaded

    def _settle(self, attempt: StepAttempt, result: AttemptResult,
                known: Loaded | None = None) -> Recorded | AlreadyRecorded:
        """Record an attempt's outcome with the records it produces, then produce them. ``known``: the
        record as last read (its outbox already queued), tried first; the commit's version check
        refuses it if the record changed since, and then it is read again."""
        result = self._claim_checked(attempt, result)
        key = keys.record(attempt.tenant, attempt.idempotency_key)
        for _ in range(_CAS_TRIES):
            if known is not None:
                loaded, known = known, None  # its outbox was queued when it was read
            else:
                loaded = self.uow.load(key)
                if loaded.outbox:
                    self._produce(key, loaded.version, loaded.outbox)
            outcome = record_outcome(StepRecord.from_json(loaded.state), result)
            if isinstance(outcome, AlreadyRecorded):
                return outcome
            records = self._records(attempt, outcome)
            try:
                # What the record still holds was queued, not acknowledged (a batch flushes at its end):
                # it stays in the outbox with the new records until a flush covers both.
                version = self.uow.commit(Change(key=key, expected=loaded.version, state=outcome.record.to_json(),
                                                 outbox=[*loaded.outbox, *records], expire_s=self.config.record_ttl_s))
            except Conflict:
                continue  # another holder recorded meanwhile (a late result racing a timeout): decide again
            metrics.recorded(attempt.tool, outcome.result, late=outcome.late)
            self._produce(key, version, records)
            return outcome
        raise TransientError(f"the record of step {attempt.idempotency_key} kept changing; retrying later")

    def _records(self, attempt: StepAttempt, outcome: Recorded) -> list[OutRecord]:
        records = [self.producer.encode(wire.STEP_RESULTS, attempt.run_id, wire.step_result(
            attempt, outcome.result, executor=self.config.name, replayed=False, late=outcome.late))]
        if outcome.result.started:
            records.append(self.producer.encode(wire.USAGE, attempt.run_id,
                                                wire.usage(attempt, outcome.result, late=outcome.late)))
        return records

    def _produce(self, key: str, version: str, records: list[OutRecord]) -> None:
        for record in records:
            self.producer.send_record(record)
        batch: _Batch | None = getattr(self._scope, "batch", None)
        if batch is not None:  # the batch flushes once and clears every outbox after it
            with batch.lock:
                batch.produced.append((key, version))
            return
        self.producer.flush()
        self.uow.clear_outbox(key, version)

    def _claim_checked(self, attempt: StepAttempt, result: AttemptResult) -> AttemptResult:
        """An output over the threshold is stored by reference; the result carries the reference."""
        encoded = wire.encode_output(result.output)
        check = claim_check(encoded.encode(), self.config.claim_threshold_bytes) if encoded is not None else None
        if check is None or encoded is None:
            return result
        key = self.claims.put(attempt.tenant, check.sha256, encoded.encode(), self.config.record_ttl_s)
        metrics.claim_stored(attempt.tool, check.size)
        return replace(result, output=claim_reference(key, check))

    # -- results nobody waits for ----------------------------------------------------------
    def _settle_late(self, attempt: StepAttempt, result: AttemptResult, lease: Lease) -> None:
        """Record a result that arrived after its handler stopped waiting, retrying while Redis or
        Kafka are away; then give the lease up so the next attempt may run (or replay)."""
        give_up = time.monotonic() + self.config.settle_retry_s
        delay = 0.05
        try:
            while True:
                try:
                    outcome = self._settle(attempt, result)
                    if isinstance(outcome, Recorded) and outcome.late:
                        log.warning("late success of %s attempt %d recorded and published after its StepTimeout",
                                    attempt.idempotency_key, attempt.attempt)
                    return
                except Exception as exc:
                    if not is_retryable(exc) or time.monotonic() >= give_up or self._closing.is_set():
                        log.error("result of %s attempt %d (%s) could not be recorded: %s; the effect stands at "
                                  "the third party, which deduplicates the retry by the idempotency key",
                                  attempt.idempotency_key, attempt.attempt, result.status, exc)
                        return
                    time.sleep(delay)
                    delay = min(delay * 2, 2.0)
        finally:
            self.keeper.release(lease)

    def close(self, grace_s: float = 10.0) -> None:
        """After the consumer stopped: let running calls return and late results be recorded."""
        self._pool.shutdown(wait=True)
        self.runner.shutdown(grace_s)
        self._closing.set()
        self.keeper.stop()
