"""The executor's pure rules: attempt fencing, recording outcomes, claim checks, deadlines."""

from __future__ import annotations

import hashlib

import pytest

from services.common.errors import InvalidArgument, TransientError
from services.executor.domain import (
    AlreadyRecorded,
    AttemptResult,
    LeaseGrant,
    Recorded,
    Replay,
    ReplaySuccess,
    Run,
    StepRecord,
    Supersede,
    Wait,
    call_deadline,
    claim_check,
    claim_reference,
    decide,
    is_claim,
    on_lease,
    record_outcome,
)
from services.executor.domain.results import failed

pytestmark = pytest.mark.timeout(10)

OK1 = AttemptResult(1, "ok", output={"n": 1})
TIMEOUT1 = AttemptResult(1, "error", error_type="StepTimeout", retryable=True)
FAIL2 = AttemptResult(2, "error", error_type="TransientError", retryable=True)


def test_a_new_step_runs() -> None:
    assert decide(StepRecord(), 1) == Run()


def test_an_attempt_with_a_result_replays_it_and_its_late_success() -> None:
    record = StepRecord({1: TIMEOUT1}, {1: OK1})
    assert decide(record, 1) == Replay(TIMEOUT1, OK1)
    assert decide(StepRecord({1: OK1}), 1) == Replay(OK1, None)


def test_an_attempt_without_a_result_is_answered_with_another_attempts_success() -> None:
    assert decide(StepRecord({1: TIMEOUT1}, {1: OK1}), 2) == ReplaySuccess(OK1)


def test_an_older_attempt_is_superseded_by_a_newer_recorded_one() -> None:
    assert decide(StepRecord({2: FAIL2}), 1) == Supersede(2)
    assert decide(StepRecord({1: TIMEOUT1}), 2) == Run()


def test_lease_answers() -> None:
    assert on_lease(LeaseGrant("granted", 3), 3) == Run()
    assert on_lease(LeaseGrant("busy", 2), 3) == Wait(2)
    assert on_lease(LeaseGrant("busy", 3), 3) == Wait(3)  # a redelivery racing its original
    assert on_lease(LeaseGrant("superseded", 4), 3) == Supersede(4)


def test_the_first_result_of_an_attempt_wins_and_a_later_success_is_late() -> None:
    first = record_outcome(StepRecord(), TIMEOUT1)
    assert isinstance(first, Recorded) and not first.late
    late = record_outcome(first.record, OK1)
    assert isinstance(late, Recorded) and late.late and late.record.late == {1: OK1}
    assert late.record.success() == OK1
    assert isinstance(record_outcome(late.record, OK1), AlreadyRecorded)  # once
    assert isinstance(record_outcome(first.record, failed(1, TransientError("x"), duration_ms=1)), AlreadyRecorded)
    on_time = record_outcome(StepRecord(), OK1)
    assert isinstance(on_time, Recorded) and not on_time.late
    assert isinstance(record_outcome(on_time.record, TIMEOUT1), AlreadyRecorded)  # a success is never overwritten


def test_the_record_round_trips_through_json() -> None:
    record = StepRecord({1: TIMEOUT1, 2: FAIL2}, {1: OK1})
    assert StepRecord.from_json(record.to_json()) == record
    assert StepRecord.from_json(None) == StepRecord()


def test_classification() -> None:
    assert failed(1, TransientError("x"), duration_ms=1).retryable
    bad = failed(1, InvalidArgument("y"), duration_ms=1)
    assert (bad.error_type, bad.retryable) == ("InvalidArgument", False)
    assert failed(1, RuntimeError("z" * 5000), duration_ms=1).error_message == "z" * 2000


def test_claim_check_only_over_the_threshold() -> None:
    assert claim_check(b"x" * 10, 10) is None
    check = claim_check(b"x" * 11, 10)
    assert check is not None and check.size == 11 and check.sha256 == hashlib.sha256(b"x" * 11).hexdigest()
    ref = claim_reference("k", check)
    assert ref == {"$claim": "k", "bytes": 11, "sha256": check.sha256} and is_claim(ref)
    assert not is_claim({"$claim": 1}) and not is_claim("x")


def test_start_to_close_counts_from_the_start() -> None:
    assert call_deadline(100.0, None, 2.0) == 102.0  # queued: must start within the timeout
    assert call_deadline(100.0, 101.5, 2.0) == 103.5  # started: the full timeout from its start
