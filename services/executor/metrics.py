"""The executor's metrics, through one small interface (the domain never sees them)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from services.executor.domain import AttemptResult

__all__ = ["claim_stored", "recorded", "replayed"]

STEP_SECONDS = Histogram("aios_step_seconds", "Tool time per step attempt", ["tool", "status"],
                         buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
STEPS = Counter("aios_steps_total", "Step attempts by tool and outcome", ["tool", "status"])
REPLAYS = Counter("aios_step_replays_total", "Step requests answered from the idempotency record", ["tool"])
OUTCOMES = Counter("aios_step_outcomes_total", "Recorded attempt outcomes by kind: ok, error, StepTimeout, "
                   "not_started, superseded, late_success", ["tool", "outcome"])
CLAIMS = Counter("aios_step_claims_total", "Tool outputs stored by reference (claim check)", ["tool"])
CLAIM_BYTES = Counter("aios_step_claim_bytes_total", "Bytes of tool outputs stored by reference", ["tool"])


def recorded(tool: str, result: AttemptResult, *, late: bool) -> None:
    """A fresh result was recorded (and is being published)."""
    if late:
        outcome = "late_success"
    elif result.error_type == "AttemptSuperseded":
        outcome = "superseded"
    elif result.error_type == "StepTimeout" and not result.started:
        outcome = "not_started"
    else:
        outcome = "StepTimeout" if result.error_type == "StepTimeout" else result.status
    OUTCOMES.labels(tool, outcome).inc()
    if result.started:
        STEP_SECONDS.labels(tool, result.status).observe(result.duration_ms / 1000)
        STEPS.labels(tool, result.status).inc()


def replayed(tool: str) -> None:
    REPLAYS.labels(tool).inc()


def claim_stored(tool: str, size: int) -> None:
    CLAIMS.labels(tool).inc()
    CLAIM_BYTES.labels(tool).inc(size)
