"""The executor's pure logic: attempt fencing, result classification, claim checks.
No Kafka, Redis, gRPC or HTTP here."""

from services.executor.domain.attempts import (
    AlreadyRecorded,
    Decision,
    Recorded,
    Replay,
    ReplaySuccess,
    Run,
    Supersede,
    Wait,
    call_deadline,
    decide,
    on_lease,
    record_outcome,
)
from services.executor.domain.claims import ClaimCheck, claim_check, claim_reference, is_claim
from services.executor.domain.model import AttemptResult, LeaseGrant, StepAttempt, StepRecord

__all__ = ["AlreadyRecorded", "AttemptResult", "ClaimCheck", "Decision", "LeaseGrant", "Recorded", "Replay",
           "ReplaySuccess", "Run", "StepAttempt", "StepRecord", "Supersede", "Wait", "call_deadline",
           "claim_check", "claim_reference", "decide", "is_claim", "on_lease", "record_outcome"]
